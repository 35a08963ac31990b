"""BK-SDM distillation retraining (BKSDM.md §3): a pruned student learns from its SD teacher.

    loss = λ_task‖target − ε_S‖² + λ_out‖ε_T − ε_S‖² + λ_feat Σ_l‖f_T^l − f_S^l‖²

Read `train` top to bottom: data, models, the loss of one micro-batch, the loop (shared with
DreamBooth, `loop.fit`), the output.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import layouts
from ..errors import BKSDMError
from ..io import folder_bytes, human_size, require_free_space
from ..student import build_student
from . import cache as latent_cache
from .config import DistillConfig
from .loop import Job, fit
from .samples import render_samples
from .speed import apply_speedups, half_dtype
from .data import Batches, CaptionedImages, read_metadata, reject_reason
from .export import check_output_free, export_model, model_bytes, output_dir
from .losses import diffusion_target, distill_loss, feature_taps
from .models import encode_images, encode_prompts, freeze, load_parts


def train(config: DistillConfig, job_dir, resume: str | None = None, accelerator=None) -> str:
    job = Job(config, job_dir, accelerator)
    acc = job.accelerator

    # data: refused before any model loads if nothing is usable
    meta = read_metadata(config.data, config.image_column, config.caption_column)
    probe = [reject_reason(path, config.resolution // 2) for path, _ in meta.items[:64]]
    if all(probe):
        raise BKSDMError(f"None of the first {len(probe)} images of {config.data} is usable "
                         f"({', '.join(sorted(set(probe)))}): check the dataset.")
    job.say(f"Dataset: {len(meta.items)} pairs" + (f", skipped {dict(meta.skipped)}" if meta.skipped else ""))
    check_output_free(job, _output_name(config))

    # models, and a latent/text cache or images encoded every step (the official way)
    with acc.main_process_first():  # a single-file model is converted once, by the main process
        parts = load_parts(config.teacher)
    run = Distillation(config, job, parts)
    dataset = make_dataset(job, config, meta.items, parts)

    def make_batches(start: int) -> Batches:
        return Batches(dataset, config.train_batch_size, config.seed, acc.process_index, acc.num_processes, start,
                       config.num_workers)

    def render(step, ema):
        with (ema.applied() if ema else contextlib.nullcontext()), _half_autocast(job.device, run.frozen_dtype):
            return render_samples(parts, run.student, config.sample_prompts, job.folder.samples,
                                  f"step-{step:06d}", config.sample_steps, config.resolution, config.seed)

    if config.sample_every and acc.is_main_process and not (job.folder.samples / "teacher-0.png").exists():
        with _half_autocast(job.device, run.frozen_dtype):
            render_samples(parts, run.teacher, config.sample_prompts, job.folder.samples, "teacher",
                           config.sample_steps, config.resolution, config.seed)

    # the loop
    outcome, ema = fit(job, {"student": run.prepared}, run.loss, make_batches, render if acc.is_main_process else None,
                       config.ema_decay if config.use_ema else None, resume,
                       output=(output_dir(job), model_bytes(parts["root"], run.student)))

    # output: the EMA student as a diffusers folder and a WebUI checkpoint
    if outcome == "done":
        if acc.is_main_process:
            with ema.applied() if ema else contextlib.nullcontext():
                out = export_model(job, run.student, parts["root"], _output_name(config))
            job.progress.update(state="done", message=f"Finished: {out}", output=str(out))
        acc.wait_for_everyone()
    job.progress.close()
    return outcome


class Distillation:
    """The models of a run (frozen half-precision teacher, student built from it) and one micro-batch's loss."""

    def __init__(self, config: DistillConfig, job: Job, parts: dict):
        self.job, self.parts, self.scheduler = job, parts, parts["scheduler"]
        device = job.device
        self.frozen_dtype = half_dtype(device) if config.teacher_half else torch.float32
        self.teacher = parts["unet"]
        student, report = build_student(self.teacher, config.layout)
        job.say(report.summary().splitlines()[0])
        for name in ("unet", "vae", "text_encoder"):
            if name in parts:
                freeze(parts[name], self.frozen_dtype, device)
        apply_speedups(self.teacher, config, trainable=False)
        self.student = apply_speedups(student.to(device).train(), config, trainable=True)
        # hooks on the unwrapped modules: DDP's `module.` prefix cannot break them
        self.teacher_tap, self.student_tap = feature_taps(self.teacher, self.student, config.layout)
        self.prepared = job.accelerator.prepare(self.student)
        if config.compile:
            self.prepared = torch.compile(self.prepared)
        self.weights = (config.lambda_task, config.lambda_out_kd, config.lambda_feat_kd)

    def loss(self, batch):
        job, timer, device, scheduler = self.job, self.job.timer, self.job.device, self.scheduler
        with timer("encode"):
            latents, text = _conditioning(batch, self.parts, device, job.generator)
        noise = torch.randn(latents.shape, generator=job.generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=job.generator, device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        with timer("teacher"), torch.inference_mode(), self.teacher_tap:
            teacher_out = self.teacher(noisy.to(self.frozen_dtype), timesteps, text.to(self.frozen_dtype)).sample
        # clones leave inference mode: the loss may then save them for the backward pass
        teacher_out, teacher_features = teacher_out.clone(), [f.clone() for f in self.teacher_tap.outputs()]
        with timer("student"), self.student_tap:
            student_out = self.prepared(noisy, timesteps, text.float()).sample
        return distill_loss(student_out, teacher_out, target, self.student_tap.outputs(), teacher_features,
                            self.weights)


def make_dataset(job: Job, config: DistillConfig, items, parts: dict):
    """Cached latents and text embeddings (the encoders then leave memory unless samples need them),
    or images and captions encoded at each step."""
    if not config.cache:
        return CaptionedImages(items, config.resolution, config.center_crop, config.random_flip, config.seed)
    dataset = build_cache(job, config, items, parts).dataset(config.random_flip, config.seed)
    if not config.sample_every:
        del parts["vae"], parts["text_encoder"]
    return dataset


def _conditioning(batch, parts, device, generator):
    """(latents, text embeddings) of a batch: from the cache, or encoded now by the frozen VAE and text encoder."""
    if "latents" in batch:
        return batch["latents"].to(device).float(), batch["text"].to(device)
    with torch.inference_mode():
        latents = encode_images(parts["vae"], batch["pixels"], generator).float()
        text = encode_prompts(parts["tokenizer"], parts["text_encoder"], batch["caption"], device)
    return latents.clone(), text.clone()


def build_cache(job: Job, config: DistillConfig, items, parts):
    root = Path(config.cache_dir) if config.cache_dir else latent_cache.default_cache_dir()
    encoder = parts["text_encoder"]
    flipped = config.random_flip
    size = latent_cache.bytes_per_pair(config.resolution, encoder.config.hidden_size,
                                       parts["tokenizer"].model_max_length, flipped)
    cache = latent_cache.LatentCache(root, latent_cache.cache_key(items, config.resolution, parts, flipped), items,
                                     config.resolution, flipped)
    if cache.complete:
        job.say(f"Using the latent cache {cache.dir}.")
    else:
        total = len(items) * size
        job.say(f"Building the latent cache {cache.dir}: {len(items)} pairs x {human_size(size)} = "
                f"{human_size(total)}.")
        built = folder_bytes(cache.dir) if cache.dir.is_dir() else 0  # shards of an interrupted build stay
        require_free_space(cache.dir, total - built, "the latent cache",
                           "Free space, set cache_dir to a larger disk, or turn the cache off (images are then "
                           "encoded at every step, as the official code does).")
        job.progress.update(message="building the latent cache")
        with job.timer("cache"):
            cache.build(parts, job.device, job.accelerator.process_index, job.accelerator.num_processes, job.say)
        job.accelerator.wait_for_everyone()
    return cache


def _half_autocast(device, dtype):
    """Sampling mixes the trained fp32 U-Net with half-precision frozen parts; autocast reconciles them."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _output_name(config: DistillConfig) -> str:
    return config.output_name or f"bk-sdm-{layouts.get_layout(config.layout).name}"
