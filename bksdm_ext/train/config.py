"""Typed job configs for training: the CLI, the BK-SDM tab and the job runner build and save them alike.

Defaults are the paper's recipe (BKSDM.md §3 distillation, §4 DreamBooth). Each field is a
`job_config.setting` (help, label, group, choices, range), from which the CLI flags and the tab's
form are generated. `validate()` checks everything that can be checked without loading a model
(the base checks types and ranges) and raises BKSDMError saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import layouts
from ..errors import BKSDMError
from ..io import check_model_source, check_writable
from ..job_config import JobConfig, setting

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
FEATURE_KD = ("sum", "normalised")
MAX_STEPS = 10**7  # the most optimiser updates one job may ask for (a month of 0.3 s steps)
DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a golden retriever sitting in a field of flowers, highly detailed",
    "a cozy wooden cabin in a snowy forest at dusk",
    "portrait of an old fisherman, oil painting",
)


@dataclass
class TrainConfig(JobConfig):
    """What every training job shares: optimiser, precision, speed switches, checkpoints, samples."""

    # the setting naming the model a checkpoint's weights go into (an evaluation of the job's checkpoints
    # builds on it: `evaluate.sources`)
    model_setting: ClassVar[str] = ""

    def checkpoint_modules(self, pipe) -> dict:
        """The modules a checkpoint's weight groups load into (group name -> module), made from `pipe`'s
        parts (the `model_setting` model) shaped as this job trains them."""
        raise NotImplementedError

    resolution: int = setting(512, "Training image side in pixels (images are resized on the shorter side, then "
                                   "cropped).", label="Resolution (px)", group="Data", min=64, max=2048, multiple_of=8)
    train_batch_size: int = setting(64, "Images per step on each device.", label="Batch size", group="Recipe",
                                    min=1, max=4096)
    gradient_accumulation_steps: int = setting(4, "Steps whose gradients are summed before one optimiser update.",
                                               label="Gradient accumulation", group="Recipe", min=1, max=4096)
    max_steps: int = setting(50_000, "Optimiser updates to train for.", label="Steps (optimiser updates)", group="Recipe",
                             min=1, max=MAX_STEPS)
    learning_rate: float = setting(5e-5, "AdamW learning rate (constant, no warm-up).", label="Learning rate",
                                   group="Recipe", min=0.0, max=1.0)
    adam_beta1: float = setting(0.9, "AdamW beta1.", label="Adam beta1", group="Recipe", advanced=True, min=0.0,
                                max=1.0)
    adam_beta2: float = setting(0.999, "AdamW beta2.", label="Adam beta2", group="Recipe", advanced=True, min=0.0,
                                max=1.0)
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.", label="Weight decay", group="Recipe",
                                       advanced=True, min=0.0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon.", label="Adam epsilon", group="Recipe", advanced=True,
                                  min=0.0)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this value (0 = no clipping).",
                                   label="Gradient clipping", group="Recipe", advanced=True, min=0.0)
    optimizer: str = setting("adamw", "adamw: torch's fused AdamW; adamw8bit: bitsandbytes 8-bit AdamW (if "
                                      "installed): less memory; on CPU (recent versions) its step is much slower.",
                             label="Optimizer", group="Speed & memory", choices=OPTIMIZERS)
    mixed_precision: str = setting("fp16", "Autocast precision of the trained model: fp16 needs a GPU "
                                           "(bf16 is used on CPU).", label="Mixed precision", group="Speed & memory",
                                   choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: less memory, slower.",
                                           label="Gradient checkpointing", group="Speed & memory")
    channels_last: bool = setting(True, "Channels-last memory format for the U-Nets: faster convolutions on GPUs "
                                        "(on a CPU it is slower and not used).", label="Channels last",
                                  group="Speed & memory", advanced=True)
    compile: bool = setting(False, "torch.compile the trained U-Net (slow first steps, faster later).",
                            label="torch.compile", group="Speed & memory", advanced=True)
    xformers: bool = setting(False, "Use xformers attention when installed (else PyTorch SDPA).",
                             label="xformers attention", group="Speed & memory", advanced=True)
    center_crop: bool = setting(True, "Crop the center of each image (else a random crop).", label="Center crop",
                                group="Data", advanced=True)
    random_flip: bool = setting(True, "Flip images horizontally at random.", label="Random flip", group="Data", advanced=True)
    seed: int = setting(1234, "Random seed: the same seed and data give the same run.", label="Seed", group="Recipe", advanced=True,
                        min=0, max=2**63 - 1)
    num_workers: int = setting(2, "Data-loading worker processes (0 = load in the training process).",
                               label="Data workers", group="Speed & memory", advanced=True, min=0, max=256)
    checkpoint_every: int = setting(1000, "Save a resumable checkpoint every N steps and at the end "
                                          "(0 = never; cancelling always saves one).", label="Checkpoint every (steps)",
                                    group="Output", min=0)
    checkpoints_keep: int = setting(3, "Keep this many newest checkpoints (0 = keep all).", label="Checkpoints kept",
                                    group="Output", advanced=True, min=0)
    sample_every: int = setting(1000, "Render validation images every N steps (0 = never).", label="Samples every (steps)",
                                group="Output", min=0)
    sample_prompts: list = setting(DEFAULT_PROMPTS, "Fixed prompts of the validation images.",
                                   label="Sample prompts", group="Output", kind="prompt")
    sample_steps: int = setting(25, "Denoising steps of the validation images (PNDM).", label="Sample steps",
                                group="Output", advanced=True, min=1, max=1000)
    log_every: int = setting(10, "Write losses and speed to the log and the progress file every N steps.",
                             label="Log every (steps)", group="Output", advanced=True, min=1)
    output_dir: str = setting("", "Where the finished model goes (empty = the job folder's output/).",
                              label="Output folder", group="Output", kind="folder")
    output_name: str = setting("", "File name (no extension) of the WebUI checkpoint (empty = from the job).",
                               label="Output name", group="Output", advanced=True, kind="name")

    # --- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        super().validate()  # types, choices and ranges of the settings
        if not (self.learning_rate or 0) > 0 and self.learning_rate is not None:
            raise BKSDMError("learning_rate must be positive.")
        if self.output_dir:
            check_writable(self.output_dir, "output_dir")


# The tab's recipe presets (ui/presets.py describes each): the settings they give, per kind.
QUICK_TEST = {"max_steps": 64, "resolution": 256, "train_batch_size": 4, "gradient_accumulation_steps": 1,
              "checkpoint_every": 32, "sample_every": 32, "sample_steps": 10, "log_every": 1}
SMALL_GPU = {"resolution": 512, "gradient_checkpointing": True, "optimizer": "adamw8bit", "mixed_precision": "fp16"}


@dataclass
class CaptionedImages:
    """The captioned image folder that distillation and latent-consistency distillation train on.

    A mixin, not a JobConfig: its settings count as each kind's own (`JobConfig.settings`), so they stay
    in the kind's own part of the CLI and the form."""

    data: str = setting("", "Image folder with metadata.jsonl or metadata.csv (file_name, text), as "
                            "LAION-Aesthetics.", label="Training images", group="Data", kind="folder")
    caption_column: str = setting("text", "Caption column of the metadata.", label="Caption column", group="Data",
                                  advanced=True)
    image_column: str = setting("file_name", "Image file column of the metadata.", label="Image column",
                                group="Data", advanced=True)

    def check_data(self) -> None:
        """The folder's metadata names existing images with captions (else BKSDMError saying what is wrong)."""
        from .data import read_metadata

        read_metadata(self.data, self.image_column, self.caption_column)


@dataclass
class DistillConfig(TrainConfig, CaptionedImages):
    """Distillation retraining of a BK-SDM student from an SD teacher (BKSDM.md §3)."""

    kind: ClassVar[str] = "distill"
    model_setting: ClassVar[str] = "teacher"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "Quick test": QUICK_TEST,
        "Single 24 GB GPU": {**SMALL_GPU, "train_batch_size": 8, "gradient_accumulation_steps": 32, "cache": True,
                             "teacher_half": True},
        "Single 12 GB GPU": {**SMALL_GPU, "train_batch_size": 2, "gradient_accumulation_steps": 128, "cache": True,
                             "teacher_half": True},
    }

    teacher: str = setting("", "The SD-v1/v2 teacher: a diffusers folder, a single-file checkpoint, or a hub id "
                               "(online).", label="Teacher model", group="Model", kind="model")
    layout: str = setting("small", "Student layout to build from the teacher and train: a named one, or a custom "
                          "spec of what is kept, e.g. 'down=2,1,1,2 mid=no' (as `bksdm prune --keep`).",
                          label="Student layout", group="Model", choices=lambda: layouts.STUDENTS, custom=True)
    lambda_task: float = setting(1.0, "Weight of the task loss ||eps - eps_student||^2.", label="Task loss weight",
                                 group="Losses", advanced=True, min=0.0)
    lambda_out_kd: float = setting(1.0, "Weight of the output-KD loss ||eps_teacher - eps_student||^2.",
                                   label="Output-KD weight", group="Losses", advanced=True, min=0.0)
    lambda_feat_kd: float = setting(1.0, "Weight of the feature-KD loss (sum over the stage pairs of the layout).",
                                    label="Feature-KD weight", group="Losses", advanced=True, min=0.0)
    feature_kd: str = setting("sum", "sum: each stage's squared error (a mean), summed, as the paper; normalised: "
                                     "each divided by the teacher feature's mean square (LAPTOP-Diff), so no stage "
                                     "dominates by its size.", label="Feature-KD form", group="Losses", advanced=True,
                              choices=FEATURE_KD)
    feature_kd_stage_weights: list = setting((), "Weight of each stage pair's feature term, in the layout's order "
                                                 "(down stages, then up; losses.csv names them); empty = 1 each.",
                                             label="Feature-KD stage weights", group="Losses", advanced=True)
    use_ema: bool = setting(True, "Keep an exponential moving average of the student; the output is the EMA.",
                            label="EMA", group="Recipe", advanced=True)
    ema_decay: float = setting(0.9999, "EMA decay per optimiser update.", label="EMA decay", group="Recipe",
                               advanced=True, min=0.0, max=1.0)
    teacher_half: bool = setting(True, "Run the frozen teacher, VAE and text encoder in half precision (bf16 on "
                                       "CPU).", label="Half-precision teacher", group="Speed & memory", advanced=True)
    cache: bool = setting(False, "Encode every image and caption once (VAE latents, text embeddings) into a cache "
                                 "reused across runs; about 150 KB a pair at 512 px (180 KB with random flips, "
                                 "whose flipped crops are encoded too). Crops are then centred.",
                          label="Latent cache", group="Speed & memory")
    cache_dir: str = setting("", "Folder of the latent/text cache (empty = ~/.cache/bksdm/latents).",
                             label="Cache folder", group="Speed & memory", advanced=True, kind="folder")

    def validate(self) -> None:
        lay = layouts.get_layout(self.layout)  # an unknown name is named as such, before the choices check
        if not lay.is_student:
            raise BKSDMError(f"layout must be a student layout: {', '.join(layouts.STUDENTS)}, or a spec of "
                             "what is kept (e.g. 'down=2,1,1,2 mid=no').")
        super().validate()
        check_model_source(self.teacher, "teacher")
        self.check_data()
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

    def checkpoint_modules(self, pipe) -> dict:
        from ..student import build_student

        student, _ = build_student(pipe.unet, self.layout)
        return {"student": student}


@dataclass
class DreamBoothConfig(TrainConfig):
    """DreamBooth personalisation of a BK-SDM (or SD) model, full or LoRA (BKSDM.md §4)."""

    kind: ClassVar[str] = "dreambooth"
    model_setting: ClassVar[str] = "base_model"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "Quick test": {**QUICK_TEST, "train_batch_size": 1},
        "Single 24 GB GPU": {**SMALL_GPU, "train_batch_size": 1},
        "Single 12 GB GPU": {**SMALL_GPU, "train_batch_size": 1, "train_text_encoder": False},
    }

    base_model: str = setting("", "The model to personalise: a BK-SDM or SD diffusers folder or single-file "
                                  "checkpoint.", label="Base model", group="Model", kind="model")
    instance_data: str = setting("", "Folder with the subject's photos.", label="Subject photos", group="Data",
                                 kind="folder")
    identifier: str = setting("sks", "The rare token that names the subject; the instance prompt must contain it.",
                              label="Identifier", group="Data")
    instance_prompt: str = setting("a sks dog", "Prompt of the subject's photos, with the identifier.",
                                   label="Instance prompt", group="Data", kind="prompt")
    class_prompt: str = setting("a dog", "Prompt of the subject's class (prior preservation).",
                                label="Class prompt", group="Data", kind="prompt")
    prior_preservation: bool = setting(True, "Train on generated class images too, so the class keeps its look.",
                                       label="Prior preservation", group="Losses", advanced=True)
    prior_loss_weight: float = setting(1.0, "Weight of the class (prior-preservation) loss.",
                                       label="Prior loss weight", group="Losses", advanced=True, min=0.0)
    num_class_images: int = setting(200, "Class images to use; missing ones are generated once and cached in the "
                                         "job.", label="Class images", group="Data", advanced=True, min=0, max=100_000)
    class_data: str = setting("", "A folder of your own class images (empty = generate them into the job folder).",
                              label="Class image folder", group="Data", advanced=True, kind="folder")
    class_generator: str = setting("", "Model that generates class images (empty = the base model; the paper uses "
                                       "SD).", label="Class image model", group="Model", advanced=True, kind="model")
    class_guidance: float = setting(7.5, "Guidance scale of the class-image generation.", label="Class guidance",
                                    group="Data", advanced=True, min=0.0, max=50.0)
    class_steps: int = setting(25, "Denoising steps per generated class image (PNDM).", label="Class image steps",
                               group="Data", advanced=True, min=1, max=1000)
    mode: str = setting("full", "full: U-Net (and text encoder) fine-tuning; lora: peft LoRA adapters.",
                        label="Mode", group="Model", choices=("full", "lora"))
    train_text_encoder: bool = setting(True, "Train the text encoder too (full mode: all of it; LoRA: q/v "
                                             "adapters).", label="Train text encoder", group="Recipe")
    lora_rank: int = setting(16, "U-Net LoRA rank (on attention to_q, to_v).", label="LoRA rank", group="Recipe", advanced=True,
                             min=1, max=1024)
    lora_alpha: float = setting(27.0, "U-Net LoRA alpha.", label="LoRA alpha", group="Recipe", advanced=True, min=0.0)
    text_lora_rank: int = setting(16, "Text-encoder LoRA rank (on q_proj, v_proj).", label="Text LoRA rank",
                                  group="Recipe", advanced=True, min=1, max=1024)
    text_lora_alpha: float = setting(17.0, "Text-encoder LoRA alpha.", label="Text LoRA alpha", group="Recipe",
                                     advanced=True, min=0.0)
    # DreamBooth's own recipe (BKSDM.md §4) in place of the distillation one
    resolution: int = setting(512, "Training image side in pixels (random crop unless center_crop).",
                              label="Resolution (px)", group="Data", advanced=True, min=64, max=2048, multiple_of=8)
    train_batch_size: int = setting(1, "Instance images per step (with prior preservation, as many class images "
                                       "join).", label="Batch size", group="Recipe", min=1, max=4096)
    gradient_accumulation_steps: int = setting(1, "Steps whose gradients are summed before one optimiser update.",
                                               label="Gradient accumulation", group="Recipe", advanced=True, min=1, max=4096)
    max_steps: int = setting(800, "Optimiser updates to train for.", label="Steps (optimiser updates)", group="Recipe",
                             min=1, max=MAX_STEPS)
    learning_rate: float | None = setting(None, "Learning rate (empty = 1e-6 for full, 1e-4 for LoRA).",
                                          label="Learning rate", group="Recipe", min=0.0, max=1.0)
    center_crop: bool = setting(False, "Crop the center of each image (else a random crop).", label="Center crop",
                                group="Data", advanced=True)
    random_flip: bool = setting(False, "Flip images horizontally at random.", label="Random flip", group="Data", advanced=True)
    checkpoint_every: int = setting(200, "Save a resumable checkpoint every N steps and at the end "
                                         "(0 = never; cancelling always saves one).", label="Checkpoint every (steps)",
                                    group="Output", min=0)
    sample_every: int = setting(200, "Render validation images every N steps (0 = never).", label="Samples every (steps)",
                                group="Output", min=0)
    sample_prompts: list = setting(("a sks dog in the snow", "a sks dog on the beach"),
                                   "Fixed prompts of the validation images.", label="Sample prompts", group="Output",
                                   kind="prompt")
    num_workers: int = setting(0, "Data-loading worker processes (0 = load in the training process).",
                               label="Data workers", group="Speed & memory", advanced=True, min=0, max=256)

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.mode == "lora" else 1e-6

    def checkpoint_modules(self, pipe) -> dict:
        if self.mode == "lora":
            from .dreambooth import TEXT_LORA_TARGETS, UNET_LORA_TARGETS
            from .lora import add_lora

            add_lora(pipe.unet, self.lora_rank, self.lora_alpha, UNET_LORA_TARGETS)
            if self.train_text_encoder:
                add_lora(pipe.text_encoder, self.text_lora_rank, self.text_lora_alpha, TEXT_LORA_TARGETS)
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    def validate(self) -> None:
        from .data import list_images

        super().validate()
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
