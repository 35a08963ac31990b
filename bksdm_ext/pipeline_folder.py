"""Diffusers folders as users have them: a pipeline (model_index.json + unet/ vae/ …) or a unet folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import BKSDMError
from .io import new_folder, unet_folder


def unet_dir(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(the U-Net's folder, the pipeline root or None) of a pipeline folder or a unet folder."""
    found = unet_folder(path)
    if found is not None:
        return found
    raise BKSDMError(
        f"{path} is not a diffusers folder: expected model_index.json with a unet/ folder (a pipeline, "
        "e.g. a download of nota-ai/bk-sdm-small) or a unet folder with config.json and its weights."
    )


def load_unet(path: str | os.PathLike, dtype=None):
    """(UNet2DConditionModel, pipeline root or None) from a diffusers folder, safetensors preferred."""
    from diffusers import UNet2DConditionModel

    folder, root = unet_dir(path)
    variant = "fp16" if not any(folder.glob("diffusion_pytorch_model.safetensors")) and any(
        folder.glob("diffusion_pytorch_model.fp16.safetensors")) else None
    unet = UNet2DConditionModel.from_pretrained(folder, variant=variant, torch_dtype=dtype, use_safetensors=None)
    return unet, root


def load_teacher_unet(source, dtype=None):
    """The teacher U-Net (diffusers) from a folder, or a U-Net object as it is."""
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return source, None
    path = Path(source)
    if path.is_file():
        from .convert import load_unet_from_single_file

        return load_unet_from_single_file(path, dtype=dtype), None
    return load_unet(path, dtype)


def write_student_folder(student, out: str | os.PathLike, pipeline_root: Path | None) -> Path:
    """Save the student as a pipeline folder (the teacher's other parts copied) or a unet folder.

    Written beside the target and renamed into place, so a crash never leaves half a folder under
    the final name.
    """
    out = Path(out)
    if out.exists():
        raise BKSDMError(f"{out} already exists: choose a new output folder or delete it first.")
    with new_folder(out) as tmp:
        if pipeline_root is None:
            student.save_pretrained(tmp)
        else:
            for item in pipeline_root.iterdir():
                if item.name == "unet" or item.name.startswith("."):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            student.save_pretrained(tmp / "unet")
    return out
