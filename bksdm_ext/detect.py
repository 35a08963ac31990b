"""Which U-Net is this? Layout and version of a state dict, in either key naming.

The structure is read from the keys (stages = downsamplers + 1, R(+A) blocks per down stage, a
middle block or not) and matched to `layouts.LAYOUTS`; the family from the shapes (SD1 projects
into attention with a 1x1 conv, SD2 with a linear layer). Then every key and shape is checked
against the model the detected layout builds. SD-2 512 px (epsilon) and 768 px (v) U-Nets have the
same shapes, so the prediction type is taken from our metadata, a scheduler config, or failing
those a test forward as the WebUI does it (`sd_models_config.is_using_v_parameterization_for_sd2`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import layouts
from .errors import BKSDMError

PREFIXES = ("model.diffusion_model.", "unet.", "")
_ANCHORS = {"ldm": "input_blocks.0.0.weight", "diffusers": "conv_in.weight"}
# Where the family shows: the first attention of the first stage, present in every layout.
_PROJ_IN = "down_blocks.0.attentions.0.proj_in.weight"
_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class UNetDetection:
    """What a U-Net state dict is, and how its keys compare with what that layout expects.

    Key lists are in the state dict's own naming, prefix included.
    """

    layout: str
    family: str  # "v1" or "v2"
    naming: str  # "diffusers" or "ldm"
    prefix: str
    channels: tuple[int, ...]  # block_out_channels read from the resnets
    cross_attention_dim: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # key, found, expected

    @property
    def full_size(self) -> bool:
        return self.channels == layouts.BLOCK_OUT_CHANNELS[: len(self.channels)]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


@dataclass(frozen=True)
class VersionDecision:
    version: str
    source: str  # how it was decided: "shapes", "requested", "metadata", "scheduler config", "test forward"


# --- finding the U-Net --------------------------------------------------------------------------


def find_unet(state_dict: dict) -> tuple[str, str]:
    """(naming, prefix) of the U-Net in a state dict, or a BKSDMError saying what the file is."""
    keys = state_dict.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise BKSDMError("This is an SDXL checkpoint (conditioner.embedders found). "
                         f"BK-SDM layouts exist for SD-1.x and SD-2.x only: {_supported()}.")
    for prefix in PREFIXES:
        for naming, anchor in _ANCHORS.items():
            if prefix + anchor in state_dict:
                return naming, prefix
    sample = ", ".join(list(keys)[:3]) or "no tensors at all"
    raise BKSDMError(
        "No Stable Diffusion U-Net found (looked for input_blocks.* or down_blocks.* weights, also under "
        f"model.diffusion_model. or unet.); this file has {len(state_dict)} tensors like {sample}. "
        "Use an SD-1.x/2.x or BK-SDM checkpoint."
    )


def unet_part(state_dict: dict, prefix: str) -> dict:
    """The U-Net's own tensors, prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _supported() -> str:
    return "; ".join(
        f"{lay.name} ({lay.stages} stages, {lay.layers_per_block} per down stage, "
        f"{'a' if lay.mid_block else 'no'} middle block)"
        for lay in layouts.LAYOUTS.values()
    ) + "; or a custom layout of SD's blocks (3-4 stages, 1-2 per down stage, with or without the middle block)"


def _structure(keys, naming: str) -> tuple[int, tuple[int, ...], bool]:
    """(stages, R(+A) blocks of each down stage, has a middle block) read from the key names."""
    if naming == "ldm":
        blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))})
        downsamplers = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
        per_stage = [0]
        for index in blocks[1:]:  # block 0 is conv_in
            if index in downsamplers:
                per_stage.append(0)
            else:
                per_stage[-1] += 1
        return len(downsamplers) + 1, tuple(per_stage), any(k.startswith("middle_block.") for k in keys)
    resnets: dict[int, set[int]] = {}
    downsamplers = set()
    for k in keys:
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", k):
            resnets.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", k):
            downsamplers.add(int(m.group(1)))
    per_stage = tuple(len(resnets.get(stage, ())) for stage in range(max(resnets, default=-1) + 1))
    return len(downsamplers) + 1, per_stage, any(k.startswith("mid_block.") for k in keys)


def match_layout(stages: int, per_stage: tuple[int, ...], mid: bool, naming: str,
                 metadata: dict | None = None) -> layouts.Layout:
    """The layout with this structure: a table one, or a custom one (provenance from our metadata).

    Shapes decide the architecture; where layouts share it (a custom layout shaped like Small, say),
    the `bksdm.layout` our files record decides.
    """
    recorded = (metadata or {}).get("bksdm.layout")
    if recorded:
        try:
            lay = layouts.get_layout(recorded)
        except BKSDMError:
            lay = None  # not ours to read (another tool's, or damaged): the shapes decide
        if lay is not None and lay.architecture == (per_stage, mid) and lay.stages == stages:
            return lay
    for lay in layouts.LAYOUTS.values():
        if (stages, mid) == (lay.stages, lay.mid_block) and per_stage == lay.down:
            return lay
    if len(per_stage) == stages:
        try:
            return layouts.from_architecture(per_stage, mid)
        except BKSDMError:
            pass
    raise BKSDMError(
        f"Unknown U-Net layout ({naming} keys): {stages} stages with {list(per_stage)} R(+A) blocks per down "
        f"stage and {'a' if mid else 'no'} middle block. Supported: {_supported()}."
    )


def diffusers_names(unet: dict, layout: layouts.Layout, naming: str) -> tuple[dict, list[str]]:
    """The U-Net tensors under diffusers names, and the keys that have no place in `layout`."""
    if naming == "diffusers":
        return dict(unet), []
    renamed, unplaced = {}, []
    for key, value in unet.items():
        try:
            renamed[layouts.unet_key_to_diffusers(key, layout)] = value
        except BKSDMError:
            unplaced.append(key)
    return renamed, unplaced


# --- configs ------------------------------------------------------------------------------------


def unet_config(detection: UNetDetection, version: str) -> dict:
    """The diffusers config of a detected U-Net: the table's for full size, else built from its shapes.

    Heads change no shape, so for other sizes they follow SD's convention where the channels allow
    (v1: 8 heads, v2: 64-wide heads) and are 1 otherwise.
    """
    v = layouts.get_version(version)
    if detection.full_size and detection.cross_attention_dim == v.cross_attention_dim:
        return layouts.unet_config(detection.layout, v)
    teacher = layouts.teacher_unet_config(v)
    channels = list(detection.channels)
    channels += [channels[-1]] * (layouts.TEACHER.stages - len(channels))  # removed stages: any width
    if v.family == "v1":
        heads = 8 if all(c % 8 == 0 for c in channels) else 1
    else:
        heads = [c // 64 if c % 64 == 0 else 1 for c in channels]
    teacher.update(block_out_channels=channels, cross_attention_dim=detection.cross_attention_dim,
                   attention_head_dim=heads)
    return layouts.student_unet_config(teacher, detection.layout)


@lru_cache(maxsize=16)
def _expected_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**json.loads(config_json))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the diffusers U-Net `config` builds, with its shape (built on the meta device)."""
    return _expected_shapes(json.dumps(config, sort_keys=True))


# --- detection ----------------------------------------------------------------------------------


def detect_unet(state_dict: dict, metadata: dict | None = None) -> UNetDetection:
    """Layout, family and key check of the U-Net in `state_dict` (a whole checkpoint or a U-Net).

    `metadata`: the file's safetensors header; its `bksdm.layout` tells apart layouts of one shape.
    """
    naming, prefix = find_unet(state_dict)
    unet = unet_part(state_dict, prefix)
    if any(k.startswith(("label_emb.", "add_embedding.", "class_embedding.")) for k in unet):
        raise BKSDMError("This U-Net takes extra conditioning (label_emb / add_embedding: SDXL or an upscaler). "
                         f"BK-SDM layouts exist for SD-1.x and SD-2.x only: {_supported()}.")
    in_channels = unet[_ANCHORS[naming]].shape[1]
    if in_channels != 4:
        kinds = {9: "an inpainting", 8: "an instruct-pix2pix", 5: "a depth-conditioned"}
        kind = kinds.get(in_channels, "a non-text-to-image")
        raise BKSDMError(f"This is {kind} U-Net ({in_channels} input channels). BK-SDM layouts are text-to-image "
                         f"U-Nets with 4 input channels: {_supported()}.")
    layout = match_layout(*_structure(unet.keys(), naming), naming, metadata)
    renamed, unplaced = diffusers_names(unet, layout, naming)
    if _PROJ_IN not in renamed or _TO_K not in renamed:
        raise BKSDMError(f"The U-Net has no cross-attention in its first stage ({_PROJ_IN} missing): "
                         "it is incomplete or not a Stable Diffusion U-Net.")
    family = "v1" if renamed[_PROJ_IN].ndim == 4 else "v2"
    channels = tuple(renamed[f"down_blocks.{s}.resnets.0.conv1.weight"].shape[0] for s in range(layout.stages)
                     if f"down_blocks.{s}.resnets.0.conv1.weight" in renamed)
    partial = UNetDetection(layout.name, family, naming, prefix, channels, renamed[_TO_K].shape[1], (), (), ())
    expected = expected_shapes(unet_config(partial, "v1" if family == "v1" else "v2-base"))

    def original(key: str) -> str:  # a diffusers key in the state dict's own naming
        return prefix + (key if naming == "diffusers" else layouts.unet_key_to_ldm(key, layout))

    missing = tuple(original(k) for k in expected if k not in renamed)
    unexpected = tuple(prefix + k for k in unplaced) + tuple(original(k) for k in renamed if k not in expected)
    mismatched = tuple((original(k), tuple(v.shape), expected[k]) for k, v in renamed.items()
                       if k in expected and tuple(v.shape) != expected[k])
    return UNetDetection(layout.name, family, naming, prefix, channels, partial.cross_attention_dim,
                         missing, unexpected, mismatched)


# --- version ------------------------------------------------------------------------------------


def resolve_version(detection: UNetDetection, state_dict: dict, metadata: dict | None = None,
                    scheduler_config: dict | None = None, requested: str | None = None) -> VersionDecision:
    """The version of a detected U-Net and what decided it.

    Order: the user's choice, our safetensors metadata, a diffusers scheduler config, then (SD2
    only, where shapes cannot tell 512 px epsilon from 768 px v) a test forward.
    """
    metadata = metadata or {}
    candidates = [("requested", requested), ("metadata", metadata.get("bksdm.version"))]
    for source, name in candidates:
        if name:
            version = layouts.get_version(name)
            if version.family != detection.family:
                raise BKSDMError(f"The {source} version {version.name} does not fit this U-Net, whose shapes "
                                 f"are those of {detection.family}.")
            return VersionDecision(version.name, source)
    if detection.family == "v1":
        return VersionDecision("v1", "shapes")
    predictions = [("metadata", metadata.get("bksdm.prediction_type")),
                   ("scheduler config", (scheduler_config or {}).get("prediction_type"))]
    for source, prediction in predictions:
        if prediction in ("epsilon", "v_prediction"):
            return VersionDecision("v2-768" if prediction == "v_prediction" else "v2-base", source)
    if not detection.complete:
        raise BKSDMError("Cannot tell v2-base from v2-768: the U-Net is incomplete, so it cannot be test-run. "
                         "Give the version (--version v2-base or v2-768).")
    unet = diffusers_names(unet_part(state_dict, detection.prefix), layouts.get_layout(detection.layout),
                           detection.naming)[0]
    v = predicts_v(unet, unet_config(detection, "v2-base"))
    return VersionDecision("v2-768" if v else "v2-base", "test forward")


def predicts_v(unet: dict, config: dict) -> bool:
    """Whether a U-Net (diffusers names and config) predicts v rather than epsilon.

    The WebUI's test (modules/sd_models_config.py, is_using_v_parameterization_for_sd2): at t=999
    the input is almost pure noise, so an epsilon model returns about its input while a v model
    returns about minus the clean image; a mean of (output - input) below -1 means v.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict({k: v.float() for k, v in unet.items()}, strict=True, assign=True)
    model.eval()
    with torch.no_grad():
        context = torch.ones((1, 2, config["cross_attention_dim"])) * 0.5
        x = torch.ones((1, config["in_channels"], 8, 8)) * 0.5
        out = model(x, torch.asarray([999]), encoder_hidden_states=context).sample
    return (out - x).mean().item() < -1
