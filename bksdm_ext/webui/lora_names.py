"""LoRA keys in diffusers naming, placed on a BK layout's LDM modules (no WebUI import).

The WebUI's built-in Lora extension turns `lora_unet_down_blocks_1_attentions_0_…` into LDM module
names with SD's fixed block numbering (`input_blocks_{1 + 3*stage + j}`); on a BK layout that names
another block or none, so a LoRA trained with diffusers on BK-SDM would land on the wrong layers.
Here the numbering comes from the layout's own key map.
"""

from __future__ import annotations

import re

from .. import layouts
from ..errors import BKSDMError

_BLOCK = re.compile(r"lora_unet_(?:((?:down|up)_blocks)_(\d+)|mid_block)_(attentions|resnets)_(\d+)_(.+)")
_SAMPLER = re.compile(r"lora_unet_((?:down|up)_blocks)_(\d+)_((?:down|up)samplers)_0_conv(.*)")
_PLAIN = re.compile(r"lora_unet_(conv_in|conv_out|conv_norm_out|time_embedding_linear_[12])(.*)")
# longest first: "conv_shortcut" before "conv1"'s prefix rivals
_RESNET_PARTS = ("time_emb_proj", "conv_shortcut", "conv1", "conv2", "norm1", "norm2")


def _ldm(module: str, layout: str) -> str | None:
    """The Lora extension's key (LDM name, underscores) of a diffusers module; None if the layout lacks it."""
    try:
        ldm = layouts.unet_key_to_ldm(module + ".weight", layout)[: -len(".weight")]
    except BKSDMError:
        return None
    return "diffusion_model_" + ldm.replace(".", "_")


def lora_key_to_ldm(key: str, layout: str) -> str | None:
    """The Lora extension's module key for a diffusers-named U-Net LoRA key on `layout`; None when the
    key is not a diffusers U-Net name or names a block the layout removed."""
    if m := _BLOCK.fullmatch(key):
        blocks, stage, part, index, suffix = m.groups()
        module = f"{blocks}.{stage}.{part}.{index}" if blocks else f"mid_block.{part}.{index}"
        if part == "resnets":
            name = next((p for p in _RESNET_PARTS if suffix.startswith(p)), None)
            prefix = _ldm(f"{module}.{name}", layout) if name else None
            return prefix + suffix[len(name):] if prefix else None
        prefix = _ldm(f"{module}.proj_in", layout)  # any module of the attention block gives its place
        return prefix[: -len("proj_in")] + suffix if prefix else None
    if m := _SAMPLER.fullmatch(key):
        blocks, stage, samplers, rest = m.groups()
        prefix = _ldm(f"{blocks}.{stage}.{samplers}.0.conv", layout)
        return prefix + rest if prefix else None
    if m := _PLAIN.fullmatch(key):
        name, rest = m.groups()
        prefix = _ldm(name.replace("embedding_linear_", "embedding.linear_"), layout)
        return prefix + rest if prefix else None
    return None
