"""What a checkpoint file or diffusers folder holds: layout, version and how it was decided,
parameters and dtypes per component, and how its U-Net keys compare with the layout's."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import io, layouts
from .convert import describe_mismatch, folder_metadata
from .convert.checkpoint import TEXT_PREFIX, VAE_PREFIX
from .detect import UNetDetection, VersionDecision, detect_unet, resolve_version
from .errors import BKSDMError


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    form: str
    detection: UNetDetection
    decision: VersionDecision | None
    version_problem: str  # why the version is unknown, when it is
    parameters: dict[str, int]  # floating-point tensor elements, by component
    dtypes: dict[str, dict[str, int]]  # component -> dtype -> tensors
    metadata: dict[str, str]

    def lines(self) -> list[str]:
        det = self.detection
        where = f"under '{det.prefix}'" if det.prefix else "without prefix"
        version = (f"{self.decision.version} (decided by {self.decision.source})" if self.decision
                   else f"unknown: {self.version_problem}")
        check = "complete, every key and shape as expected" if det.complete else describe_mismatch(det, limit=5)
        out = [
            f"{self.path} ({self.form})",
            f"layout:      {det.layout} ({layouts.get_layout(det.layout).title}), {det.naming} key names {where}",
            f"version:     {version}",
            f"channels:    {', '.join(map(str, det.channels))}; cross-attention dim {det.cross_attention_dim}",
            "parameters:  " + ", ".join(f"{name} {count:,}" for name, count in self.parameters.items()),
            "dtypes:      " + "; ".join(f"{name} " + ", ".join(f"{d} ({n})" for d, n in kinds.items())
                                        for name, kinds in self.dtypes.items()),
            f"key check:   {check}",
        ]
        out += [f"metadata:    {k} = {v}" for k, v in sorted(self.metadata.items()) if k != "bksdm.diffusers_configs"]
        return out


def _components(tensors: dict, detection: UNetDetection) -> dict[str, dict]:
    if not detection.prefix:
        return {"unet": tensors}
    parts: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}, "other": {}}
    for key, value in tensors.items():
        name = ("unet" if key.startswith(detection.prefix) else "vae" if key.startswith(VAE_PREFIX)
                else "text_encoder" if key.startswith(TEXT_PREFIX) else "other")
        parts[name][key] = value
    return {name: part for name, part in parts.items() if part}


def model_info(path: str | os.PathLike) -> ModelInfo:
    path = Path(path)
    if path.is_dir():
        folder = io.read_diffusers_folder(path)
        parts, metadata, scheduler = folder.weights, folder_metadata(folder.configs), folder.configs.get("scheduler")
        unet_tensors = parts["unet"]
        form = "diffusers pipeline folder" if folder.is_pipeline else "diffusers U-Net folder"
    else:
        unet_tensors, metadata = io.read_weights(path)
        parts, scheduler, form = None, None, f"single file, {path.suffix[1:]}"
    detection = detect_unet(unet_tensors, metadata)
    parts = parts or _components(unet_tensors, detection)
    try:
        decision, problem = resolve_version(detection, unet_tensors, metadata, scheduler), ""
    except BKSDMError as error:
        decision, problem = None, str(error)
    return ModelInfo(
        path, form, detection, decision, problem,
        {name: sum(t.numel() for t in part.values() if t.is_floating_point()) for name, part in parts.items()},
        {name: dict(Counter(str(t.dtype).removeprefix("torch.") for t in part.values()))
         for name, part in parts.items()},
        {k: v for k, v in metadata.items() if k.startswith("bksdm.")},
    )
