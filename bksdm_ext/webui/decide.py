"""What the WebUI loader patch decides for a checkpoint, without importing the WebUI.

Given a checkpoint's tensors (or only their shapes, read from a safetensors header), decide whether
it is a BK-SDM layout and which shipped yaml builds it, or refuse it before the WebUI can build a
model with silently zeroed weights. Standard checkpoints get `None`: the WebUI's own logic decides.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import detect, layouts
from ..convert import describe_mismatch
from ..errors import BKSDMError
from ..ldm_config import yaml_for

UNET_PREFIX = "model.diffusion_model."
# Whole-checkpoint parts the WebUI needs beside the U-Net (LDM names).
PARTS = {"VAE": "first_stage_model.", "text encoder": "cond_stage_model."}

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Decision:
    layout: str
    version: str
    version_source: str
    config: Path  # the shipped yaml that builds this layout
    notes: tuple[str, ...] = field(default=())

    @property
    def prediction_type(self) -> str:
        return layouts.get_version(self.version).prediction_type

    def label(self) -> str:
        return f"{layouts.get_layout(self.layout).title} ({self.version})"


def header_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Shapes and dtypes of a safetensors file as meta tensors, and its metadata; no data is read.

    Cheap enough to run before every checkpoint switch, even for multi-GB files.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000 or length > path.stat().st_size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + length + end > path.stat().st_size:
            raise ValueError("tensor data beyond the end of the file")
        tensors = {key: torch.empty(info["shape"], dtype=_DTYPES.get(info["dtype"], torch.float32), device="meta")
                   for key, info in header.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise BKSDMError(f"{path.name} is not a complete safetensors file ({error}): it is truncated or "
                         "corrupt. Copy or download it again, or convert it again with `bksdm convert`.") from None
    return tensors, metadata


def is_bk_candidate(state_dict) -> bool:
    """An SD-1/2-style checkpoint (text-to-image, 4 latent channels, no extra conditioning) whose U-Net
    is not laid out like SD's own: the WebUI's configs cannot build it, ours may."""
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.shape[1] != 4:
        return False  # no LDM U-Net, or inpainting / pix2pix / depth: the WebUI's own business
    if any(k.startswith(("conditioner.", UNET_PREFIX + "label_emb.")) for k in state_dict):
        return False  # SDXL (and SSD-1B, Vega), unCLIP: conditioned differently, not BK
    is_sd = (UNET_PREFIX + "input_blocks.11.0.in_layers.0.weight") in state_dict and (
        UNET_PREFIX + "middle_block.1.proj_in.weight") in state_dict
    return not is_sd


_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "_lora.down.", ".hada_w1_", ".lokr_w1", ".oft_")
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")
_TEXT_ENCODERS = ("cond_stage_model.", "conditioner.")


def not_a_checkpoint(state_dict) -> str | None:
    """Why a file in the checkpoint list is not a whole WebUI checkpoint (None when it is one).

    The WebUI would try such a file anyway: a LoRA or VAE fails after the loaded model is gone, and a
    U-Net without a text encoder makes transformers 4.30 fetch CLIP weights from the hub (offline: no
    model at all). Only files the WebUI cannot use are named here; a checkpoint without a VAE is still
    usable with a separate VAE."""
    keys = list(state_dict)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        has_sd_unet = any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys)
        if has_sd_unet and not any(k.startswith(_TEXT_ENCODERS) for k in keys):
            return ("This file holds a U-Net but no text encoder: it is a U-Net-only file, not a checkpoint. "
                    "Pick a whole checkpoint, or convert the whole diffusers folder (unet/, vae/, text_encoder/) "
                    "with `bksdm convert`.")
        return None
    if any(mark in k or k.startswith(("lora_", "lycoris_")) for k in keys for mark in _LORA_MARKS):
        return ("This file is a LoRA, not a checkpoint: move it to models/Lora and use it in the prompt "
                "as <lora:NAME:1>.")
    if keys and all(k.startswith(_VAE_ROOTS) for k in keys):
        return ("This file is a VAE only, not a checkpoint: move it to models/VAE and pick it under "
                "Settings > Stable Diffusion > SD VAE.")
    if any(k.startswith(("conv_in.", "down_blocks.")) for k in keys):
        return ("This file is a U-Net in diffusers naming (a diffusers folder's unet/ file), not a checkpoint: "
                "convert the whole diffusers folder with `bksdm convert`.")
    return ("This file holds no Stable Diffusion U-Net (no model.diffusion_model.* tensors): it is not a "
            "checkpoint. Move it out of the checkpoint folder.")


def check(state_dict, metadata: dict | None = None) -> detect.UNetDetection | None:
    """The detected BK layout of a WebUI checkpoint, None for anything the WebUI loads itself, or a
    BKSDMError saying why the WebUI must not load it. Works on shapes alone (meta tensors)."""
    problem = not_a_checkpoint(state_dict)
    if problem:
        raise BKSDMError(problem)
    if not is_bk_candidate(state_dict):
        return None
    detection = detect.detect_unet(state_dict, metadata)
    if detection.layout == "teacher":
        return None
    title = layouts.get_layout(detection.layout).title
    if detection.naming != "ldm" or detection.prefix != UNET_PREFIX:
        raise BKSDMError(f"This {title} file is in diffusers naming; the WebUI needs a single-file checkpoint. "
                         "Convert it with `bksdm convert` or the BK-SDM tab's Import.")
    if not detection.complete:
        raise BKSDMError(f"Refusing this {title} checkpoint: its U-Net does not match the layout "
                         f"({describe_mismatch(detection)}). Loading it would leave weights at zero. "
                         "Convert it again from the diffusers folder with `bksdm convert`.")
    if not detection.full_size:
        raise BKSDMError(f"This {title} U-Net has channels {detection.channels}, not SD's "
                         f"{layouts.BLOCK_OUT_CHANNELS[:len(detection.channels)]}: no WebUI config builds it.")
    absent = [part for part, prefix in PARTS.items() if not any(k.startswith(prefix) for k in state_dict)]
    if absent:
        raise BKSDMError(f"This {title} file holds no {' or '.join(absent)}: it is a U-Net-only file. "
                         "Convert the whole diffusers folder (unet/, vae/, text_encoder/) with `bksdm convert` "
                         "to get a checkpoint the WebUI can load.")
    return detection


def decide(state_dict, metadata: dict | None = None, near_yaml: str | os.PathLike | None = None) -> Decision | None:
    """The BK yaml for a WebUI checkpoint (real tensors: an SD2 file may need a test forward)."""
    detection = check(state_dict, metadata)
    if detection is None:
        return None
    version = detect.resolve_version(detection, state_dict, metadata)
    config = yaml_for(detection.layout, version.version, near_yaml)
    notes = []
    if near_yaml and Path(near_yaml).is_file() and Path(near_yaml).resolve() != config.resolve():
        if Path(near_yaml).read_text() != config.read_text():
            notes.append(f"{Path(near_yaml).name} beside the checkpoint does not describe its weights "
                         f"({layouts.get_layout(detection.layout).title}, {version.version}); "
                         f"using {config.name} instead.")
    return Decision(detection.layout, version.version, version.source, config, tuple(notes))


@dataclass(frozen=True)
class KeyCheck:
    """A checkpoint's tensors against the parameters of the model the WebUI built for it."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]
    unused: tuple[str, ...]  # parts the model has but never uses (SD2's last text-encoder block)

    def as_dict(self) -> dict:
        return {name: list(getattr(self, name)) for name in ("missing", "unexpected", "mismatched", "unused")}


def _never_used(key: str, model_keys) -> bool:
    # SD2 encodes prompts with the penultimate OpenCLIP layer: the last block and the projection are
    # built but never run, and diffusers folders (so our single files) do not carry them.
    prefix = "cond_stage_model.model."
    if not key.startswith(prefix):
        return False
    blocks = {int(k[len(prefix):].split(".")[2]) for k in model_keys if k.startswith(prefix + "transformer.resblocks.")}
    last = f"{prefix}transformer.resblocks.{max(blocks)}." if blocks else None
    return key == prefix + "text_projection" or key == prefix + "logit_scale" or (last and key.startswith(last))


def key_check(checkpoint: dict, model_shapes: dict[str, tuple[int, ...]], parameters: set[str]) -> KeyCheck:
    """Compare checkpoint tensors with the model's state-dict shapes; only parameters can be missing
    (buffers such as the noise schedule are computed by the model itself)."""
    missing, unused = [], []
    for key in sorted(parameters):
        if key not in checkpoint:
            (unused if _never_used(key, parameters) else missing).append(key)
    unexpected = sorted(k for k in checkpoint if k not in model_shapes)
    mismatched = sorted(k for k in checkpoint if k in model_shapes and tuple(checkpoint[k].shape) != tuple(model_shapes[k]))
    return KeyCheck(tuple(missing), tuple(unexpected), tuple(mismatched), tuple(unused))


# Extensions that address U-Net blocks by SD's positions: on a BK layout they misalign or fail.
POSITIONAL = {
    "controlnet": "ControlNet adds its residuals to SD's 12 input blocks and middle block",
    "animatediff": "AnimateDiff inserts motion modules at SD's block positions",
}


def positional_conflicts(opts, p, placed=frozenset()) -> list[str]:
    """What active in this generation addresses U-Net blocks by SD's positions (WebUI options, and the
    always-on scripts of `p` with an enabled unit among their arguments), leaving out the extensions
    in `placed`, whose blocks our patches place by the layout."""
    problems = []
    if "hypertile" not in placed and (getattr(opts, "hypertile_enable_unet", False)
                                      or getattr(opts, "hypertile_enable_unet_secondpass", False)):
        problems.append("Hypertile U-Net picks SD's attention blocks by position")
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", []):
        name = script.title().lower().replace(" ", "") if hasattr(script, "title") else ""
        for key, why in POSITIONAL.items():
            if key in name and key not in placed and _enabled(p.script_args[script.args_from:script.args_to]):
                problems.append(why)
    return problems


def _enabled(args) -> bool:
    """Whether any unit among a script's arguments is enabled (ControlNet units, AnimateDiff params)."""
    for arg in args:
        enabled = arg.get("enabled") if isinstance(arg, dict) else getattr(arg, "enabled", None)
        if enabled is True:
            return True
    return False
