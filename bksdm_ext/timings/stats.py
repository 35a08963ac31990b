"""The comparison table: records grouped by device x checkpoint x sampler x steps x size.

Each group gives median and p90 seconds per image, median U-Net evaluations per second, median
per-step U-Net time, and the speed-up against a reference checkpoint measured under the same
conditions (same device, sampler, steps and size).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from statistics import median
from typing import Iterable

from ..errors import BKSDMError
from ..io import write_file
from .recorder import percentile
from .store import GenerationRecord

CONDITIONS = ("device", "sampler", "schedule", "steps", "size")  # what must match for a speed-up


@dataclass(frozen=True)
class GroupRow:
    device: str
    checkpoint: str
    layout: str
    sampler: str
    schedule: str
    steps: int
    size: str
    runs: int
    images: int
    s_per_image_median: float
    s_per_image_p90: float
    it_per_s_median: float | None
    unet_step_ms_median: float | None
    speedup: float | None = None  # reference s/image / this s/image


def size_of(record: GenerationRecord) -> str:
    return f"{record.width}x{record.height}"


def _key(record: GenerationRecord) -> tuple:
    return (record.device, record.checkpoint, record.layout, record.sampler, record.schedule, record.steps,
            size_of(record))


def _median_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return median(values) if values else None


def filter_records(records: Iterable[GenerationRecord], device: str | None = None,
                   checkpoints: Iterable[str] | None = None, sampler: str | None = None,
                   steps: int | None = None, size: str | None = None,
                   source: str | None = None) -> list[GenerationRecord]:
    """Records matching every filter given (None or empty: no filter)."""
    wanted = set(checkpoints or ())
    return [r for r in records
            if (not device or r.device == device) and (not wanted or r.checkpoint in wanted)
            and (not sampler or r.sampler == sampler) and (not steps or r.steps == int(steps))
            and (not size or size_of(r) == size) and (not source or r.source == source)]


def group(records: Iterable[GenerationRecord], reference: str | None = None) -> list[GroupRow]:
    """One row per device x checkpoint x sampler x schedule x steps x size, fastest first per condition."""
    groups: dict[tuple, list[GenerationRecord]] = {}
    for record in records:
        groups.setdefault(_key(record), []).append(record)
    rows = []
    for key, members in groups.items():
        per_image = [r.seconds_per_image for r in members]
        rows.append(GroupRow(
            *key, runs=len(members), images=sum(r.images for r in members),
            s_per_image_median=median(per_image), s_per_image_p90=percentile(per_image, 90),
            it_per_s_median=_median_of([r.it_per_s for r in members]),
            unet_step_ms_median=_median_of([r.unet_median_ms for r in members])))
    if reference:
        baseline = {tuple(getattr(row, f) for f in CONDITIONS): row.s_per_image_median
                    for row in rows if row.checkpoint == reference}
        rows = [GroupRow(**{**asdict(row), "speedup": _ratio(baseline.get(tuple(getattr(row, f) for f in CONDITIONS)),
                                                                 row.s_per_image_median)}) for row in rows]
    return sorted(rows, key=lambda r: (r.device, r.sampler, r.steps, r.size, r.s_per_image_median))


def _ratio(reference: float | None, value: float) -> float | None:
    return reference / value if reference is not None and value > 0 else None


COLUMNS = {  # GroupRow field -> column title
    "device": "device", "checkpoint": "checkpoint", "layout": "layout", "sampler": "sampler",
    "schedule": "schedule", "steps": "steps", "size": "size", "runs": "runs", "images": "images",
    "s_per_image_median": "s/image (median)", "s_per_image_p90": "s/image (p90)",
    "it_per_s_median": "it/s", "unet_step_ms_median": "U-Net ms/step", "speedup": "speed-up",
}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[GroupRow]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) with numbers formatted for display."""
    return list(COLUMNS.values()), [[_cell(getattr(row, f)) for f in COLUMNS] for row in rows]


def format_table(rows: list[GroupRow]) -> str:
    """A plain-text table for the terminal."""
    headers, cells = table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def rows_frame(rows: list[GroupRow]):
    """The grouped table as a pandas DataFrame (gr.Dataframe / gr.BarPlot input)."""
    import pandas as pd

    frame = pd.DataFrame([{title: getattr(row, f) for f, title in COLUMNS.items()} for row in rows],
                         columns=list(COLUMNS.values()))
    return frame.round(3)


def seconds_per_image_frame(rows: list[GroupRow]):
    """Bar-plot data: one bar per checkpoint (and condition) with its median s/image."""
    import pandas as pd

    return pd.DataFrame({
        "checkpoint": pd.Series([row.checkpoint for row in rows], dtype="string"),
        "s/image": pd.Series([row.s_per_image_median for row in rows], dtype="float64"),
        "condition": pd.Series([f"{row.sampler} {row.steps} steps {row.size}" for row in rows], dtype="string"),
    })  # typed columns: an empty plot then has types, not altair's "cannot infer" warning per empty column


def per_step_frame(records: list[GenerationRecord]):
    """Line-plot data: per-step U-Net time (median of each generation) in record order, per checkpoint."""
    import pandas as pd

    data = [(i, r.checkpoint, r.unet_median_ms) for i, r in enumerate(records) if r.unet_median_ms is not None]
    frame = pd.DataFrame(data, columns=["generation", "checkpoint", "U-Net ms/step"])
    return frame.astype({"generation": "int64", "checkpoint": "string", "U-Net ms/step": "float64"})


def save_plots_png(rows: list[GroupRow], records: list[GenerationRecord], path: str | os.PathLike) -> None:
    """Both plots side by side in one PNG (matplotlib), written atomically."""
    try:
        import matplotlib
    except ImportError as error:
        raise BKSDMError("PNG plots need matplotlib: `pip install matplotlib`, or see the plots in the "
                         "BK-SDM tab's Timings view.") from error

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r.checkpoint}\n{r.sampler} {r.steps} st {r.size}" for r in rows]
    bars.bar(range(len(rows)), [r.s_per_image_median for r in rows], color="tab:blue")
    bars.set_xticks(range(len(rows)), labels, fontsize=7)
    bars.set_ylabel("seconds per image (median)")
    bars.set_title("Seconds per image by checkpoint")
    steps = per_step_frame(records)
    for checkpoint, part in steps.groupby("checkpoint"):
        lines.plot(part["generation"], part["U-Net ms/step"], marker=".", label=checkpoint)
    lines.set_xlabel("generation")
    lines.set_ylabel("U-Net ms per step (median)")
    lines.set_title("Per-step U-Net time")
    if len(steps):
        lines.legend(fontsize=7)
    figure.tight_layout()
    try:
        write_file(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(figure)
