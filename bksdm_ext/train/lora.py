"""LoRA adapters (peft) on a U-Net or text encoder, and their files: the WebUI's LDM naming and diffusers' form.

Shared by DreamBooth LoRA and LCM-LoRA: the WebUI file names LDM modules, so the Lora extension finds
the right block of any BK layout (pruned indices included), for linear and convolution layers alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import layouts


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets) -> None:
    """peft LoRA adapters on the named linear layers; only they are trained."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_modules(model: torch.nn.Module):
    """(module name, lora down weight, lora up weight, scaling) of every peft LoRA layer of `model`."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield (name, module.lora_A["default"].weight, module.lora_B["default"].weight,
                   module.scaling["default"])


def webui_lora_state_dict(unet, text_encoder, layout: str, text_family: str = "v1",
                          text_alpha: float | None = None, unet_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The LoRA in the WebUI Lora extension's naming: LDM module names, so pruned indices map right.

    U-Net: `lora_unet_<LDM module with _>.{lora_down,lora_up}.weight` and `.alpha` (the extension
    scales by alpha / rank). Text encoder: `lora_te_text_model_encoder_layers_N_self_attn_q_proj…`,
    which the extension maps to CLIP for v1 and, for v2, to OpenCLIP's fused attention
    `model_transformer_resblocks_N_attn` — applied there only when q, k, v and out_proj all have
    weights, so v2 adds k_proj and out_proj with a zero up-projection.
    """
    out: dict[str, torch.Tensor] = {}

    def put(key: str, down, up, alpha: float):
        out[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))

    for name, down, up, scaling in lora_modules(unet):
        ldm = layouts.unet_key_to_ldm(f"{name}.weight", layout)[: -len(".weight")]
        put("lora_unet_" + ldm.replace(".", "_"), down, up, scaling * down.shape[0])
    if text_encoder is not None:
        for name, down, up, scaling in lora_modules(text_encoder):
            key = "lora_te_" + name.replace(".", "_")
            put(key, down, up, scaling * down.shape[0])
            if text_family == "v2" and name.endswith(".q_proj"):
                attention = name[: -len(".q_proj")]
                modules = dict(text_encoder.named_modules())
                for extra in ("k_proj", "out_proj"):
                    width = modules[f"{attention}.{extra}"].out_features
                    put(f"lora_te_{attention.replace('.', '_')}_{extra}", torch.zeros_like(down),
                        torch.zeros(width, down.shape[0]), scaling * down.shape[0])
    return out


def write_lora(out, unet, text_encoder, layout: str, metadata: dict[str, str]) -> Path:
    """The LoRA at `out` (a `job.Outputs`): `out.single`, the WebUI's LDM naming with kohya-style `ss_*` and
    `bksdm.*` metadata, and `out.lora_diffusers` (diffusers' LoRA file). Returns the WebUI file."""
    from diffusers import StableDiffusionPipeline

    from ..io import write_safetensors

    out.claim(out.single, out.lora_diffusers)  # this job's earlier ones go; a foreign one is refused
    out.dir.mkdir(parents=True, exist_ok=True)
    family = "v2" if unet.config.cross_attention_dim == 1024 else "v1"
    path = write_safetensors(out.single, webui_lora_state_dict(unet, text_encoder, layout, family),
                             {"ss_network_module": "networks.lora", "bksdm.layout": layout, **metadata})
    StableDiffusionPipeline.save_lora_weights(
        out.lora_diffusers, unet_lora_layers=diffusers_lora_state_dict(unet),
        text_encoder_lora_layers=diffusers_lora_state_dict(text_encoder) if text_encoder is not None else None)
    return path


def diffusers_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's state dict of `model`'s LoRA with each module's scaling (alpha / rank) folded into lora_B.

    diffusers' file has no alpha: `load_lora_weights` reads lora_alpha = rank (scale 1), so an alpha
    other than the rank would change the LoRA's strength there unless folded in.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    for name, _, _, scaling in lora_modules(model):
        key = f"{name}.lora_B.weight"
        state[key] = state[key] * scaling
    return state
