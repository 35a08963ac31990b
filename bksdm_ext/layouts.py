"""The BK-SDM block layouts: the one source of truth (BK-SDM, Kim et al. 2023, arXiv 2305.15798).

A U-Net is described by a `Layout` (which blocks exist) and a `Version` (which Stable Diffusion it
descends from). Everything else is derived here and only here: the diffusers config, the LDM
(WebUI) yaml parameters, the diffusers <-> LDM key map, the teacher -> student block map and the
feature-KD layer pairs. Detection of a state dict's layout lives in `detect.py` and reads these.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from .errors import BKSDMError


@dataclass(frozen=True)
class Version:
    """A Stable Diffusion family: the shapes its U-Net takes and what it predicts."""

    name: str
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...]  # diffusers' (mis)name: heads per stage for v2
    use_linear_projection: bool
    prediction_type: str  # diffusers scheduler naming: "epsilon" or "v_prediction"
    sample_size: int  # latent side
    upcast_attention: bool
    text_encoder: str  # "clip-vit-l-14" (v1) or "openclip-vit-h-14" (v2)

    @property
    def family(self) -> str:
        return self.name.split("-")[0]


@dataclass(frozen=True)
class Layout:
    """Which blocks a U-Net keeps. The teacher is Stable Diffusion itself."""

    name: str
    title: str
    layers_per_block: int  # R(+A) pairs per down stage; up stages have one more
    mid_block: bool
    stages: int  # resolution stages: 4 for SD, 3 when the innermost one is removed

    @property
    def is_student(self) -> bool:
        return self.name != "teacher"

    def has_attention(self, stage: int) -> bool:
        # SD's innermost (4th) stage is the only one without cross-attention.
        return stage < 3

    def has_downsampler(self, stage: int) -> bool:
        return stage < self.stages - 1


VERSIONS: dict[str, Version] = {
    v.name: v
    for v in (
        Version("v1", 768, 8, False, "epsilon", 64, False, "clip-vit-l-14"),
        Version("v2-base", 1024, (5, 10, 20, 20), True, "epsilon", 64, False, "openclip-vit-h-14"),
        Version("v2-768", 1024, (5, 10, 20, 20), True, "v_prediction", 96, True, "openclip-vit-h-14"),
    )
}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("teacher", "SD (teacher)", 2, True, 4),
        Layout("base", "BK-SDM-Base", 1, True, 4),
        Layout("small", "BK-SDM-Small", 1, False, 4),
        Layout("tiny", "BK-SDM-Tiny", 1, False, 3),
    )
}
TEACHER = LAYOUTS["teacher"]
STUDENTS = tuple(name for name in LAYOUTS if name != "teacher")

BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
CHANNEL_MULT = (1, 2, 4, 4)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name.lower()]
    except KeyError:
        raise BKSDMError(f"Unknown layout {name!r}: choose one of {', '.join(LAYOUTS)}.") from None


def get_version(name: str) -> Version:
    try:
        return VERSIONS[name.lower()]
    except KeyError:
        raise BKSDMError(f"Unknown version {name!r}: choose one of {', '.join(VERSIONS)}.") from None


# --- diffusers form ---------------------------------------------------------------------------


def teacher_unet_config(version: Version | str) -> dict:
    """The diffusers UNet2DConditionModel config of the SD U-Net of `version`."""
    v = get_version(version) if isinstance(version, str) else version
    head_dim = list(v.attention_head_dim) if isinstance(v.attention_head_dim, tuple) else v.attention_head_dim
    return {
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "block_out_channels": list(BLOCK_OUT_CHANNELS),
        "center_input_sample": False,
        "cross_attention_dim": v.cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": TEACHER.layers_per_block,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": v.sample_size,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "upcast_attention": v.upcast_attention,
        "use_linear_projection": v.use_linear_projection,
    }


def student_unet_config(teacher_config: dict, layout: Layout | str) -> dict:
    """The diffusers config of `layout` built from any SD teacher config (other keys are kept)."""
    lay = get_layout(layout) if isinstance(layout, str) else layout
    config = {k: copy.deepcopy(v) for k, v in teacher_config.items() if not k.startswith("_")}
    teacher_stages = len(config["down_block_types"])
    if config.get("layers_per_block") != TEACHER.layers_per_block or teacher_stages != TEACHER.stages:
        raise BKSDMError(
            "The teacher is not a standard SD-v1/v2 U-Net (layers_per_block 2, 4 stages): "
            "build students from an SD-1.x or SD-2.x model."
        )
    config["layers_per_block"] = lay.layers_per_block
    if not lay.mid_block:
        config["mid_block_type"] = None
    dropped = teacher_stages - lay.stages  # innermost stages: last down block, first up block
    if dropped:
        config["down_block_types"] = config["down_block_types"][: lay.stages]
        config["up_block_types"] = config["up_block_types"][dropped:]
        config["block_out_channels"] = config["block_out_channels"][: lay.stages]
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[: lay.stages]
    return config


def unet_config(layout: Layout | str, version: Version | str) -> dict:
    return student_unet_config(teacher_unet_config(version), layout)


# --- LDM (single-file / WebUI) form -------------------------------------------------------------

LDM_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
BK_UNET_TARGET = "bksdm_ext.ldm_unet.BKUNetModel"


def ldm_unet_params(layout: Layout | str, version: Version | str) -> dict:
    """`unet_config.params` of the WebUI yaml (Stability-AI `ldm` UNetModel arguments)."""
    return ldm_unet_params_from_config(unet_config(layout, version))


def ldm_unet_params_from_config(config: dict) -> dict:
    """The `ldm` UNetModel arguments that build the same network as a diffusers U-Net config."""
    channels = list(config["block_out_channels"])
    params = {
        "use_checkpoint": True,
        "image_size": 32,  # unused by UNetModel
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "model_channels": channels[0],
        "attention_resolutions": [2**i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t][::-1],
        "num_res_blocks": config["layers_per_block"],
        "channel_mult": [c // channels[0] for c in channels],
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": config["cross_attention_dim"],
        "legacy": False,
    }
    heads = config["attention_head_dim"]  # diffusers' name for the number of heads
    if isinstance(heads, (list, tuple)):
        head_channels = {c // h for c, h in zip(channels, heads)}
        if len(head_channels) != 1:
            raise BKSDMError(f"Attention heads {heads} do not give one head width over channels {channels}.")
        params["num_head_channels"] = head_channels.pop()
    else:
        params["num_heads"] = heads
    if config.get("use_linear_projection"):
        params["use_linear_in_transformer"] = True
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        params["middle_block"] = False  # only BKUNetModel takes this
    return params


def ldm_unet_target(params: dict) -> str:
    """The class the yaml names: `ldm`'s own, unless the U-Net has no middle block."""
    return BK_UNET_TARGET if "middle_block" in params else LDM_UNET_TARGET


# --- key map: diffusers <-> LDM -----------------------------------------------------------------

_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _module_pairs(layout: Layout) -> Iterator[tuple[str, str, str]]:
    """(diffusers module, LDM module, kind) for every block of `layout`; kind: resnet/attention/plain."""
    yield "conv_in", "input_blocks.0.0", "plain"
    yield "time_embedding.linear_1", "time_embed.0", "plain"
    yield "time_embedding.linear_2", "time_embed.2", "plain"
    yield "conv_norm_out", "out.0", "plain"
    yield "conv_out", "out.2", "plain"
    per_down, per_up = layout.layers_per_block, layout.layers_per_block + 1
    index = 1
    for stage in range(layout.stages):
        for j in range(per_down):
            yield f"down_blocks.{stage}.resnets.{j}", f"input_blocks.{index}.0", "resnet"
            if layout.has_attention(stage):
                yield f"down_blocks.{stage}.attentions.{j}", f"input_blocks.{index}.1", "attention"
            index += 1
        if layout.has_downsampler(stage):
            yield f"down_blocks.{stage}.downsamplers.0.conv", f"input_blocks.{index}.0.op", "plain"
            index += 1
    if layout.mid_block:
        yield "mid_block.resnets.0", "middle_block.0", "resnet"
        yield "mid_block.attentions.0", "middle_block.1", "attention"
        yield "mid_block.resnets.1", "middle_block.2", "resnet"
    index = 0
    for up in range(layout.stages):
        stage = layout.stages - 1 - up  # up_blocks.0 is the innermost stage
        for j in range(per_up):
            yield f"up_blocks.{up}.resnets.{j}", f"output_blocks.{index}.0", "resnet"
            if layout.has_attention(stage):
                yield f"up_blocks.{up}.attentions.{j}", f"output_blocks.{index}.1", "attention"
            if j == per_up - 1 and stage > 0:
                slot = 2 if layout.has_attention(stage) else 1
                yield f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", "plain"
            index += 1


@lru_cache(maxsize=None)
def unet_prefix_map(layout_name: str) -> tuple[tuple[str, str], ...]:
    """(diffusers prefix, LDM prefix) pairs, each ending in '.', covering every U-Net parameter."""
    pairs = []
    for diffusers, ldm, kind in _module_pairs(get_layout(layout_name)):
        if kind == "resnet":
            pairs += [(f"{diffusers}.{d}.", f"{ldm}.{l}.") for d, l in _RESNET_PARTS]
        else:
            pairs.append((f"{diffusers}.", f"{ldm}."))
    return tuple(pairs)


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Replace the longest prefix of `key` found in `table` (prefixes end in '.')."""
    end = len(key)
    while (end := key.rfind(".", 0, end)) > 0:
        new = table.get(key[: end + 1])
        if new is not None:
            return new + key[end + 1 :]
    return None


@lru_cache(maxsize=None)
def _tables(layout_name: str) -> tuple[dict[str, str], dict[str, str]]:
    pairs = unet_prefix_map(layout_name)
    return dict(pairs), {ldm: diffusers for diffusers, ldm in pairs}


def unet_key_to_ldm(key: str, layout: Layout | str) -> str:
    name = layout if isinstance(layout, str) else layout.name
    new = _rename(key, _tables(name)[0])
    if new is None:
        raise BKSDMError(f"U-Net key {key!r} has no place in the {name} layout.")
    return new


def unet_key_to_diffusers(key: str, layout: Layout | str) -> str:
    name = layout if isinstance(layout, str) else layout.name
    new = _rename(key, _tables(name)[1])
    if new is None:
        raise BKSDMError(f"U-Net key {key!r} has no place in the {name} layout.")
    return new


# --- teacher -> student -------------------------------------------------------------------------


def block_map(layout: Layout | str) -> tuple[tuple[str, str], ...]:
    """(student module, teacher module) for every module that is renamed when copying weights.

    Each down stage keeps its first R-A pair and each up stage its first and last (BKSDM.md §2);
    when the innermost stage is removed, the student's up stages take the teacher's outer ones.
    Modules not listed copy from the same name.
    """
    lay = get_layout(layout) if isinstance(layout, str) else layout
    offset = TEACHER.stages - lay.stages
    last_teacher = TEACHER.layers_per_block
    pairs = []
    for up in range(lay.stages):
        stage = lay.stages - 1 - up
        for j in range(lay.layers_per_block + 1):
            source = j if j < lay.layers_per_block else last_teacher
            parts = ("resnets", "attentions") if lay.has_attention(stage) else ("resnets",)
            for part in parts:
                if (up + offset, source) != (up, j):
                    pairs.append((f"up_blocks.{up}.{part}.{j}", f"up_blocks.{up + offset}.{part}.{source}"))
        if offset and stage > 0:
            pairs.append((f"up_blocks.{up}.upsamplers", f"up_blocks.{up + offset}.upsamplers"))
    return tuple(pairs)


def teacher_key(student_key: str, layout: Layout | str) -> str:
    """The teacher parameter a student parameter (diffusers naming) is initialised from."""
    for student, teacher in block_map(layout):
        if student_key.startswith(student + "."):
            return teacher + student_key[len(student) :]
    return student_key


def feature_kd_pairs(layout: Layout | str) -> tuple[tuple[str, str], ...]:
    """(teacher module, student module) whose outputs are matched by the feature-KD loss.

    Stage outputs on both sides (mid block not used). Where the student's last down stage lost the
    downsampler the teacher's stage still has, their outputs differ in size, so the last attention's
    `proj_out` is matched instead (Tiny: teacher attentions.1 vs student attentions.0).
    """
    lay = get_layout(layout) if isinstance(layout, str) else layout
    offset = TEACHER.stages - lay.stages
    pairs = []
    for stage in range(lay.stages):
        if lay.has_downsampler(stage) == TEACHER.has_downsampler(stage):
            pairs.append((f"down_blocks.{stage}", f"down_blocks.{stage}"))
        else:
            pairs.append(
                (
                    f"down_blocks.{stage}.attentions.{TEACHER.layers_per_block - 1}.proj_out",
                    f"down_blocks.{stage}.attentions.{lay.layers_per_block - 1}.proj_out",
                )
            )
    pairs += [(f"up_blocks.{up + offset}", f"up_blocks.{up}") for up in range(lay.stages)]
    return tuple(pairs)
