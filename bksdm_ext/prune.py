"""Pruning without retraining: an SD-1/2 teacher with blocks removed, its weights copied.

BK-SDM App. B: SD without its mid-stage (`sd-nomid`) keeps most of its quality untrained. The same
copy builds any layout of SD's blocks (a custom spec, `layouts.parse_spec`): every kept tensor is the
teacher tensor `layouts.teacher_key` names, so nothing is invented. Custom layouts record their
spec (and so their provenance) in the file's metadata, or in unet/config.json for a folder.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from . import detect, io, layouts
from .convert import LAYOUT_CONFIG_KEY, Model, load_model, write_folder, write_single_file
from .errors import BKSDMError
from .student import student_state_dict

REMOVABLE = {"mid": "mid=no", "inner": "inner=no"}


def layout_to_keep(keep: str | None = None, remove: str | None = None) -> layouts.Layout:
    """The layout `--keep SPEC` (or a layout name) or `--remove mid[,inner]` asks for."""
    if bool(keep) == bool(remove):
        raise BKSDMError("Say what to prune: --remove mid (or mid,inner), or --keep SPEC (a layout name or a spec "
                         "like 'down=2,1,1,2 mid=no').")
    if keep:
        return layouts.get_layout(keep)
    parts = [p.strip().lower() for p in remove.split(",") if p.strip()]
    unknown = [p for p in parts if p not in REMOVABLE]
    if unknown or not parts:
        raise BKSDMError(f"--remove takes {' or '.join(REMOVABLE)} (comma-separated), not {remove!r}; "
                         "for other blocks give --keep SPEC.")
    return layouts.get_layout(" ".join(REMOVABLE[p] for p in parts))


def prune_model(model: Model, layout: layouts.Layout | str) -> Model:
    """`model` (an SD teacher) with its U-Net cut to `layout`, every tensor copied from the teacher's."""
    lay = layouts.get_layout(layout)
    title = layouts.get_layout(model.detection.layout).title
    if model.detection.layout != layouts.TEACHER.name:
        raise BKSDMError(f"{model.source} is {title}, already pruned: prune a full SD-1.x/2.x model.")
    if not lay.is_student:
        raise BKSDMError("The layout to keep is the whole teacher: remove something (e.g. --remove mid).")
    config = layouts.student_unet_config(model.configs["unet"], lay)
    expected = detect.expected_shapes(config)
    unet = student_state_dict(model.weights["unet"], expected, lay)
    wrong = [k for k, v in unet.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise BKSDMError(f"The teacher's {wrong[0]} has shape {tuple(unet[wrong[0]].shape)}, the pruned U-Net needs "
                         f"{expected[wrong[0]]}: the teacher is not a standard SD U-Net.")
    if not lay.is_named:
        config[LAYOUT_CONFIG_KEY] = lay.name  # shapes alone cannot tell this layout from others
    detection = detect.detect_unet(unet, {"bksdm.layout": lay.name})
    kept = sum(t.numel() for t in unet.values())
    notes = model.notes + [f"Pruned to {lay.title}: {kept:,} U-Net parameters of the teacher's "
                           f"{sum(t.numel() for t in model.weights['unet'].values()):,}, copied, not retrained."]
    return replace(model, weights={**model.weights, "unet": unet}, configs={**model.configs, "unet": config},
                   detection=detection, notes=notes)


def output_bytes(model: Model, half: bool) -> int:
    return sum(t.numel() * (2 if half and t.is_floating_point() else t.element_size())
               for part in model.weights.values() for t in part.values())


def prune(src: str | os.PathLike, dst: str | os.PathLike, layout: layouts.Layout | str, half: bool | None = None,
          version: str | None = None, say=print) -> Path:
    """Write `src` (an SD-1/2 checkpoint or diffusers folder) pruned to `layout` at `dst`.

    `dst` ending in .safetensors: one WebUI checkpoint (its yaml beside it); else a diffusers folder.
    `half` None keeps the teacher's precision (fp16 stays fp16).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise BKSDMError(f"{src} does not exist: give an SD-1.x/2.x checkpoint file or diffusers folder.")
    if dst.exists():
        raise BKSDMError(f"{dst} already exists: choose a new name or delete it first.")
    if dst.suffix and dst.suffix != ".safetensors":
        raise BKSDMError(f"{dst}: write a .safetensors file (for the WebUI) or a folder (diffusers form).")
    lay = layouts.get_layout(layout)
    try:
        model = load_model(src, version)
    except BKSDMError as error:
        raise BKSDMError(f"Cannot prune {src.name}: {error}") from None
    pruned = prune_model(model, lay)
    if half is None:
        half = next(iter(model.weights["unet"].values())).dtype == torch.float16
    io.require_free_space(dst.parent, output_bytes(pruned, half), "the pruned model",
                          "Free some space or write it elsewhere.")
    lines = pruned.notes + (write_single_file(pruned, dst, half) if dst.suffix else
                           write_folder(pruned, dst, half, src if (src / "tokenizer").is_dir() else None))
    for line in lines:
        say(line)
    return dst
