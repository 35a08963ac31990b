"""The Models view's data: each BK checkpoint in the WebUI's list, its size and compute against SD, and
its measured speed (no WebUI import; the tab and `GET /bksdm/v1/models` draw it).

Everything about a file comes from its safetensors header (no weights are read): the layout from the
U-Net's key shapes, the version from our metadata or the yaml our converter writes beside it, the U-Net
parameters by counting the header's shapes. MACs belong to the layout and version, not the file: they are
counted once per layout (`report.layout_cost`, thop, at the version's native size). Speed is the timing
store's median seconds per image under the condition the checkpoint was measured most often, with the
speed-up against a standard SD checkpoint measured under the same condition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from .. import detect, layouts
from ..errors import BKSDMError
from ..ldm_config import ldm_model_config, render
from ..timings import stats
from .decide import UNET_PREFIX, check, header_tensors, is_bk_candidate, not_a_checkpoint


@dataclass(frozen=True)
class ModelRow:
    checkpoint: str  # the WebUI's title
    layout: str
    layout_title: str
    version: str  # "v2" when neither metadata nor a yaml tells v2-base from v2-768
    unet_parameters: int
    sd_unet_parameters: int
    unet_macs: float  # per U-Net forward, batch 1, at the version's native size
    sd_unet_macs: float
    s_per_image: float | None = None  # measured median, under `measured`
    measured: str = ""  # the condition, e.g. "DPM++ 2M Karras, 20 steps, 512x512, cpu (5 images)"
    speedup: float | None = None  # SD's s/image under the same condition / this one's
    problem: str | None = None  # why the WebUI refuses to load it, when it does

    @property
    def parameter_ratio(self) -> float:
        return self.unet_parameters / self.sd_unet_parameters

    @property
    def macs_ratio(self) -> float:
        return self.unet_macs / self.sd_unet_macs

    def as_dict(self) -> dict:
        return {**asdict(self), "parameter_ratio": self.parameter_ratio, "macs_ratio": self.macs_ratio}


def _layout_cost(layout: str, version: str):
    from ..report import layout_cost

    return layout_cost(layout, version, layouts.get_version(version).sample_size)


def file_version(detection: detect.UNetDetection, filename: str, metadata: dict) -> str:
    """The version as far as the file tells without running it (SD2's 512/768 px share shapes)."""
    try:
        return detect.resolve_version(detection, {}, metadata).version if detection.family == "v1" or metadata.get(
            "bksdm.version") or metadata.get("bksdm.prediction_type") else _yaml_version(detection, filename)
    except BKSDMError:
        return _yaml_version(detection, filename)


def _yaml_version(detection: detect.UNetDetection, filename: str) -> str:
    yaml = Path(filename).with_suffix(".yaml")
    text = yaml.read_text() if yaml.is_file() else None
    for version in layouts.VERSIONS:
        if layouts.get_version(version).family == detection.family and text == render(
                ldm_model_config(detection.layout, version), detection.layout, version):
            return version
    return detection.family


def describe(title: str, filename: str, cost=_layout_cost) -> ModelRow | None:
    """The row of one listed checkpoint, or None for anything that is not a BK checkpoint (SD itself,
    SDXL, an unreadable or non-checkpoint file: the WebUI's own list and our preflight deal with those)."""
    if not str(filename).lower().endswith(".safetensors"):
        return None  # .ckpt headers cannot be read without unpickling; our converter writes safetensors
    try:
        tensors, metadata = header_tensors(filename)
        if not_a_checkpoint(tensors) or not is_bk_candidate(tensors):
            return None
        detection = detect.detect_unet(tensors, metadata)  # the metadata names a pruned (custom) layout
    except BKSDMError:
        return None
    if detection.layout == "teacher" or detection.naming != "ldm":
        return None
    try:
        check(tensors, metadata)
        problem = None
    except BKSDMError as error:
        problem = str(error)
    version = file_version(detection, filename, metadata)
    counted = version if version in layouts.VERSIONS else "v2-base"  # undecided v2: count it at 512 px
    ours, sd = cost(detection.layout, counted), cost("teacher", counted)
    parameters = sum(t.numel() for k, t in tensors.items() if k.startswith(UNET_PREFIX))
    return ModelRow(title, detection.layout, layouts.get_layout(detection.layout).title, version, parameters,
                    sd.parameters, ours.macs, sd.macs, problem=problem)


def _condition(row: stats.GroupRow) -> str:
    sampler = f"{row.sampler} {row.schedule}" if row.schedule and row.schedule != "Automatic" else row.sampler
    return f"{sampler}, {row.steps} steps, {row.size}, {row.device or 'unknown device'} ({row.images} images)"


def with_speed(row: ModelRow, stem: str, groups: list[stats.GroupRow]) -> ModelRow:
    """`row` with the measured seconds per image of checkpoint `stem` (the timing store's name for it)."""
    ours = [g for g in groups if g.checkpoint == stem]
    if not ours:
        return row
    best = max(ours, key=lambda g: (g.images, -g.s_per_image_median))
    same = [g for g in groups if g.layout == "sd" and all(getattr(g, f) == getattr(best, f) for f in stats.CONDITIONS)]
    reference = max(same, key=lambda g: g.images) if same else None
    speedup = reference.s_per_image_median / best.s_per_image_median if reference and best.s_per_image_median else None
    return ModelRow(**{**asdict(row), "s_per_image": best.s_per_image_median, "measured": _condition(best),
                       "speedup": speedup})


def models_view(checkpoints: Iterable[tuple[str, str]], records: Iterable = (),
                cost: Callable = _layout_cost) -> list[ModelRow]:
    """One row per BK checkpoint among `checkpoints` ((title, filename) pairs, as the WebUI lists them),
    in list order, with speed from the timing `records` (GenerationRecords) when there are any."""
    groups = stats.group(records)
    rows = []
    for title, filename in checkpoints:
        row = describe(title, filename, cost)
        if row is not None:
            rows.append(with_speed(row, Path(filename).stem, groups))
    return rows
