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



# --- the ControlNet extension (Mikubill/sd-webui-controlnet v1.1.455, 56cec5b2) ----------------------
# scripts/hook.py's UnetHook.hook reduced to what places residuals: per unit the control model's 13
# residuals, scaled (weight, soft injection 0.825**(12-i), advanced weighting) and passed one by one,
# in SD order, through ControlParams.apply_effective_region_mask; then the replaced forward adds them
# by popping from the end: the middle block first, then output block k. `aligned_adding` is upstream's;
# `added` records what it adds to what.
CONTROLNET_HOOK = r'''
import enum
import torch
from ldm.modules.diffusionmodules.util import timestep_embedding

added = []


class ControlModelType(enum.Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_Adapter = "T2I_Adapter, Chong Mou"
    AttentionInjection = "AttentionInjection, Lvmin Zhang"
    IPAdapter = "IPAdapter, Hu Ye"
    Controlllite = "Controlllite, Kohya"


class ControlParams:
    def __init__(self, control_model, weight, control_model_type, soft_injection=False, advanced_weighting=None):
        self.control_model, self.weight, self.control_model_type = control_model, weight, control_model_type
        self.soft_injection, self.advanced_weighting = soft_injection, advanced_weighting
        self.effective_region_mask = None

    def apply_effective_region_mask(self, out):
        return out


def aligned_adding(base, x, require_channel_alignment):
    added.append((base, x))
    if isinstance(x, float):
        if x == 0.0:
            return base
        return base + x
    base_h, base_w = base.shape[-2:]
    xh, xw = x.shape[-2:]
    if xh > 1 or xw > 1:
        if base_h != xh or base_w != xw:
            x = torch.nn.functional.interpolate(x, size=(base_h, base_w), mode="nearest")
    return base + x


class UnetHook:
    def hook(self, model, sd_ldm, control_params, process, batch_option_uint_separate=False,
             batch_option_style_align=False):
        self.model, self.control_params = model, control_params
        outer = self

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            total_controlnet_embedding = [0.0] * 13
            for param in outer.control_params:
                control = param.control_model(x=x, hint=None, timesteps=timesteps, context=context, y=y)
                control_scales = [param.weight] * 13
                if param.soft_injection:
                    control_scales = [param.weight * (0.825 ** float(12 - i)) for i in range(13)]
                if param.advanced_weighting is not None:
                    control_scales = param.advanced_weighting
                control = [param.apply_effective_region_mask(c * scale) for c, scale in zip(control, control_scales)]
                for idx, item in enumerate(control):
                    total_controlnet_embedding[idx] = item + total_controlnet_embedding[idx]
            hs = []
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            h = x
            for module in self.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = self.middle_block(h, emb, context)
            h = aligned_adding(h, total_controlnet_embedding.pop(), False)
            for module in self.output_blocks:
                h = torch.cat([h, aligned_adding(hs.pop(), total_controlnet_embedding.pop(), False)], dim=1)
                h = module(h, emb, context)
            return self.out(h)

        model._original_forward = model.forward
        model.forward = forward.__get__(model, type(model))

    def restore(self):
        if hasattr(self.model, "_original_forward"):
            self.model.forward = self.model._original_forward
            del self.model._original_forward


class Script:
    models = {}  # unit.model -> ControlModel-like (with .type)

    @staticmethod
    def load_control_model(p, unet, model):
        return Script.models[model]

    @staticmethod
    def get_enabled_units(p):
        return [unit for unit in p.units if unit.enabled]
'''


def controlnet_extension() -> types.ModuleType:
    """The stand-in scripts/hook.py + Script, run as one module (the WebUI's scripts_data entry's module)."""
    module = types.ModuleType("controlnet")
    exec(compile(CONTROLNET_HOOK, "hook.py", "exec"), module.__dict__)  # noqa: S102 - our own test source
    return module


class FixedControlModel(torch.nn.Module):
    """A PlugableControlModel stand-in: the same 13 residuals, shaped like SD's skips, at every call."""

    def __init__(self, residuals):
        super().__init__()
        self.residuals = [r.clone() for r in residuals]

    def forward(self, **kwargs):
        return [r.clone() for r in self.residuals]


def ui_loadsave(tab, path: str, ui_settings: dict) -> dict:
    """What the WebUI's `UiLoadsave.add_block(tab, path)` (modules/ui_loadsave.py, 1.10.1) does to an extension
    tab at start: each component's visibility and value are kept in ui-config.json under `path/label/field`
    (a button's under its text), the first component of a key writing it and every later one taking it.
    Returns the settings as the WebUI then writes them."""
    import gradio as gr

    def apply_field(obj, key_path, field, condition=None):
        key = f"{key_path}/{field}"
        if getattr(obj, "custom_script_source", None) is not None:
            key = f"customscript/{obj.custom_script_source}/{key}"
        if getattr(obj, "do_not_save_to_config", False):
            return
        saved = ui_settings.get(key, None)
        if saved is None:
            ui_settings[key] = getattr(obj, field)
        elif condition and not condition(saved):
            pass
        else:
            if isinstance(obj, gr.Textbox) and field == "value":
                saved = str(saved)
            elif isinstance(obj, gr.Number) and field == "value":
                saved = float(saved)
            setattr(obj, field, saved)

    def add_component(key_path, x):
        if type(x) in (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, gr.Button) and x.visible:
            apply_field(x, key_path, "visible")
        if type(x) in (gr.Slider, gr.Checkbox, gr.Textbox, gr.Number):
            apply_field(x, key_path, "value")
        if type(x) is gr.Dropdown:
            choices = [c[1] if isinstance(c, tuple) else c for c in x.choices]
            apply_field(x, key_path, "value", lambda value: value in choices)

    def add_block(x, key_path):
        if hasattr(x, "children"):
            for child in x.children:
                add_block(child, key_path)
        elif getattr(x, "label", None) is not None:
            add_component(f"{key_path}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            add_component(f"{key_path}/{x.value}", x)

    add_block(tab, path)
    return ui_settings
