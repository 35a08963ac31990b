"""Typed job configs for training: the CLI, the BK-SDM tab and the job runner build and save them alike.

Defaults are the paper's recipe (BKSDM.md §3 distillation, §4 DreamBooth). Each field's metadata
carries `help` (and `choices` where the value is one of a few), from which the tab builds its form.
`validate()` checks everything that can be checked without loading a model and raises BKSDMError
saying what to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import BKSDMError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, the WebUI's
    import tomli as tomllib

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
FEATURE_KD = ("sum", "normalised")
DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a golden retriever sitting in a field of flowers, highly detailed",
    "a cozy wooden cabin in a snowy forest at dusk",
    "portrait of an old fisherman, oil painting",
)


def _f(default, help: str, choices: tuple | None = None, **kw):
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


class JobConfig:
    """Serialisation shared by every job config dataclass: dict, TOML/JSON file, form help."""

    kind: ClassVar[str] = ""

    # --- serialisation ------------------------------------------------------------------------

    @classmethod
    def field_help(cls) -> dict[str, dict]:
        """{name: {"type", "default", "help", "choices"?}} in declaration order, for building forms."""
        out = {}
        for f in _ordered_fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = {"type": _type_name(f), "default": default, **f.metadata}
        return out

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in _ordered_fields(type(self))}
        return {name: _plain(value) for name, value in values.items() if value is not None}  # TOML has no null

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise BKSDMError(f"This is a {kind!r} job config, not a {cls.kind!r} one.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise BKSDMError(f"Unknown {cls.kind} setting(s): {', '.join(unknown)}. Known: {', '.join(fields)}.")
        return cls(**{name: _coerce(fields[name], value) for name, value in data.items()})

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a config from a .toml or .json file."""
        path = Path(path)
        if not path.is_file():
            raise BKSDMError(f"Config file {path} does not exist.")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, tomllib.TOMLDecodeError) as error:
            raise BKSDMError(f"Config file {path} cannot be read: {error}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as TOML (or JSON for a .json path), atomically."""
        path = Path(path)
        data = {"kind": self.kind, **self.to_dict()}
        text = json.dumps(data, indent=2) if path.suffix.lower() == ".json" else to_toml(data)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


@dataclass
class TrainConfig(JobConfig):
    """What every training job shares: optimiser, precision, speed switches, checkpoints, samples."""

    resolution: int = _f(512, "Training image side in pixels (images are resized on the shorter side, then cropped).")
    train_batch_size: int = _f(64, "Images per step on each device.")
    gradient_accumulation_steps: int = _f(4, "Steps whose gradients are summed before one optimiser update.")
    max_steps: int = _f(50_000, "Optimiser updates to train for.")
    learning_rate: float = _f(5e-5, "AdamW learning rate (constant, no warm-up).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 = no clipping).")
    optimizer: str = _f("adamw", "adamw: torch's fused AdamW; adamw8bit: bitsandbytes 8-bit AdamW (if installed): "
                                 "less memory; on CPU (recent versions) its step is much slower.", OPTIMIZERS)
    mixed_precision: str = _f("fp16", "Autocast precision of the trained model: fp16 needs a GPU "
                                      "(bf16 is used on CPU).", MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, slower.")
    channels_last: bool = _f(True, "Channels-last memory format for the U-Nets: faster convolutions on GPUs "
                                   "(on a CPU it is slower and not used).")
    compile: bool = _f(False, "torch.compile the trained U-Net (slow first steps, faster later).")
    xformers: bool = _f(False, "Use xformers attention when installed (else PyTorch SDPA).")
    center_crop: bool = _f(True, "Crop the center of each image (else a random crop).")
    random_flip: bool = _f(True, "Flip images horizontally at random.")
    seed: int = _f(1234, "Random seed: the same seed and data give the same run.")
    num_workers: int = _f(2, "Data-loading worker processes (0 = load in the training process).")
    checkpoint_every: int = _f(1000, "Save a resumable checkpoint every N steps and at the end "
                                     "(0 = never; cancelling always saves one).")
    checkpoints_keep: int = _f(3, "Keep this many newest checkpoints (0 = keep all).")
    sample_every: int = _f(1000, "Render validation images every N steps (0 = never).")
    sample_prompts: list = _f(DEFAULT_PROMPTS, "Fixed prompts of the validation images.")
    sample_steps: int = _f(25, "Denoising steps of the validation images (PNDM).")
    log_every: int = _f(10, "Write losses and speed to the log and the progress file every N steps.")
    output_dir: str = _f("", "Where the finished model goes (empty = the job folder's output/).")
    output_name: str = _f("", "File name (no extension) of the WebUI checkpoint (empty = from the job).")

    # --- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_steps", "sample_steps",
                    "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise BKSDMError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("checkpoint_every", "checkpoints_keep", "sample_every", "num_workers", "max_grad_norm",
                     "adam_weight_decay"):
            if getattr(self, name) < 0:
                raise BKSDMError(f"{name} cannot be negative.")
        if self.resolution % 8:
            raise BKSDMError(f"resolution must be a multiple of 8 (the VAE's factor), not {self.resolution}.")
        if not (self.learning_rate or 0) > 0 and self.learning_rate is not None:
            raise BKSDMError("learning_rate must be positive.")
        for name, choices in (("mixed_precision", MIXED_PRECISION), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise BKSDMError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}.")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise BKSDMError(f"output_dir {self.output_dir} exists and is not a folder.")


@dataclass
class DistillConfig(TrainConfig):
    """Distillation retraining of a BK-SDM student from an SD teacher (BKSDM.md §3)."""

    kind: ClassVar[str] = "distill"

    teacher: str = _f("", "The SD-v1/v2 teacher: a diffusers folder, a single-file checkpoint, or a hub id (online).")
    layout: str = _f("small", "Student layout to build from the teacher and train.", ("base", "small", "tiny"))
    data: str = _f("", "Image folder with metadata.jsonl or metadata.csv (file_name, text), as LAION-Aesthetics.")
    caption_column: str = _f("text", "Caption column of the metadata.")
    image_column: str = _f("file_name", "Image file column of the metadata.")
    lambda_task: float = _f(1.0, "Weight of the task loss ||eps - eps_student||^2.")
    lambda_out_kd: float = _f(1.0, "Weight of the output-KD loss ||eps_teacher - eps_student||^2.")
    lambda_feat_kd: float = _f(1.0, "Weight of the feature-KD loss (sum over the stage pairs of the layout).")
    feature_kd: str = _f("sum", "sum: each stage's squared error (a mean), summed, as the paper; normalised: each "
                                "divided by the teacher feature's mean square (LAPTOP-Diff), so no stage "
                                "dominates by its size.", FEATURE_KD)
    feature_kd_stage_weights: list = _f((), "Weight of each stage pair's feature term, in the layout's order "
                                            "(down stages, then up; losses.csv names them); empty = 1 each.")
    use_ema: bool = _f(True, "Keep an exponential moving average of the student; the output is the EMA.")
    ema_decay: float = _f(0.9999, "EMA decay per optimiser update.")
    teacher_half: bool = _f(True, "Run the frozen teacher, VAE and text encoder in half precision (bf16 on CPU).")
    cache: bool = _f(False, "Encode every image and caption once (VAE latents, text embeddings) into a cache "
                            "reused across runs; about 150 KB a pair at 512 px (180 KB with random flips, "
                            "whose flipped crops are encoded too). Crops are then centred.")
    cache_dir: str = _f("", "Folder of the latent/text cache (empty = ~/.cache/bksdm/latents).")

    def validate(self) -> None:
        from .. import layouts
        from .data import read_metadata

        super().validate()
        lay = layouts.get_layout(self.layout)
        if not lay.is_student:
            raise BKSDMError("layout must be a student layout: base, small or tiny.")
        check_model_source(self.teacher, "teacher")
        read_metadata(self.data, self.image_column, self.caption_column)
        if self.use_ema and not 0 < self.ema_decay < 1:
            raise BKSDMError("ema_decay must be between 0 and 1.")
        if self.feature_kd not in FEATURE_KD:
            raise BKSDMError(f"feature_kd must be one of {', '.join(FEATURE_KD)}, not {self.feature_kd!r}.")
        pairs = layouts.feature_kd_pairs(lay)
        weights = self.feature_kd_stage_weights
        try:
            bad = any(not float(w) >= 0 for w in weights)
        except (TypeError, ValueError):
            bad = True
        if weights and (bad or len(weights) != len(pairs)):
            raise BKSDMError(f"feature_kd_stage_weights needs {len(pairs)} non-negative numbers for the {lay.name} "
                             f"layout (stages {', '.join(s for _, s in pairs)}), or none; got {list(weights)}.")


@dataclass
class DreamBoothConfig(TrainConfig):
    """DreamBooth personalisation of a BK-SDM (or SD) model, full or LoRA (BKSDM.md §4)."""

    kind: ClassVar[str] = "dreambooth"

    base_model: str = _f("", "The model to personalise: a BK-SDM or SD diffusers folder or single-file checkpoint.")
    instance_data: str = _f("", "Folder with the subject's photos.")
    identifier: str = _f("sks", "The rare token that names the subject; the instance prompt must contain it.")
    instance_prompt: str = _f("a sks dog", "Prompt of the subject's photos, with the identifier.")
    class_prompt: str = _f("a dog", "Prompt of the subject's class (prior preservation).")
    prior_preservation: bool = _f(True, "Train on generated class images too, so the class keeps its look.")
    prior_loss_weight: float = _f(1.0, "Weight of the class (prior-preservation) loss.")
    num_class_images: int = _f(200, "Class images to use; missing ones are generated once and cached in the job.")
    class_data: str = _f("", "A folder of your own class images (empty = generate them into the job folder).")
    class_generator: str = _f("", "Model that generates class images (empty = the base model; the paper uses SD).")
    class_guidance: float = _f(7.5, "Guidance scale of the class-image generation.")
    class_steps: int = _f(25, "Denoising steps per generated class image (PNDM).")
    mode: str = _f("full", "full: U-Net (and text encoder) fine-tuning; lora: peft LoRA adapters.", ("full", "lora"))
    train_text_encoder: bool = _f(True, "Train the text encoder too (full mode: all of it; LoRA: q/v adapters).")
    lora_rank: int = _f(16, "U-Net LoRA rank (on attention to_q, to_v).")
    lora_alpha: float = _f(27.0, "U-Net LoRA alpha.")
    text_lora_rank: int = _f(16, "Text-encoder LoRA rank (on q_proj, v_proj).")
    text_lora_alpha: float = _f(17.0, "Text-encoder LoRA alpha.")
    # DreamBooth's own recipe (BKSDM.md §4) in place of the distillation one
    resolution: int = _f(512, "Training image side in pixels (random crop unless center_crop).")
    train_batch_size: int = _f(1, "Instance images per step (with prior preservation, as many class images join).")
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients are summed before one optimiser update.")
    max_steps: int = _f(800, "Optimiser updates to train for.")
    learning_rate: float | None = _f(None, "Learning rate (empty = 1e-6 for full, 1e-4 for LoRA).")
    center_crop: bool = _f(False, "Crop the center of each image (else a random crop).")
    random_flip: bool = _f(False, "Flip images horizontally at random.")
    checkpoint_every: int = _f(200, "Save a resumable checkpoint every N steps and at the end "
                                    "(0 = never; cancelling always saves one).")
    sample_every: int = _f(200, "Render validation images every N steps (0 = never).")
    sample_prompts: list = _f(("a sks dog in the snow", "a sks dog on the beach"),
                              "Fixed prompts of the validation images.")
    num_workers: int = _f(0, "Data-loading worker processes (0 = load in the training process).")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.mode == "lora" else 1e-6

    def validate(self) -> None:
        from .data import list_images

        super().validate()
        if self.mode not in ("full", "lora"):
            raise BKSDMError(f"mode must be 'full' or 'lora', not {self.mode!r}.")
        check_model_source(self.base_model, "base_model")
        unet_config = Path(self.base_model) / "unet" / "config.json"
        if unet_config.is_file():
            from .models import layout_of

            layout_of(json.loads(unet_config.read_text()))
        if self.class_generator:
            check_model_source(self.class_generator, "class_generator")
        if not self.identifier.strip():
            raise BKSDMError("Give an identifier: a rare token such as 'sks' that names the subject.")
        if self.identifier not in self.instance_prompt.split() and self.identifier not in self.instance_prompt:
            raise BKSDMError(f"The instance prompt {self.instance_prompt!r} does not contain the identifier "
                             f"{self.identifier!r}: write it as e.g. 'a {self.identifier} dog'.")
        list_images(self.instance_data, "instance_data")
        if self.prior_preservation:
            if not self.class_prompt.strip():
                raise BKSDMError("Prior preservation needs a class prompt, e.g. 'a dog'.")
            if self.num_class_images < 1:
                raise BKSDMError("num_class_images must be at least 1 with prior preservation.")
            if self.class_data:
                list_images(self.class_data, "class_data", allow_empty=True)
        for name in ("lora_rank", "text_lora_rank", "class_steps"):
            if getattr(self, name) < 1:
                raise BKSDMError(f"{name} must be at least 1.")


CONFIGS: dict[str, type] = {c.kind: c for c in (DistillConfig, DreamBoothConfig)}


def config_class(kind: str) -> type:
    try:
        return CONFIGS[kind]
    except KeyError:
        raise BKSDMError(f"Unknown training kind {kind!r}: choose one of {', '.join(CONFIGS)}.") from None


def check_model_source(source: str, name: str) -> None:
    """A model is a diffusers folder, a single-file checkpoint, or a hub id 'owner/name' (needs internet)."""
    if not source:
        raise BKSDMError(f"Set {name}: a diffusers folder or a .safetensors/.ckpt checkpoint.")
    path = Path(source)
    if path.is_dir():
        if not (path / "unet" / "config.json").is_file():
            raise BKSDMError(f"{name} {source} is a folder without unet/config.json: give a diffusers pipeline folder.")
    elif path.is_file():
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise BKSDMError(f"{name} {source} is not a .safetensors or .ckpt checkpoint.")
    elif os.path.isabs(source) or source.count("/") != 1 or source.startswith((".", "~")):
        raise BKSDMError(f"{name} {source} does not exist: give an existing folder or checkpoint file.")


def _ordered_fields(cls) -> list[dataclasses.Field]:
    """The job's own settings (model, data) first, then the shared training ones."""
    own = set(vars(cls).get("__annotations__", {})) - set(TrainConfig.__annotations__)
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", "").replace("typing.", "")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _coerce(f: dataclasses.Field, value):
    kind = _type_name(f)
    try:
        if value is None or kind == "list":
            return list(value) if isinstance(value, (list, tuple)) else value
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(value)
            return value
        return str(value)
    except (TypeError, ValueError):
        raise BKSDMError(f"Setting {f.name} must be a {kind}, not {value!r}.") from None


def to_toml(data: dict[str, Any]) -> str:
    """A flat TOML document: strings, numbers, booleans and lists of those are all a job config holds."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise BKSDMError(f"Cannot write {type(v).__name__} to TOML.")

    return "".join(f"{k} = {value(v)}\n" for k, v in data.items())
