"""The removable units of an SD teacher and the teacher without one (BK-SDM App. C).

A unit is an R(+A) pair of a down stage (`down1.0`: stage 1, pair 0), a block of an up stage
(`up2.2`), the mid block (`mid`) or the whole innermost stage (`inner`); a group removes several.
Without a unit the U-Net keeps its skip connections: where the removed block's input and output
channels agree it becomes an identity, else a channel-interpolation module stands in for it (the
paper's way: the channel axis is linearly resampled to the output width). Up blocks always need one,
their input being the concatenation with a skip. The innermost stage goes as a layout does
(`layouts`' `inner=no`), the mid block by having none; both are loadable layouts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import layouts
from ..errors import BKSDMError


@dataclass(frozen=True)
class Unit:
    """One removable block, or a group of them (`parts`), of the teacher."""

    name: str
    parts: tuple[str, ...]  # elementary unit names: "down1.0", "up3.2", "mid", "inner"

    @property
    def is_group(self) -> bool:
        return len(self.parts) > 1


def _parse(part: str) -> tuple[str, int, int]:
    side, _, rest = part.partition(".")
    return side[:-1], int(side[-1]), int(rest)


def _channels(config: dict) -> list[int]:
    return list(config["block_out_channels"])


def block_inputs(config: dict, part: str) -> tuple[int, int]:
    """(input channels, output channels) of an elementary down or up unit of the teacher."""
    side, stage, index = _parse(part)
    channels = _channels(config)
    own = channels[stage]
    before = channels[stage - 1] if stage else channels[0]
    if side == "down":
        return (before if index == 0 else own), own
    below = channels[stage + 1] if stage + 1 < len(channels) else channels[-1]
    top = layouts.TEACHER_PAIRS
    return (below if index == 0 else own) + (before if index == top else own), own


def stand_in(config: dict, part: str) -> str:
    """What takes a removed unit's place: 'identity', 'channel interpolation', or 'none' (mid, inner)."""
    if part in ("mid", "inner"):
        return "none"
    channels_in, channels_out = block_inputs(config, part)
    return "identity" if channels_in == channels_out else "channel interpolation"


def elementary_units() -> list[str]:
    """Every single unit of SD's U-Net, outer to inner down, the mid block, then up, inner last."""
    down = [f"down{s}.{j}" for s in range(layouts.TEACHER_STAGES) for j in range(layouts.TEACHER_PAIRS)]
    up = [f"up{s}.{j}" for s in reversed(range(layouts.TEACHER_STAGES)) for j in range(layouts.TEACHER_PAIRS + 1)]
    return down + ["mid"] + up + ["inner"]


def units(groups: str = "single") -> list[Unit]:
    """The units to score: single blocks; with 'pairs' also each two neighbours of one stage and side."""
    singles = [Unit(name, (name,)) for name in elementary_units()]
    if groups == "single":
        return singles
    if groups != "pairs":
        raise BKSDMError(f"groups must be single or pairs, not {groups!r}.")
    pairs = []
    for a, b in zip(singles, singles[1:]):
        if "." in a.name and "." in b.name and a.name.split(".")[0] == b.name.split(".")[0]:
            pairs.append(Unit(f"{a.name}+{b.name}", (a.name, b.name)))
    return singles + pairs


class ChannelInterpolation(torch.nn.Module):
    """Stands in for a removed block whose input and output channels differ (BK-SDM App. C):
    the channel axis of each pixel is linearly resampled to `out_channels`."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, hidden_states, *args, **kwargs):
        b, c, h, w = hidden_states.shape
        if c == self.out_channels:
            return hidden_states
        pixels = hidden_states.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
        resampled = F.interpolate(pixels.float(), size=self.out_channels, mode="linear", align_corners=True)
        return resampled.to(hidden_states.dtype).reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)


class PassThrough(torch.nn.Module):
    """A removed attention block: diffusers' blocks call it with return_dict=False and take [0]."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


def _block(unet, part: str):
    side, stage, _ = _parse(part)
    return unet.down_blocks[stage] if side == "down" else unet.up_blocks[layouts.TEACHER_STAGES - 1 - stage]


def without_inner(unet):
    """The teacher without its innermost stage: the `inner=no` layout on the teacher's own tensors (shared)."""
    from diffusers import UNet2DConditionModel

    from ..student import student_state_dict

    lay = layouts.get_layout("inner=no")
    config = layouts.student_unet_config(dict(unet.config), lay)
    with torch.device("meta"):
        student = UNet2DConditionModel(**config)
    state = student_state_dict(unet.state_dict(), student.state_dict().keys(), lay)
    student.load_state_dict(state, strict=True, assign=True)
    return student.eval()


@contextmanager
def removed(unet, unit: Unit):
    """The teacher `unet` without `unit`, for the duration of the block (modules swapped, then put back)."""
    config = dict(unet.config)
    if len(config["down_block_types"]) != layouts.TEACHER_STAGES or config["layers_per_block"] != layouts.TEACHER_PAIRS:
        raise BKSDMError("The sensitivity analysis runs on a standard SD-1.x/2.x teacher (4 stages, 2 pairs a stage).")
    swaps = []  # (module, attribute or index, original)
    model = unet
    try:
        for part in unit.parts:
            if part == "inner":
                if unit.is_group:
                    raise BKSDMError("The innermost stage is scored alone, not in a group.")
                model = without_inner(unet)
            elif part == "mid":
                swaps.append((unet, "mid_block", unet.mid_block))
                unet.mid_block = None
            else:
                block, index = _block(unet, part), _parse(part)[2]
                swaps.append((block.resnets, index, block.resnets[index]))
                block.resnets[index] = ChannelInterpolation(block_inputs(config, part)[1])
                if getattr(block, "attentions", None) is not None and index < len(block.attentions):
                    swaps.append((block.attentions, index, block.attentions[index]))
                    block.attentions[index] = PassThrough()
        yield model
    finally:
        for holder, key, original in reversed(swaps):
            if isinstance(key, str):
                setattr(holder, key, original)
            else:
                holder[key] = original


def removed_parameters(unet, unit: Unit) -> int:
    """Parameters of the teacher that removing `unit` takes away."""
    if unit.parts == ("inner",):
        return sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in without_inner(unet).parameters())
    total = 0
    for part in unit.parts:
        if part == "mid":
            total += sum(p.numel() for p in unet.mid_block.parameters())
            continue
        block, index = _block(unet, part), _parse(part)[2]
        total += sum(p.numel() for p in block.resnets[index].parameters())
        if getattr(block, "attentions", None) is not None and index < len(block.attentions):
            total += sum(p.numel() for p in block.attentions[index].parameters())
    return total
