"""ControlNet residuals on BK-SDM layouts (a pure map; the WebUI hook is `webui/controlnet.py`).

An SD ControlNet gives 13 residuals, in SD's order: one per input block (`input_blocks.0` to `.11`),
each added to that block's skip connection, and one for the middle block. On a BK layout each
residual goes to the skip of the student input block copied from that teacher block; those of
removed blocks are dropped, and so is the middle one where the student has no middle block.
Index-based control scales (soft injection, advanced weighting) are per SD residual, so they follow
through the same map.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .. import layouts
from ..errors import BKSDMError

SD_RESIDUALS = 13  # 12 input blocks + the middle block
MIDDLE = 12


@lru_cache(maxsize=None)
def residual_sources(layout: str) -> tuple[tuple[int, ...], int | None]:
    """(for each LDM input block of `layout`, the SD input block it was copied from; the middle's
    residual index, or None when the layout has no middle block)."""
    teacher_ldm = dict(layouts.unet_prefix_map("teacher"))
    sources: dict[int, set[int]] = {}
    middle = None
    for diffusers, ldm in layouts.unet_prefix_map(layout):
        if ldm.startswith("middle_block."):
            middle = MIDDLE
        if not ldm.startswith("input_blocks."):
            continue
        teacher = teacher_ldm[layouts.teacher_key(diffusers, layout)]
        sources.setdefault(int(ldm.split(".")[1]), set()).add(int(teacher.split(".")[1]))
    if any(len(s) != 1 for s in sources.values()) or sorted(sources) != list(range(len(sources))):
        raise BKSDMError(f"The {layout} layout's input blocks do not each come from one SD input block.")
    return tuple(sources[j].pop() for j in range(len(sources))), middle


def dropped_residuals(layout: str) -> tuple[int, ...]:
    """The SD residual indices that have no block on `layout`."""
    inputs, middle = residual_sources(layout)
    kept = set(inputs) | ({middle} if middle is not None else set())
    return tuple(i for i in range(SD_RESIDUALS) if i not in kept)


def route(residuals: Sequence, layout: str) -> tuple[list, object | None]:
    """SD-ordered residuals (or per-residual scales) -> (one per input block of `layout`, the middle's
    or None)."""
    if len(residuals) != SD_RESIDUALS:
        raise BKSDMError(f"An SD ControlNet gives {SD_RESIDUALS} residuals, this one {len(residuals)}: only SD-1.x/2.x "
                         "ControlNets can be placed on BK-SDM.")
    inputs, middle = residual_sources(layout)
    return [residuals[i] for i in inputs], (residuals[middle] if middle is not None else None)
