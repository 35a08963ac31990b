"""The built-in Hypertile (WebUI 1.7+) on a BK model: its attention layers by the layout's stages.

Hypertile tiles the self-attention of the layers it lists per depth (resolution stage) in
`hypertile.DEPTH_LAYERS`, by SD's block numbers; on a BK layout those names are other blocks at
other depths (BK's `output_blocks.6` is a depth-0 block, SD's a depth-1 one). While it hooks a BK
U-Net, the table it reads is the layout's own, derived from the key map.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from .. import layouts
from .patching import wrap


@lru_cache(maxsize=None)
def depth_layers(layout: str) -> dict[int, list[str]]:
    """Hypertile's table for `layout`: depth -> the LDM self-attention layers of that stage."""
    lay = layouts.get_layout(layout)
    table: dict[int, list[str]] = {depth: [] for depth in range(layouts.TEACHER.stages)}
    for diffusers, ldm in layouts.unet_prefix_map(layout):
        parts = diffusers.split(".")
        if "attentions" not in parts:
            continue
        if parts[0] == "down_blocks":
            depth = int(parts[1])
        elif parts[0] == "up_blocks":
            depth = lay.stages - 1 - int(parts[1])
        else:  # the middle block, at the innermost stage's resolution
            depth = lay.stages - 1
        table[depth].append(f"diffusion_model.{ldm}transformer_blocks.0.attn1")
    return table


def install(hypertile, current_layout: Callable[[], str | None]) -> None:
    """Wrap `hypertile.hypertile_hook_model` so that a BK U-Net is hooked by its layout's table."""

    def make(original):
        def hypertile_hook_model(model, *args, **kwargs):
            layout = current_layout()
            if layout is None or not hasattr(model, "diffusion_model") or kwargs.get("is_sdxl"):
                return original(model, *args, **kwargs)
            sd_table = hypertile.DEPTH_LAYERS
            hypertile.DEPTH_LAYERS = depth_layers(layout)
            try:
                return original(model, *args, **kwargs)
            finally:
                hypertile.DEPTH_LAYERS = sd_table

        return hypertile_hook_model

    wrap(hypertile, "hypertile_hook_model", make)
