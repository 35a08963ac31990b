"""From per-image scores to the damage table, its bar chart (BK-SDM Fig. 19) and a proposed layout.

Damage of a unit: the mean teacher distance (bksdm_ext.evaluate.metrics.teacher_distance: pixel MSE of
the 256 px images in [0, 1]) between the teacher without the unit and the full teacher, at the same prompts and
seeds. Given a CLIP model, each unit also has its CLIP score (its images against their prompts; its drop is
against the full teacher's) and the teacher distance's CLIP image similarity. The proposal removes, greedily,
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
    clip_score: float | None = None  # mean CLIP score of its images against their prompts
    clip_image_similarity: float | None = None  # mean CLIP cosine of its images to the teacher's


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rows(scores: dict[str, list[dict[str, float]]], stand_ins: dict[str, str], parameters: dict[str, int],
         ) -> list[Row]:
    """The table, most harmless first. `scores`: per unit, each image's {"pixel_mse", and with CLIP
    "clip_score", "clip_image_similarity"}."""
    out = []
    for unit, values in scores.items():
        mse = [v["pixel_mse"] for v in values]
        mean = _mean(mse)
        spread = math.sqrt(sum((v - mean) ** 2 for v in mse) / len(mse))
        clip = {name: _mean([v[name] for v in values]) if all(name in v for v in values) else None
                for name in ("clip_score", "clip_image_similarity")}
        out.append(Row(unit, stand_ins[unit], parameters[unit], mean, spread, len(values), **clip))
    return sorted(out, key=lambda r: (r.damage, r.unit))


def write_table(table: list[Row], path: Path, teacher_clip_score: float | None = None) -> Path:
    """The table as csv; with a CLIP model (`teacher_clip_score`, the full teacher's) also each unit's CLIP
    score, its drop from the teacher's and the CLIP image similarity to the teacher's images."""
    from ..io import write_text

    clip = teacher_clip_score is not None
    lines: list[list] = [["unit", "stand_in", "parameters_removed", "damage_pixel_mse", "std", "images"]
                         + (["clip_score", "clip_score_drop", "clip_image_similarity"] if clip else [])]
    for r in table:
        lines.append([r.unit, r.stand_in, r.parameters, f"{r.damage:.6g}", f"{r.spread:.3g}", r.images]
                     + ([f"{r.clip_score:.6g}", f"{teacher_clip_score - r.clip_score:.6g}",
                         f"{r.clip_image_similarity:.6g}"] if clip else []))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    return write_text(path, buffer.getvalue())


def format_table(table: list[Row], teacher_clip_score: float | None = None) -> str:
    clip = teacher_clip_score is not None
    head = (f"{'rank':>4}  {'unit':<16}{'stand-in':<23}{'params':>13}{'damage (MSE)':>14}{'std':>10}"
            + (f"{'CLIP drop':>11}{'CLIP sim.':>11}" if clip else ""))
    return "\n".join([head] + [f"{i:>4}  {r.unit:<16}{r.stand_in:<23}{r.parameters:>13,}{r.damage:>14.5f}"
                               f"{r.spread:>10.4f}" + (f"{teacher_clip_score - r.clip_score:>11.4f}"
                                                       f"{r.clip_image_similarity:>11.4f}" if clip else "")
                               for i, r in enumerate(table, 1)])


# a group's stand-ins are joined sorted (job.py): a pair of a stage can mix both
_COLOURS = {"identity": "#4c72b0", "channel interpolation": "#dd8452", "none": "#55a868",
            "channel interpolation + identity": "#8172b3"}


def bar_chart(table: list[Row], path: Path, title: str, teacher_clip_score: float | None = None) -> Path:
    """Damage per unit as bars in the network's order (down, mid, up, inner), as Fig. 19; with CLIP
    (`teacher_clip_score`) a second panel below: each unit's CLIP score drop from the full teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .blocks import elementary_units

    order = {name: i for i, name in enumerate(elementary_units())}
    shown = sorted(table, key=lambda r: (order.get(r.unit.split("+")[0], 99), r.unit))
    colours = [_COLOURS[r.stand_in] for r in shown]
    panels = 1 if teacher_clip_score is None else 2
    figure, axes = plt.subplots(panels, 1, squeeze=False, sharex=True, dpi=100,
                                figsize=(max(6.0, 0.36 * len(shown)), 4.0 + 2.5 * (panels - 1)))
    axes = axes[:, 0]
    axes[0].bar(range(len(shown)), [r.damage for r in shown], color=colours)
    axes[0].set_ylabel("damage: pixel MSE to the teacher")
    axes[0].set_title(title, fontsize=10)
    if teacher_clip_score is not None:
        axes[1].bar(range(len(shown)), [teacher_clip_score - r.clip_score for r in shown], color=colours)
        axes[1].axhline(0.0, color="black", linewidth=0.6)
        axes[1].set_ylabel(f"CLIP score drop\n(teacher: {teacher_clip_score:.4f})", fontsize=8)
    axes[-1].set_xticks(range(len(shown)), [r.unit for r in shown], rotation=70, fontsize=8)
    for kind in dict.fromkeys(r.stand_in for r in shown):
        axes[0].bar([], [], color=_COLOURS[kind], label=kind)
    axes[0].legend(title="in its place", fontsize=8)
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
        if not self.removed:  # e.g. `units` scored no removal a layout can make
            return ["No layout to propose: none of the scored units can be removed as a layout (the mid block, the "
                    "innermost stage, or a down pair together with an up block of its stage). Score those units."]
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
