"""Convert between a diffusers folder and one `.safetensors` in the LDM (WebUI) key layout.

Every direction reads the source into one `Model` (diffusers component state dicts, configs, the
detected layout and version) and writes that. The form of SRC and DST picks the direction:
a folder or a file in, a `.safetensors` (LDM keys, `.yaml` beside it when it is a whole model)
or a folder (diffusers) out. U-Net-only sources give U-Net-only outputs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import io
from ..detect import UNetDetection, VersionDecision, detect_unet, resolve_version
from ..errors import BKSDMError
from . import checkpoint


@dataclass
class Model:
    weights: dict[str, io.StateDict]  # diffusers names, by component
    configs: dict[str, dict]
    detection: UNetDetection
    decision: VersionDecision
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def is_pipeline(self) -> bool:
        return "vae" in self.weights or "text_encoder" in self.weights


def describe_mismatch(detection: UNetDetection, limit: int = 3) -> str:
    """The key check in words, with `limit` examples of each kind of problem."""
    mismatched = [f"{k} {list(found)} (expected {list(want)})" for k, found, want in detection.mismatched]
    kinds = (("missing", detection.missing), ("unexpected", detection.unexpected), ("mismatched", mismatched))
    return "; ".join(f"{len(keys)} {name} (e.g. {', '.join(list(keys)[:limit])})" for name, keys in kinds if keys)


def _checked(detection: UNetDetection) -> UNetDetection:
    if not detection.complete:
        raise BKSDMError(f"The U-Net does not match the {detection.layout} layout it resembles: "
                         f"{describe_mismatch(detection)}. It is damaged or not a BK-SDM/SD U-Net.")
    return detection


LAYOUT_CONFIG_KEY = "_bksdm_layout"  # in a unet/config.json we write; diffusers ignores "_" keys


def folder_metadata(configs: dict) -> dict:
    """What a diffusers folder records of our metadata: the layout name, in the U-Net config."""
    layout = configs.get("unet", {}).get(LAYOUT_CONFIG_KEY)
    return {"bksdm.layout": layout} if layout else {}


def load_model(src: str | os.PathLike, version: str | None = None) -> Model:
    """Read a diffusers folder or a single weights file (either key naming) into a `Model`."""
    src = Path(src)
    if src.is_dir():
        folder = io.read_diffusers_folder(src)
        detection = _checked(detect_unet(folder.weights["unet"], folder_metadata(folder.configs)))
        decision = resolve_version(detection, folder.weights["unet"], scheduler_config=folder.configs.get("scheduler"),
                                   requested=version)
        configs = checkpoint.complete_configs(folder.configs, folder.weights, detection, decision.version)
        return Model(folder.weights, configs, detection, decision, f"diffusers:{src.name}")
    tensors, metadata = io.read_weights(src)
    detection = _checked(detect_unet(tensors, metadata))
    decision = resolve_version(detection, tensors, metadata, requested=version)
    weights, dropped = checkpoint.split_single_file(tensors, detection)
    configs = checkpoint.complete_configs(checkpoint.configs_from_header(metadata), weights, detection,
                                          decision.version)
    notes = []
    if dropped:
        notes.append(f"Left out {len(dropped)} tensors no diffusers component uses (e.g. {', '.join(dropped[:3])}).")
    source = metadata.get("bksdm.source") or f"single-file:{src.name}"
    return Model(weights, configs, detection, decision, source, notes)


def load_unet_from_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None, version: str | None = None):
    """A diffusers UNet2DConditionModel from a single file in either naming (fp32 unless `dtype`)."""
    from diffusers import UNet2DConditionModel

    model = load_model(path, version)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model.configs["unet"])
    weights = {k: v.to(dtype or torch.float32) for k, v in model.weights["unet"].items()}
    unet.load_state_dict(weights, strict=True, assign=True)
    return unet.eval()


def _cast(tensors: io.StateDict, half: bool) -> io.StateDict:
    dtype = torch.float16 if half else torch.float32
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def write_single_file(model: Model, dst: Path, half: bool = False,
                      extra_metadata: dict[str, str] | None = None) -> list[str]:
    from ..ldm_config import write_yaml_for

    det, version = model.detection, model.decision.version
    tensors, unused = checkpoint.to_single_file(model.weights, det.layout, det.family)
    metadata = {**(extra_metadata or {}),
                **checkpoint.header(det.layout, version, model.source, unused, model.configs)}
    io.write_safetensors(dst, _cast(tensors, half), metadata)
    lines = [f"Wrote {dst}: {det.layout}, {version} (decided by {model.decision.source}), "
             f"{'fp16' if half else 'fp32'}, {len(tensors)} tensors."]
    if unused:
        lines.append(f"Not in the file (SD-2 never uses them, the diffusers folder has none): {', '.join(unused)}.")
    if model.is_pipeline:
        # full size: the layout table's yaml; other sizes (tests' tiny models) need their own U-Net config
        yaml = write_yaml_for(dst, det.layout, version, None if det.full_size else model.configs["unet"])
        lines.append(f"Wrote {yaml} (the WebUI reads it beside the checkpoint).")
    return lines


def _tokenizer_source(path: Path) -> Path:
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise BKSDMError(f"{path} is not a CLIP tokenizer folder (vocab.json, merges.txt) nor a pipeline folder "
                         "with tokenizer/ in it.")
    return folder


def _write_own_tokenizer(folder: Path, family: str) -> str:
    """Build the family's CLIP tokenizer so a folder from a single file (which has none) loads as it is."""
    from ..tokenizer import FAMILIES, write_clip_tokenizer

    write_clip_tokenizer(folder, family)
    return (f"No tokenizer given: wrote tokenizer/ as {FAMILIES[family].hub_repo}'s ({family}), built from "
            "open_clip's CLIP BPE vocabulary; --tokenizer DIR copies another.")


def _write_component(folder: Path, tensors: io.StateDict, config: dict, weights_name: str, half: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / "config.json", config)
    # transformers refuses a safetensors file without this header entry; save_pretrained writes it too
    io.write_safetensors(folder / weights_name, _cast(tensors, half), {"format": "pt"})


def write_folder(model: Model, dst: Path, half: bool = False, tokenizer: Path | None = None) -> list[str]:
    """A diffusers pipeline folder (or a U-Net folder for a U-Net alone), built beside `dst` then renamed."""
    tokenizer_dir = _tokenizer_source(tokenizer) if tokenizer else None
    lines = []
    with io.new_folder(dst) as tmp:
        if not model.is_pipeline:
            _write_component(tmp, model.weights["unet"], model.configs["unet"], "diffusion_pytorch_model.safetensors",
                             half)
        else:
            # the tokenizer first: if it cannot be built, the user learns before gigabytes are written
            if tokenizer_dir:
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            else:
                lines.append(_write_own_tokenizer(tmp / "tokenizer", model.detection.family))
            names = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                     "text_encoder": "model.safetensors"}
            for name, tensors in model.weights.items():
                _write_component(tmp / name, tensors, model.configs[name], names[name], half)
            (tmp / "scheduler").mkdir()
            io.write_json(tmp / "scheduler" / "scheduler_config.json", model.configs["scheduler"])
            io.write_json(tmp / "model_index.json", checkpoint.written_model_index(model.configs["model_index"]))
    det = model.detection
    return [f"Wrote {dst}: {det.layout}, {model.decision.version} (decided by {model.decision.source}), "
            f"{'fp16' if half else 'fp32'}, {', '.join(model.weights)}."] + lines


def convert(src: str | os.PathLike, dst: str | os.PathLike, half: bool = False, version: str | None = None,
            tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
            extra_metadata: dict[str, str] | None = None) -> list[str]:
    """Convert SRC to DST; returns what was done, line by line, for the user.

    An existing .safetensors (or the .yaml beside it) is replaced only with `overwrite`; a folder
    destination must be new or empty (a folder is never removed to make room). `extra_metadata`: more
    header entries of a single-file DST (e.g. a few-step model's recommended sampler).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise BKSDMError(f"{src} does not exist.")
    if dst.suffix and dst.suffix != ".safetensors":
        raise BKSDMError(f"{dst}: write a .safetensors file (LDM form) or a folder (diffusers form).")
    if src.resolve() == dst.resolve():
        raise BKSDMError("SRC and DST are the same path.")
    if dst.suffix:
        taken = [p for p in (dst, dst.with_suffix(".yaml")) if p.exists()]
        if any(p.is_dir() for p in taken):
            raise BKSDMError(f"{next(p for p in taken if p.is_dir())} is a folder: choose another destination.")
        if taken and not overwrite:
            raise BKSDMError(f"{' and '.join(map(str, taken))} already exist(s): choose another destination, or "
                             "pass --overwrite to replace it.")
    elif dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise BKSDMError(f"{dst} exists and is not an empty folder: choose a new folder for the diffusers form.")
    model = load_model(src, version)
    if tokenizer is None and (src / "tokenizer").is_dir():
        tokenizer = src  # a pipeline folder keeps its own tokenizer
    if dst.suffix == ".safetensors":
        lines = write_single_file(model, dst, half, extra_metadata)
    else:
        lines = write_folder(model, dst, half, Path(tokenizer) if tokenizer else None)
    return model.notes + lines
