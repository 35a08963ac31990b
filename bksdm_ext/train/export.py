"""A finished job's model: a diffusers folder and, made from it by the converter, the WebUI checkpoint + yaml.

Where each goes is `job.Outputs`: the diffusers copy always in the job's output/, never in the WebUI's
models folder (whose list would show its unet/ and vae/ files as checkpoints).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..convert import convert
from ..errors import BKSDMError
from ..io import folder_bytes
from ..job import Outputs
from ..pipeline_folder import write_student_folder


def output_dir(job) -> Path:
    return Path(job.config.output_dir) if job.config.output_dir else job.job_dir / "output"


def outputs(job, name: str) -> Outputs:
    return Outputs(job.job_dir, job.config.output_dir, name)


def check_output_free(job, name: str) -> None:
    """Refuse, before training, to overwrite a model outside the job folder."""
    if job.config.output_dir:
        taken = [p for p in (outputs(job, name).single,) if p.exists()]
        if taken:
            raise BKSDMError(f"{taken[0]} already exists: choose another output_name or output_dir.")


def model_bytes(root: Path, *trained: torch.nn.Module) -> int:
    """About what `export_model` writes: the pipeline folder (trained parts in fp32) and its single file.

    `trained`: the U-Net, then the text encoder when it was trained too (they replace root's folders).
    """
    replaced = ("unet", "text_encoder")[: len(trained)]
    kept = folder_bytes(root, skip=replaced) if root is not None else 0
    return 2 * (kept + sum(4 * p.numel() for m in trained for p in m.parameters()))


def export_model(job, unet, root: Path, name: str, text_encoder=None) -> Path:
    """Write `name/` (the pipeline at `root` with the trained parts swapped in) and `name.safetensors` + yaml.

    Returns the single-file checkpoint. Weights are written in fp32, whatever the training precision.
    """
    places = outputs(job, name)
    folder, single = places.diffusers, places.single
    for path in (folder.parent, single.parent):
        path.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # the job's own output/ belongs to this job: a rerun replaces it
    if not job.config.output_dir:
        for stale in (single, single.with_suffix(".yaml")):
            stale.unlink(missing_ok=True)
    write_student_folder(_fp32(unet), folder, root)
    if text_encoder is not None:
        tmp = folder / ".text_encoder.partial"
        _fp32(text_encoder).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(folder / "text_encoder", ignore_errors=True)
        os.replace(tmp, folder / "text_encoder")
    for line in convert(folder, single):
        job.say(line)
    return single


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """fp32 in the standard memory format (safetensors stores contiguous tensors only)."""
    return module.to(dtype=torch.float32, memory_format=torch.contiguous_format)
