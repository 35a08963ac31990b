"""From per-image scores to the damage table, its bar chart (BK-SDM Fig. 19) and a proposed layout.

Damage of a unit: the mean teacher distance (bksdm_ext.evaluate.metrics.teacher_distance: pixel MSE of
the 256 px images in [0, 1]) between the teacher without the unit and the full teacher, at the same prompts and seeds. The proposal removes, greedily,
what hurts least among the removals a loader can build (layouts of SD's blocks, no stand-ins): the mid
block, the innermost stage, or a down pair of a stage together with one of its up blocks (a layout's
up stage has one block more than its down stage), scored as the sum of the two blocks' damages.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import detect, layouts
from ..errors import BKSDMError


@dataclass(frozen=True)
class Row:
    unit: str
    stand_in: str
    parameters: int  # removed
    damage: float  # mean teacher distance
    spread: float  # standard deviation over prompts and seeds
    images: int


def rows(scores: dict[str, list[float]], stand_ins: dict[str, str], parameters: dict[str, int]) -> list[Row]:
    """The table, most harmless first."""
    out = []
    for unit, values in scores.items():
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out.append(Row(unit, stand_ins[unit], parameters[unit], mean, spread, len(values)))
    return sorted(out, key=lambda r: (r.damage, r.unit))


def write_table(table: list[Row], path: Path) -> Path:
    from ..io import write_text

    lines: list[list] = [["unit", "stand_in", "parameters_removed", "damage_pixel_mse", "std", "images"]]
    lines += [[r.unit, r.stand_in, r.parameters, f"{r.damage:.6g}", f"{r.spread:.3g}", r.images] for r in table]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    return write_text(path, buffer.getvalue())


def format_table(table: list[Row]) -> str:
    head = f"{'rank':>4}  {'unit':<16}{'stand-in':<23}{'params':>13}{'damage (MSE)':>14}{'std':>10}"
    return "\n".join([head] + [f"{i:>4}  {r.unit:<16}{r.stand_in:<23}{r.parameters:>13,}{r.damage:>14.5f}"
                               f"{r.spread:>10.4f}" for i, r in enumerate(table, 1)])


_COLOURS = {"identity": "#4c72b0", "channel interpolation": "#dd8452", "none": "#55a868"}


def bar_chart(table: list[Row], path: Path, title: str) -> Path:
    """Damage per unit as bars in the network's order (down, mid, up, inner), as Fig. 19."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .blocks import elementary_units

    order = {name: i for i, name in enumerate(elementary_units())}
    shown = sorted(table, key=lambda r: (order.get(r.unit.split("+")[0], 99), r.unit))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.36 * len(shown)), 4.0), dpi=100)
    axes.bar(range(len(shown)), [r.damage for r in shown], color=[_COLOURS[r.stand_in] for r in shown])
    axes.set_xticks(range(len(shown)), [r.unit for r in shown], rotation=70, fontsize=8)
    axes.set_ylabel("damage: pixel MSE to the teacher")
    axes.set_title(title, fontsize=10)
    for kind, colour in _COLOURS.items():
        axes.bar([], [], color=colour, label=kind)
    axes.legend(title="in its place", fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path


# --- the proposal -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    spec: str  # a layout `bksdm prune --keep` accepts
    parameters: int
    teacher_parameters: int
    removed: tuple[str, ...]  # the moves, in the order taken
    damage: float  # the sum of their damages
    reached: bool  # whether the target size was reached

    def lines(self) -> list[str]:
        share = self.parameters / self.teacher_parameters
        head = (f"Proposed layout: {self.spec} ({self.parameters:,} U-Net parameters, {share:.1%} of the teacher), "
                f"estimated damage {self.damage:.5f}.")
        steps = [f"  removed {move}" for move in self.removed]
        tail = [] if self.reached else ["  The target size was not reached: nothing else can be removed as a layout."]
        return [head] + steps + tail + [f"Build it: bksdm prune TEACHER OUT --keep '{self.spec}'"]


def _spec(down_from, up_from, mid) -> str:
    def lists(x):
        return ",".join("".join(map(str, d)) for d in x)

    return f"down_from={lists(down_from)} up_from={lists(up_from)} mid={'yes' if mid else 'no'}"


def _parameters(teacher_config: dict, spec: str) -> int:
    config = layouts.student_unet_config(teacher_config, spec)
    return sum(math.prod(shape) for shape in detect.expected_shapes(config).values())


def _valid(spec: str, channels) -> bool:
    try:
        layouts.validate(layouts.get_layout(spec), channels=channels)
    except BKSDMError:
        return False
    return True


def propose(damage: dict[str, float], teacher_config: dict, target_fraction: float) -> Proposal:
    """Remove what hurts least, move by move, until the U-Net has at most `target_fraction` of the teacher's
    parameters. Only single-unit damages are used; a move needs every unit it removes to be scored."""
    channels = tuple(teacher_config["block_out_channels"])
    teacher = layouts.TEACHER
    down = [list(d) for d in teacher.down_from]
    up = [list(u) for u in teacher.up_from]
    mid, taken, total = True, [], 0.0
    teacher_parameters = sum(math.prod(s) for s in detect.expected_shapes(
        {k: v for k, v in teacher_config.items() if not k.startswith("_")}).values())
    while True:
        spec = _spec(down, up, mid)
        size = _parameters(teacher_config, spec)
        if size <= target_fraction * teacher_parameters:
            return Proposal(layouts.get_layout(spec).name, size, teacher_parameters, tuple(taken), total, True)
        moves = []  # (damage, description, down, up, mid)
        if mid and "mid" in damage:
            moves.append((damage["mid"], "mid", down, up, False))
        if len(down) == layouts.TEACHER_STAGES and "inner" in damage:
            moves.append((damage["inner"], "inner", down[:-1], up[:-1], mid))
        for stage, (kept_down, kept_up) in enumerate(zip(down, up)):
            if len(kept_down) < 2:
                continue
            for j in kept_down:
                for k in kept_up:
                    names = (f"down{stage}.{j}", f"up{stage}.{k}")
                    if not all(n in damage for n in names):
                        continue
                    new_down = [list(d) for d in down]
                    new_up = [list(u) for u in up]
                    new_down[stage].remove(j)
                    new_up[stage].remove(k)
                    moves.append((damage[names[0]] + damage[names[1]], " + ".join(names), new_down, new_up, mid))
        moves = [m for m in moves if _valid(_spec(m[2], m[3], m[4]), channels)]
        if not moves:
            return Proposal(layouts.get_layout(spec).name, size, teacher_parameters, tuple(taken), total, False)
        cost, name, down, up, mid = min(moves, key=lambda m: (m[0], m[1]))
        taken.append(f"{name} (damage {cost:.5f})")
        total += cost
