"""Stand-ins of the WebUI objects our adapters wrap, shaped like the real ones (no WebUI in CI).

`LORA_NETWORKS` is the built-in Lora extension's `networks.py` (WebUI 1.10.1, 82a973c0) reduced to
what places a file's keys: `load_network` reads the file with `sd_models.read_state_dict`, converts
each module name with the module-level `convert_diffusers_name_to_compvis` (SD's fixed numbering,
as upstream) and matches it against `network_layer_mapping`, falling back to the LDM name
(`lora_unet_` -> `diffusion_model_`); `load_networks` keeps `networks_in_memory` and
`loaded_networks` as upstream does. It is run as a module so that its functions look each other up
as module globals, the way our wraps are reached in the real one.
"""

from __future__ import annotations

import importlib
import types

import torch

LORA_NETWORKS = r'''
import re

re_digits = re.compile(r"\d+")
suffix_conversion = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                     "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}
networks_in_memory = {}
loaded_networks = []
available_networks = {}


class Network:
    def __init__(self, name, network_on_disk):
        self.name, self.network_on_disk, self.modules, self.mtime = name, network_on_disk, {}, 0


def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(m, regex):
        r = re.match(regex, key)
        if not r:
            return False
        m.clear()
        m.extend([int(x) if re.match(re_digits, x) else x for x in r.groups()])
        return True

    m = []
    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if match(m, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0]>0 else 1}_conv"
    return key


def load_network(name, network_on_disk):
    net = Network(name, network_on_disk)
    sd = sd_models.read_state_dict(network_on_disk.filename)
    matched = {}
    for key_network, weight in sd.items():
        key_network_without_network_parts, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(key_network_without_network_parts, False)
        sd_module = shared.sd_model.network_layer_mapping.get(key, None)
        if sd_module is None and "lora_unet" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_unet", "diffusion_model")
            sd_module = shared.sd_model.network_layer_mapping.get(key, None)
        if sd_module is None:
            continue
        matched.setdefault(key, {})[network_part] = weight
    net.modules = matched
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    for name in names:
        net = already_loaded.get(name) or networks_in_memory.get(name)
        if net is None:
            net = load_network(name, available_networks[name])
            networks_in_memory.pop(name, None)
            networks_in_memory[name] = net
        loaded_networks.append(net)
'''


class NetworkOnDisk:
    def __init__(self, name: str, filename: str, metadata: dict | None = None):
        self.name, self.filename, self.metadata = name, filename, metadata or {}


class Processing:
    """The parts of StableDiffusionProcessing our scripts touch."""

    def __init__(self):
        self.extra_generation_params: dict[str, str] = {}
        self.comments: list[str] = []

    def comment(self, text: str) -> None:
        self.comments.append(text)


def ldm_unet(config: dict) -> torch.nn.Module:
    """The `ldm` U-Net (ours for layouts without a middle block) the WebUI builds for a diffusers config."""
    from bksdm_ext import layouts

    params = dict(layouts.ldm_unet_params_from_config(config), use_checkpoint=False)
    module, name = layouts.ldm_unet_target(params).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**params).eval()


def lora_extension(sd_model, read_state_dict) -> tuple[types.ModuleType, types.ModuleType]:
    """(networks, sd_models) stand-ins; `sd_model.model.diffusion_model` is the U-Net the LoRA applies to."""
    sd_models = types.ModuleType("sd_models")
    sd_models.read_state_dict = read_state_dict
    networks = types.ModuleType("networks")
    networks.sd_models = sd_models
    networks.shared = types.SimpleNamespace(sd_model=sd_model)
    exec(compile(LORA_NETWORKS, "networks.py", "exec"), networks.__dict__)  # noqa: S102 - our own test source
    assign_network_names(sd_model)
    return networks, sd_models


def assign_network_names(sd_model) -> None:
    """networks.assign_network_names_to_compvis_modules, for the U-Net."""
    sd_model.network_layer_mapping = {name.replace(".", "_"): module
                                      for name, module in sd_model.model.named_modules()}


def applied_weights(sd_model, net) -> dict[str, torch.Tensor]:
    """The U-Net's weights (LDM names) with `net` applied as network_lora computes it (multiplier 1)."""
    names = {module: name for name, module in sd_model.model.diffusion_model.named_modules()}
    weights = {k: v.detach().clone() for k, v in sd_model.model.diffusion_model.state_dict().items()}
    for key, parts in net.modules.items():
        module = sd_model.network_layer_mapping[key]
        if not hasattr(module, "weight") or "lora_down.weight" not in parts:
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        target = names[module] + ".weight"
        weights[target] = weights[target] + (up.flatten(1) @ down.flatten(1)).reshape(weights[target].shape) * scale
    return weights


def sd_model_with(unet: torch.nn.Module):
    """A stand-in LatentDiffusion: `.model.diffusion_model` is the U-Net."""
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = unet
    return types.SimpleNamespace(model=wrapper)

