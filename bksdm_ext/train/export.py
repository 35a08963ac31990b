"""A finished job's model: a diffusers folder and, made from it by the converter, the WebUI checkpoint + yaml."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..convert import convert
from ..errors import BKSDMError
from ..io import folder_bytes
from ..pipeline_folder import write_student_folder


def output_dir(job) -> Path:
    return Path(job.config.output_dir) if job.config.output_dir else job.job_dir / "output"


def check_output_free(job, name: str) -> None:
    """Refuse, before training, to overwrite a model outside the job folder."""
    out = output_dir(job)
    if job.config.output_dir:
        taken = [p for p in (out / name, out / f"{name}.safetensors") if p.exists()]
        if taken:
            raise BKSDMError(f"{taken[0]} already exists: choose another output_name or output_dir.")


def model_bytes(root: Path, *trained: torch.nn.Module) -> int:
    """About what `export_model` writes: the pipeline folder (trained parts in fp32) and its single file.

    `trained`: the U-Net, then the text encoder when it was trained too (they replace root's folders).
    """
    replaced = ("unet", "text_encoder")[: len(trained)]
    kept = folder_bytes(root, skip=replaced) if root is not None else 0
    return 2 * (kept + sum(4 * p.numel() for m in trained for p in m.parameters()))


def export_model(job, unet, root: Path, name: str, text_encoder=None, metadata: dict[str, str] | None = None) -> Path:
    """Write `name/` (the pipeline at `root` with the trained parts swapped in) and `name.safetensors` + yaml.

    Returns the single-file checkpoint (with `metadata` in its header). Weights are written in fp32,
    whatever the training precision.
    """
    out = output_dir(job)
    out.mkdir(parents=True, exist_ok=True)
    folder, single = out / name, out / f"{name}.safetensors"
    if not job.config.output_dir:  # the job's own output/ belongs to this job: a rerun replaces it
        shutil.rmtree(folder, ignore_errors=True)
        for stale in (single, single.with_suffix(".yaml")):
            stale.unlink(missing_ok=True)
    write_student_folder(_fp32(unet), folder, root)
    if text_encoder is not None:
        tmp = folder / ".text_encoder.partial"
        _fp32(text_encoder).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(folder / "text_encoder", ignore_errors=True)
        os.replace(tmp, folder / "text_encoder")
    for line in convert(folder, single, extra_metadata=metadata):
        job.say(line)
    return single


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """fp32 in the standard memory format (safetensors stores contiguous tensors only)."""
    return module.to(dtype=torch.float32, memory_format=torch.contiguous_format)
