"""The `lcm` job: latent-consistency distillation of a BK-SDM (or any SD-1/2) model into a few-step one.

EdgeFusion (arXiv 2404.11925) did this to BK-SDM-Tiny; LCM-LoRA makes SD-1.5 usable in 4 steps. The
maths is `lcm.lcd_loss` (diffusers' train_lcm_distill{_lora,}_sd_wds.py recipe, BKSDM.md §6); the
data, latent cache, checkpoints, resume, cancel, progress, samples, speed options and Accelerate are
distillation's (`distill` helpers, `core.fit`).

- LoRA mode (default, rank 64, lr 1e-4): peft adapters on the student; the target network is the
  student itself without gradients (diffusers' LCM-LoRA). Output: a LoRA in the WebUI's LDM naming
  for the model's layout, and the diffusers form.
- Full mode (lr 1e-6): all U-Net weights train; the target network is their EMA (decay
  `target_ema_decay` after the shared EMA's warm-up), which is also the exported model: a diffusers
  folder (with an LCM scheduler) and a WebUI checkpoint with its yaml.

No guidance embedding: diffusers' full recipe adds `time_cond_proj_dim` (a w-embedding input), but the
WebUI's LDM U-Net has no such input and our loader refuses unexpected keys. The student is trained
without it, as LCM-LoRA is: w is drawn from [w_min, w_max] for the teacher's guidance and the student
learns its average (set w_min = w_max for one fixed guidance).

Read `train` top to bottom: data, models, the loss of one micro-batch, the loop, the output.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import layouts
from ..errors import BKSDMError
from . import lcm
from ..io import check_model_source
from ..job_config import setting
from .config import CaptionedImages, DreamBoothConfig, TrainConfig
from .data import batch_source
from .distill import conditioning, half_autocast, make_dataset, read_pairs
from .export import check_output_free, export_model, model_bytes, output_dir, outputs
from .lora import add_lora, write_lora
from .loop import Job, fit
from .models import encode_prompts, freeze, layout_of, load_parts
from .samples import render_samples
from .speed import EMA, apply_speedups, half_dtype

# diffusers' LCM-LoRA targets: every linear and convolution of the attention and residual blocks
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# how a consistency model is sampled (LCM-LoRA's published use): the WebUI's "LCM" sampler (1.8+)
RECOMMENDED = {"sampler": "LCM", "steps": 4, "steps_range": [2, 8], "cfg_scale": 1.5, "cfg_range": [1.0, 2.0]}
MODES = ("lora", "full")


@dataclass
class LcmConfig(TrainConfig, CaptionedImages):
    """Latent consistency distillation into a few-step model (BKSDM.md §6), LoRA or full."""

    kind: ClassVar[str] = "lcm"
    model_setting: ClassVar[str] = "model"

    model: str = setting("", "The model to make few-step: a BK-SDM or SD-1/2 diffusers folder or single-file "
                             "checkpoint.", label="Model", group="Model", kind="model")
    teacher: str = setting("", "The teacher whose guided ODE the student learns: empty = the model itself "
                               "(EdgeFusion); or a bigger one of the same family (its SD, any checkpoint sharing its "
                               "VAE and text encoder).", label="Teacher (empty = the model)", group="Model",
                           kind="model")
    mode: str = setting("lora", "lora: LCM-LoRA adapters (rank 64); full: all U-Net weights, with an EMA target "
                                "network. Both outputs load in the WebUI.", label="Mode", group="Model",
                        choices=MODES)
    lora_rank: int = setting(64, "LoRA rank (diffusers' LCM-LoRA: 64).", label="LoRA rank", group="Recipe", min=1,
                             max=1024)
    lora_alpha: float = setting(64.0, "LoRA alpha (= rank: no extra scaling).", label="LoRA alpha", group="Recipe",
                                advanced=True, min=0.0)
    w_min: float = setting(3.0, "Smallest guidance scale w of the teacher (LCM form: cond + w (cond - uncond)).",
                           label="Guidance w min", group="Losses", advanced=True, min=0.0)
    w_max: float = setting(15.0, "Largest guidance scale w of the teacher.", label="Guidance w max", group="Losses",
                           advanced=True, min=0.0)
    solver_steps: int = setting(50, "Timesteps of the skipping-step DDIM solver (of the 1,000 training timesteps).",
                                label="Solver steps", group="Losses", advanced=True, min=1, max=1000)
    huber_c: float = setting(0.001, "c of the pseudo-Huber loss sqrt(d^2 + c^2) - c.", label="Huber c",
                             group="Losses", advanced=True, min=1e-9)
    timestep_scaling: float = setting(10.0, "Timestep scaling of the boundary conditions c_skip, c_out "
                                            "(LCMScheduler's).", label="Timestep scaling", group="Losses",
                                      advanced=True, min=1e-6)
    target_ema_decay: float = setting(0.95, "Full mode: EMA decay of the target network (the exported model).",
                                      label="Target EMA decay", group="Recipe", advanced=True, min=0.0, max=1.0)
    teacher_half: bool = setting(True, "Run the frozen teacher, VAE and text encoder in half precision (bf16 on "
                                       "CPU).", label="Half-precision teacher", group="Speed & memory",
                                advanced=True)
    cache: bool = setting(False, "Encode every image and caption once into the latent/text cache shared with "
                                 "distillation (crops are then centred).", label="Latent cache",
                          group="Speed & memory")
    cache_dir: str = setting("", "Folder of the latent/text cache (empty = ~/.cache/bksdm/latents).",
                             label="Cache folder", group="Speed & memory", advanced=True, kind="folder")
    # diffusers' LCM recipe in place of the distillation one
    train_batch_size: int = setting(8, "Images per step on each device.", label="Batch size", group="Recipe", min=1,
                                    max=4096)
    gradient_accumulation_steps: int = setting(1, "Steps whose gradients are summed before one optimiser update.",
                                               label="Gradient accumulation", group="Recipe", advanced=True, min=1,
                                               max=4096)
    max_steps: int = setting(1000, "Optimiser updates to train for.", label="Steps", group="Recipe", min=1,
                             max=10**7)
    learning_rate: float | None = setting(None, "Learning rate (empty = 1e-4 for LoRA, 1e-6 for full).",
                                          label="Learning rate", group="Recipe", min=0.0, max=1.0)
    checkpoint_every: int = setting(200, "Save a resumable checkpoint every N steps and at the end "
                                         "(0 = never; cancelling always saves one).", label="Checkpoint every",
                                    group="Output", min=0)
    sample_every: int = setting(200, "Render validation images every N steps (0 = never).", label="Samples every",
                                group="Output", min=0)
    sample_steps: int = setting(4, "Steps of the validation images (LCM sampler, no guidance).",
                                label="Sample steps", group="Output", advanced=True, min=1, max=1000)

    lr = DreamBoothConfig.lr  # the same rule: the set learning rate, else 1e-4 for LoRA and 1e-6 for full

    def checkpoint_modules(self, pipe) -> dict:
        if self.mode == "lora":
            add_lora(pipe.unet, self.lora_rank, self.lora_alpha, LORA_TARGETS)
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    def validate(self) -> None:
        super().validate()  # types, choices and ranges of every setting
        check_model_source(self.model, "model")
        unet_config = Path(self.model) / "unet" / "config.json"
        if unet_config.is_file():
            layout_of(json.loads(unet_config.read_text()))
        if self.teacher:
            check_model_source(self.teacher, "teacher")
        self.check_data()
        if not 0 <= self.w_min <= self.w_max:
            raise BKSDMError(f"Guidance needs 0 <= w_min <= w_max, not {self.w_min} and {self.w_max}.")
        if not 0 < self.target_ema_decay < 1:
            raise BKSDMError("target_ema_decay must be between 0 and 1.")


def train(config: LcmConfig, job_dir, resume: str | None = None, accelerator=None) -> str:
    job = Job(config, job_dir, accelerator)
    acc = job.accelerator

    # data, and the model (its VAE and text encoder are the teacher's too)
    items = read_pairs(job, config)
    with acc.main_process_first():  # a single-file model is converted once, by the main process
        parts = load_parts(config.model)
    layout = layout_of(parts["unet"].config)
    name = config.output_name or _output_name(layout, config.mode)
    check_output_free(job, name)
    run = Consistency(config, job, parts, layout)
    dataset = make_dataset(job, config, items, parts)

    make_batches = batch_source(dataset, config, acc)

    def render(step, ema):
        with (ema.applied() if ema else contextlib.nullcontext()), half_autocast(job.device, run.frozen_dtype):
            return render_samples(parts, run.student, config.sample_prompts, job.folder.samples,
                                  f"step-{step:06d}", config.sample_steps, config.resolution, config.seed,
                                  sampler="LCMScheduler", guidance_scale=1.0)

    # the loop
    outcome, ema = fit(job, {"unet": run.prepared}, run.loss, make_batches, render if acc.is_main_process else None,
                       None, resume, output=(output_dir(job), run.output_bytes()), ema=run.target_ema)

    # output
    if outcome == "done":
        if acc.is_main_process:
            out = export(job, run, layout, name, ema)
            job.progress.update(state="done", message=f"Finished: {out}", output=str(out))
        acc.wait_for_everyone()
    job.progress.close()
    return outcome


class Consistency:
    """The networks of a run (student, frozen teacher, target) and one micro-batch's LCD loss."""

    def __init__(self, config: LcmConfig, job: Job, parts: dict, layout: str):
        self.config, self.job, self.parts, device = config, job, parts, job.device
        self.frozen_dtype = half_dtype(device) if config.teacher_half else torch.float32
        student = parts["unet"]
        self.teacher = copy.deepcopy(student) if not config.teacher else load_teacher(config.teacher, parts)
        job.say(f"Student: {layouts.get_layout(layout).title}, mode {config.mode}; teacher: "
                f"{config.teacher or 'the model itself'}; guidance w in [{config.w_min}, {config.w_max}].")
        for module in (self.teacher, parts["vae"], parts["text_encoder"]):
            freeze(module, self.frozen_dtype, device)
        with torch.no_grad():  # the unconditional branch of the teacher's guidance: the empty prompt's embedding
            self.uncond = encode_prompts(parts["tokenizer"], parts["text_encoder"], [""], device).float()
        apply_speedups(self.teacher, config, trainable=False)
        if config.mode == "lora":
            add_lora(student, config.lora_rank, config.lora_alpha, LORA_TARGETS)
        else:
            student.requires_grad_(True)
        self.student = apply_speedups(student.to(device).train(), config, trainable=True)
        self.prepared = job.accelerator.prepare(self.student)
        if config.compile:
            self.prepared = torch.compile(self.prepared)
        if config.mode == "full":
            self.target_ema = EMA(self.student.parameters(), config.target_ema_decay)
            self.target = target_network(self.student, self.target_ema)
        else:
            self.target_ema, self.target = None, self.student
        self.schedule = lcm.Schedule.of(parts["scheduler"], config.solver_steps, timestep_scaling=config.timestep_scaling,
                                        huber_c=config.huber_c)

    def output_bytes(self) -> int:
        if self.config.mode == "lora":  # the adapters, in the WebUI's file and in the diffusers form
            return 2 * sum(4 * p.numel() for p in self.student.parameters() if p.requires_grad)
        return model_bytes(self.parts["root"], self.student)

    def loss(self, batch):
        job, config, device, timer = self.job, self.config, self.job.device, self.job.timer
        with timer("encode"):
            latents, text = conditioning(batch, self.parts, device, job.generator)
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=job.generator, device=device)
        index = torch.randint(0, len(self.schedule.timesteps), (size,), generator=job.generator, device=device)
        w = lcm.draw_guidance(size, config.w_min, config.w_max, job.generator, device)
        return lcm.lcd_loss(self._student, self._teacher, self._target, latents, noise, text.float(),
                            self.uncond.expand(size, -1, -1), index, w, self.schedule)

    def _student(self, x, t, text):
        with self.job.timer("student"):
            return self.prepared(x, t, text).sample

    def _teacher(self, x, t, text):
        with self.job.timer("teacher"):
            return self.teacher(x.to(self.frozen_dtype), t, text.to(self.frozen_dtype)).sample

    def _target(self, x, t, text):
        with self.job.timer("target"), self.job.accelerator.autocast():
            return self.target(x, t, text).sample


def load_teacher(source: str, parts: dict):
    """Another model's U-Net as the teacher; it must share the student's latent space, text encoder and
    prediction type (BK-SDM and its SD do)."""
    teacher = load_parts(source, ("unet", "scheduler"))
    unet, student = teacher["unet"], parts["unet"]
    layout_of(unet.config)
    for key in ("cross_attention_dim", "in_channels"):
        if unet.config[key] != student.config[key]:
            raise BKSDMError(f"The teacher {source} has {key} {unet.config[key]}, the model "
                             f"{student.config[key]}: choose a teacher of the model's family (SD-1 or SD-2).")
    kinds = teacher["scheduler"].config.prediction_type, parts["scheduler"].config.prediction_type
    if kinds[0] != kinds[1]:
        raise BKSDMError(f"The teacher predicts {kinds[0]}, the model {kinds[1]}: choose a teacher of the same "
                         "family (SD-2-768 models predict v, the others the noise).")
    return unet


def target_network(student, ema: EMA):
    """A U-Net like `student` whose weights are the EMA's averages themselves (no copy: each EMA update is
    the target's update, and a resumed EMA is a resumed target)."""
    target = type(student).from_config(student.config)
    params = list(target.parameters())
    if len(params) != len(ema.shadow):
        raise ValueError("The target network needs an EMA of every student weight.")
    for param, shadow in zip(params, ema.shadow, strict=True):
        if param.shape != shadow.shape:
            raise ValueError(f"EMA tensor {tuple(shadow.shape)} does not fit the target's {tuple(param.shape)}.")
        param.data = shadow
    return target.requires_grad_(False).train(student.training)


def export(job: Job, run: Consistency, layout: str, name: str, ema: EMA | None) -> Path:
    """LoRA: the WebUI's LDM-named file and the diffusers form. Full: the EMA target as a diffusers folder
    (with an LCM scheduler) and a WebUI checkpoint with its yaml. Both record how to sample them."""
    config = run.config
    recommended = {"bksdm.recommended": json.dumps(RECOMMENDED), "bksdm.lcm_teacher": config.teacher or config.model}
    if config.mode == "lora":
        path = write_lora(outputs(job, name), run.student, None, layout,
                          {"ss_network_dim": str(config.lora_rank), "ss_network_alpha": str(config.lora_alpha),
                           "bksdm.base_model": str(config.model), **recommended})
        use = f"<lora:{name}:1> on the {layouts.get_layout(layout).title} model it was trained on"
    else:
        with ema.applied():
            path = export_model(job, run.student, run.parts["root"], name, metadata=recommended)
        _use_lcm_scheduler(outputs(job, name).diffusers, run.parts["scheduler"])
        use = "it as a checkpoint"
    _write_user_metadata(path)
    job.say(f"Wrote {path}: use {use}, with the {RECOMMENDED['sampler']} sampler, {RECOMMENDED['steps']} steps "
            f"({RECOMMENDED['steps_range'][0]}-{RECOMMENDED['steps_range'][1]}) and CFG "
            f"{RECOMMENDED['cfg_range'][0]:g}-{RECOMMENDED['cfg_range'][1]:g}.")
    return path


def _use_lcm_scheduler(folder: Path, scheduler) -> None:
    """The diffusers folder samples with diffusers' LCMScheduler by default."""
    from diffusers import LCMScheduler

    LCMScheduler.from_config(scheduler.config).save_pretrained(folder / "scheduler")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    index_path.write_text(json.dumps(index, indent=2))


def _write_user_metadata(path: Path) -> None:
    """`name.json` beside the file: the WebUI shows its description on the model's card."""
    text = (f"Few-step model (latent consistency distillation): sampler {RECOMMENDED['sampler']}, "
            f"{RECOMMENDED['steps_range'][0]}-{RECOMMENDED['steps_range'][1]} steps, "
            f"CFG {RECOMMENDED['cfg_range'][0]:g}-{RECOMMENDED['cfg_range'][1]:g}.")
    path.with_suffix(".json").write_text(json.dumps({"description": text, "notes": text}, indent=2))


def _output_name(layout: str, mode: str) -> str:
    base = "sd" if layout == "teacher" else f"bk-sdm-{layout}"
    return f"{base}-lcm-lora" if mode == "lora" else f"{base}-lcm"
