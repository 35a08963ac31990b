"""The BK-SDM block layouts: the one source of truth (BK-SDM, Kim et al. 2023, arXiv 2305.15798).

A U-Net is described by a `Layout` (which blocks exist) and a `Version` (which Stable Diffusion it
descends from). Everything else is derived here and only here: the diffusers config, the LDM
(WebUI) yaml parameters, the diffusers <-> LDM key map, the teacher -> student block map and the
feature-KD layer pairs. Detection of a state dict's layout lives in `detect.py` and reads these.
"""

from __future__ import annotations

import copy
import hashlib
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
    """Which blocks a U-Net keeps, and from which teacher blocks. The teacher is Stable Diffusion itself.

    Two parts. The architecture (`down`, `mid_block`) is what the shapes of a file show: R(+A) pairs
    per down stage, outer to inner (its length is the number of stages: 3 when the innermost one is
    removed); each up stage has one block more than its down stage. The provenance (`down_from`,
    `up_from`) says, per resolution stage, which teacher pair (down) or block (up) each kept one was
    copied from; it defaults to the BK rule (BKSDM.md §2): a down stage keeps its first pairs, an up
    stage its first blocks and the teacher's last.
    """

    name: str
    title: str
    down: tuple[int, ...]
    mid_block: bool
    down_from: tuple[tuple[int, ...], ...] = ()
    up_from: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not self.down_from:
            object.__setattr__(self, "down_from", tuple(tuple(range(n)) for n in self.down))
        if not self.up_from:
            last = TEACHER_PAIRS  # the teacher's last up block of a stage
            object.__setattr__(self, "up_from", tuple(tuple(range(n)) + (last,) for n in self.down))

    @property
    def stages(self) -> int:
        """Resolution stages: 4 for SD, 3 when the innermost one is removed."""
        return len(self.down)

    @property
    def layers_per_block(self) -> int | tuple[int, ...]:
        """diffusers' `layers_per_block`: one number when every down stage keeps as many pairs."""
        return self.down[0] if len(set(self.down)) == 1 else self.down

    @property
    def is_student(self) -> bool:
        return self.name != "teacher"

    @property
    def is_named(self) -> bool:
        return LAYOUTS.get(self.name) == self

    @property
    def architecture(self) -> tuple[tuple[int, ...], bool]:
        return self.down, self.mid_block

    def has_attention(self, stage: int) -> bool:
        # SD's innermost (4th) stage is the only one without cross-attention.
        return stage < 3

    def has_downsampler(self, stage: int) -> bool:
        return stage < self.stages - 1


TEACHER_STAGES = 4
TEACHER_PAIRS = 2  # R(+A) pairs per teacher down stage; its up stages have 3 blocks (0, 1, 2)

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
        Layout("teacher", "SD (teacher)", (2, 2, 2, 2), True),
        Layout("base", "BK-SDM-Base", (1, 1, 1, 1), True),
        Layout("small", "BK-SDM-Small", (1, 1, 1, 1), False),
        Layout("tiny", "BK-SDM-Tiny", (1, 1, 1), False),
        # BK-SDM App. B: SD with its mid-stage removed, usable without retraining
        Layout("sd-nomid", "SD without mid-stage", (2, 2, 2, 2), False),
    )
}
TEACHER = LAYOUTS["teacher"]
STUDENTS = tuple(name for name in LAYOUTS if name != "teacher")

BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
CHANNEL_MULT = (1, 2, 4, 4)


# --- custom layouts: a spec of what is kept -----------------------------------------------------

SPEC_HELP = ("a layout name ({names}) or a spec of what is kept: down=N,N,N[,N] (R-A pairs per down stage, "
             "outer to inner, 1 or 2 each; 3 numbers remove the innermost stage), mid=yes|no, inner=yes|no; "
             "optionally down_from=.. and up_from=.. (per stage, the teacher pairs/blocks kept, as digits: "
             "down_from=01,0,0,1 up_from=012,02,02,12). Example: 'down=2,1,1,2 mid=no'.")
_YES, _NO = ("yes", "y", "true", "1", "keep", "kept"), ("no", "n", "false", "0", "drop", "none")


def _spec_error(spec: str, why: str) -> BKSDMError:
    return BKSDMError(f"Layout spec {spec!r}: {why}. Give {SPEC_HELP.format(names=', '.join(LAYOUTS))}")


def _flag(spec: str, key: str, value: str) -> bool:
    if value.lower() in _YES:
        return True
    if value.lower() in _NO:
        return False
    raise _spec_error(spec, f"{key}={value} is neither yes nor no")


def _digit_lists(spec: str, key: str, value: str) -> tuple[tuple[int, ...], ...]:
    parts = value.split(",")
    if not all(p.isdigit() for p in parts):
        raise _spec_error(spec, f"{key} must list digits per stage, e.g. 01,0,0,01")
    return tuple(tuple(int(c) for c in p) for p in parts)


def parse_spec(spec: str) -> Layout:
    """The layout a spec describes (see SPEC_HELP), validated against SD's shapes."""
    fields: dict[str, str] = {}
    for token in spec.replace(";", " ").split():
        key, sep, value = token.partition("=")
        key = key.lower()
        if not sep or key not in ("down", "mid", "inner", "down_from", "up_from") or key in fields:
            raise _spec_error(spec, f"{token!r} is not one of down=, mid=, inner=, down_from=, up_from= (once each)")
        fields[key] = value
    if not fields:
        raise _spec_error(spec, "it is empty")
    inner = _flag(spec, "inner", fields["inner"]) if "inner" in fields else None
    down_from = _digit_lists(spec, "down_from", fields["down_from"]) if "down_from" in fields else ()
    up_from = _digit_lists(spec, "up_from", fields["up_from"]) if "up_from" in fields else ()
    if "down" in fields:
        if not all(p.isdigit() for p in fields["down"].split(",")):
            raise _spec_error(spec, "down must list numbers, e.g. down=2,1,1,2")
        down = tuple(int(p) for p in fields["down"].split(","))
    elif down_from:
        down = tuple(len(d) for d in down_from)
    elif up_from:
        down = tuple(len(u) - 1 for u in up_from)
    else:
        down = (TEACHER_PAIRS,) * (TEACHER_STAGES if inner in (None, True) else TEACHER_STAGES - 1)
    if inner is not None and (len(down) == TEACHER_STAGES) != inner:
        raise _spec_error(spec, f"inner={fields['inner']} but down lists {len(down)} stages")
    layout = Layout("", "", down, _flag(spec, "mid", fields.get("mid", "yes")), down_from, up_from)
    validate(layout, spec)
    return _named(layout)


def _named(layout: Layout) -> Layout:
    """`layout` under its table name when it is one, else under its canonical spec."""
    for named in LAYOUTS.values():
        if (named.architecture, named.down_from, named.up_from) == (
                layout.architecture, layout.down_from, layout.up_from):
            return named
    default = Layout("", "", layout.down, layout.mid_block)
    name = f"down={','.join(map(str, layout.down))} mid={'yes' if layout.mid_block else 'no'}"
    if layout.down_from != default.down_from:
        name += " down_from=" + ",".join("".join(map(str, d)) for d in layout.down_from)
    if layout.up_from != default.up_from:
        name += " up_from=" + ",".join("".join(map(str, u)) for u in layout.up_from)
    return Layout(name, f"Custom ({name})", layout.down, layout.mid_block, layout.down_from, layout.up_from)


def _stage_inputs(channels, stages: int, stage: int) -> tuple[int, int, int]:
    """(input of the first down pair, input from below of the first up block, skip of the last up block)."""
    before = channels[stage - 1] if stage else channels[0]
    below = channels[stage + 1] if stage + 1 < stages else channels[stages - 1]
    return before, below, before


def slot_fits(channels, stages: int, stage: int, side: str, slot: int, slots: int, source: int) -> bool:
    """Whether teacher block `source` of a stage has the shapes of a student's block `slot` (of `slots`).

    A down pair takes the previous stage's channels if it is the first, else its own; an up block
    takes the stage below's output if it is the first, and the skip of the previous stage's last
    down block (its downsampler) if it is the last. Teacher and student agree on the channels.
    """
    teacher = list(channels) + [channels[-1]] * (TEACHER_STAGES - len(channels))
    before, below, skip = _stage_inputs(teacher[:stages], stages, stage)
    t_before, t_below, t_skip = _stage_inputs(teacher, TEACHER_STAGES, stage)
    own = teacher[stage]
    if side == "down":
        return (before if slot == 0 else own) == (t_before if source == 0 else own)
    student = (below if slot == 0 else own) + (skip if slot == slots - 1 else own)
    return student == (t_below if source == 0 else own) + (t_skip if source == TEACHER_PAIRS else own)


def validate(layout: Layout, spec: str | None = None, channels=BLOCK_OUT_CHANNELS) -> Layout:
    """`layout` if a teacher with `channels` can fill every kept block of it, else a BKSDMError."""
    spec = spec if spec is not None else layout.name
    if len(layout.down) not in (TEACHER_STAGES - 1, TEACHER_STAGES):
        raise _spec_error(spec, f"down lists {len(layout.down)} stages; SD has 4 (3 without the innermost)")
    if not all(1 <= n <= TEACHER_PAIRS for n in layout.down):
        raise _spec_error(spec, "each down stage keeps 1 or 2 R-A pairs")
    if len(layout.down_from) != layout.stages or len(layout.up_from) != layout.stages:
        raise _spec_error(spec, f"down_from and up_from need {layout.stages} stages, like down")
    if layout.mid_block and channels[layout.stages - 1] != channels[-1]:
        raise _spec_error(spec, "the mid block does not fit the channels of the innermost kept stage")
    for stage, (n, sources, ups) in enumerate(zip(layout.down, layout.down_from, layout.up_from)):
        for side, kept, slots, top in (("down", sources, n, TEACHER_PAIRS - 1), ("up", ups, n + 1, TEACHER_PAIRS)):
            if len(kept) != slots:
                raise _spec_error(spec, f"stage {stage} keeps {n} down pairs, so {side}_from needs {slots} "
                                  f"{side} blocks there, not {len(kept)}")
            if list(kept) != sorted(set(kept)) or max(kept) > top:
                raise _spec_error(spec, f"{side}_from of stage {stage} must list distinct teacher blocks 0-{top} "
                                  "in order")
            for slot, source in enumerate(kept):
                if not slot_fits(channels, layout.stages, stage, side, slot, slots, source):
                    raise _spec_error(spec, f"teacher {side} block {source} of stage {stage} has other "
                                      f"channels than {side} block {slot} of {slots} there (skip connections pin it)")
    return layout


def from_architecture(down: tuple[int, ...], mid_block: bool) -> Layout:
    """The layout with these shapes and the default provenance (detection from shapes alone)."""
    return parse_spec(f"down={','.join(map(str, down))} mid={'yes' if mid_block else 'no'}")


def slug(layout: Layout | str) -> str:
    """A file-name part for a layout: its name for a table layout, 'custom-<hash of the spec>' otherwise
    (a spec is never used as a path)."""
    lay = get_layout(layout)
    return lay.name if lay.is_named else "custom-" + hashlib.sha1(lay.name.encode()).hexdigest()[:10]


def get_layout(name: "str | Layout") -> Layout:
    """A table layout by name, or the layout a spec describes (`parse_spec`)."""
    if isinstance(name, Layout):
        return name
    if name.lower() in LAYOUTS:
        return LAYOUTS[name.lower()]
    if "=" in name:
        return _cached_spec(name)
    raise BKSDMError(f"Unknown layout {name!r}: choose one of {', '.join(LAYOUTS)}, or give a spec of what "
                     "is kept, e.g. 'down=2,1,1,2 mid=no'.")


@lru_cache(maxsize=256)
def _cached_spec(spec: str) -> Layout:
    return parse_spec(spec)


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
    lay = get_layout(layout)
    config = {k: copy.deepcopy(v) for k, v in teacher_config.items() if not k.startswith("_")}
    teacher_stages = len(config["down_block_types"])
    if config.get("layers_per_block") != TEACHER_PAIRS or teacher_stages != TEACHER_STAGES:
        raise BKSDMError(
            "The teacher is not a standard SD-v1/v2 U-Net (layers_per_block 2, 4 stages): "
            "build students from an SD-1.x or SD-2.x model."
        )
    validate(lay, channels=tuple(config["block_out_channels"]))
    per_block = lay.layers_per_block
    config["layers_per_block"] = per_block if isinstance(per_block, int) else list(per_block)
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
    index = 1
    for stage in range(layout.stages):
        for j in range(layout.down[stage]):
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
        per_up = layout.down[stage] + 1
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
    name = get_layout(layout).name
    new = _rename(key, _tables(name)[0])
    if new is None:
        raise BKSDMError(f"U-Net key {key!r} has no place in the {name} layout.")
    return new


def unet_key_to_diffusers(key: str, layout: Layout | str) -> str:
    name = get_layout(layout).name
    new = _rename(key, _tables(name)[1])
    if new is None:
        raise BKSDMError(f"U-Net key {key!r} has no place in the {name} layout.")
    return new


# --- teacher -> student -------------------------------------------------------------------------


def block_sources(layout: Layout | str) -> tuple[tuple[str, str], ...]:
    """(student module, teacher module) for every kept R and A block of `layout` (diffusers names).

    The provenance: down stages keep the teacher pairs `down_from` names, up stages the blocks
    `up_from` names; when the innermost stage is removed, the student's up blocks are numbered one
    lower than the teacher's they come from.
    """
    lay = get_layout(layout)
    offset = TEACHER_STAGES - lay.stages
    pairs = []
    for stage in range(lay.stages):
        parts = ("resnets", "attentions") if lay.has_attention(stage) else ("resnets",)
        for j, source in enumerate(lay.down_from[stage]):
            pairs += [(f"down_blocks.{stage}.{part}.{j}", f"down_blocks.{stage}.{part}.{source}") for part in parts]
    for up in range(lay.stages):
        stage = lay.stages - 1 - up
        parts = ("resnets", "attentions") if lay.has_attention(stage) else ("resnets",)
        for j, source in enumerate(lay.up_from[stage]):
            pairs += [(f"up_blocks.{up}.{part}.{j}", f"up_blocks.{up + offset}.{part}.{source}") for part in parts]
    return tuple(pairs)


def block_map(layout: Layout | str) -> tuple[tuple[str, str], ...]:
    """(student module, teacher module) for every module that is renamed when copying weights.

    Each down stage keeps its first R-A pair and each up stage its first and last (BKSDM.md §2) unless
    the layout's provenance says otherwise; when the innermost stage is removed, the student's up
    stages take the teacher's outer ones. Modules not listed copy from the same name.
    """
    lay = get_layout(layout)
    offset = TEACHER_STAGES - lay.stages
    pairs = [(s, t) for s, t in block_sources(lay) if s != t and s.startswith("up_blocks.")]
    pairs += [(f"up_blocks.{up}.upsamplers", f"up_blocks.{up + offset}.upsamplers")
              for up in range(lay.stages) if offset and lay.stages - 1 - up > 0]
    pairs += [(s, t) for s, t in block_sources(lay) if s != t and s.startswith("down_blocks.")]
    return tuple(pairs)


def ldm_block_sources(layout: Layout | str) -> tuple[tuple[str, str], ...]:
    """(student LDM block, teacher LDM block), e.g. ('input_blocks.4', 'input_blocks.5'): where each of
    the student's input/output blocks sits in SD's numbering (for remapping LoRA and ControlNet)."""
    lay = get_layout(layout)
    found: dict[str, str] = {}
    for student, teacher in block_sources(lay):
        leaf = ".norm1.weight" if ".resnets." in student else ".proj_in.weight"
        s = unet_key_to_ldm(student + leaf, lay).split(".")
        t = unet_key_to_ldm(teacher + leaf, TEACHER).split(".")
        found.setdefault(".".join(s[:2]), ".".join(t[:2]))
    return tuple(found.items())


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
    lay = get_layout(layout)
    offset = TEACHER_STAGES - lay.stages
    pairs = []
    for stage in range(lay.stages):
        if lay.has_downsampler(stage) == TEACHER.has_downsampler(stage):
            pairs.append((f"down_blocks.{stage}", f"down_blocks.{stage}"))
        else:
            pairs.append(
                (
                    f"down_blocks.{stage}.attentions.{TEACHER_PAIRS - 1}.proj_out",
                    f"down_blocks.{stage}.attentions.{lay.down[stage] - 1}.proj_out",
                )
            )
    pairs += [(f"up_blocks.{up + offset}", f"up_blocks.{up}") for up in range(lay.stages)]
    return tuple(pairs)
