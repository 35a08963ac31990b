"""A finished job's model: a diffusers folder and, made from it by the converter, the WebUI checkpoint + yaml.

Where each goes is `bksdm_ext.job.Outputs`: the diffusers copy stays in the job folder, the single file
and its yaml go to output_dir (the WebUI's models folder) when one is set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..convert import convert
from ..io import folder_bytes, new_folder
from ..job import Outputs
from ..pipeline_folder import write_student_folder


def outputs(job, name: str) -> Outputs:
    """Where the job's model called `name` goes (`bksdm_ext.job.Outputs`)."""
    return Outputs(job.folder, job.config.output_dir, name)


def output_dir(job) -> Path:
    """The folder of the single-file checkpoint (the config's output_dir, or the job's output/)."""
    return Outputs(job.folder, job.config.output_dir).dir


def check_output_free(job, name: str) -> None:
    """Refuse, before training, to overwrite a model this job did not write."""
    out = outputs(job, name)
    out.check_free(out.single, out.yaml, out.diffusers, out.lora_diffusers)


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
    out = outputs(job, name)
    out.claim(out.single, out.yaml, out.diffusers)  # this job's earlier ones go; a foreign one is refused
    out.dir.mkdir(parents=True, exist_ok=True)
    write_student_folder(_fp32(unet), out.diffusers, root)
    if text_encoder is not None:
        shutil.rmtree(out.diffusers / "text_encoder")
        with new_folder(out.diffusers / "text_encoder") as tmp:
            _fp32(text_encoder).save_pretrained(tmp, safe_serialization=True)
    for line in convert(out.diffusers, out.single):
        job.say(line)
    return out.single


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """fp32 in the standard memory format (safetensors stores contiguous tensors only)."""
    return module.to(dtype=torch.float32, memory_format=torch.contiguous_format)
