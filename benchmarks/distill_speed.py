"""Distillation step speed: the official recipe's plain path against ours, side by side, same full-size models.

    python benchmarks/distill_speed.py [--steps 3] [--rounds 2] [--resolution 256] [--layout small] [--threads 2]

Full-size SD-v1 teacher (random weights, nothing is downloaded) → student, batch 1. Each path runs in
its own subprocess so its peak memory (max RSS) is its own; a warm-up step is not counted. On a
shared machine, `--rounds` runs the paths in turn several times and keeps each path's fastest run.

- plain: what the official `kd_train_text_to_image.py` does each step: VAE encode and text encode,
  fp32 teacher under no_grad, student forward with hooks, backward, torch's default AdamW (a
  per-parameter loop on CPU), clipping, diffusers' EMAModel (per-parameter loop).
- plain-fp32-kept-memory: the same with glibc told to keep freed memory (`speed.keep_freed_memory`,
  which our training processes apply on the CPU), to show how much of the gain is that setting.
- fast-*: our `Distillation` + `fit`: freed memory kept (CPU), cached latents/text (built once,
  reported apart), teacher under inference_mode, fused AdamW, foreach EMA; variants in precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PATHS = {
    "plain-fp32": "official recipe, fp32",
    "plain-fp32-kept-memory": "official recipe, fp32, with our allocator setting (its share of the gain)",
    "fast-fp32": "ours, fp32 (same precision)",
    "fast-fp32-bf16teacher": "ours, fp32 student, bf16 teacher",
    "fast-bf16": "ours, bf16 autocast + bf16 teacher",
    "fast-bf16-adamw8bit": "ours, bf16 as above + bitsandbytes 8-bit AdamW (memory)",
}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux/macOS: getrusage; Windows: the peak working set)."""
    try:
        import resource
    except ImportError:
        import psutil

        return psutil.Process().memory_info().peak_wset
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def full_size_parts(directory: Path) -> dict:
    """SD-v1's U-Net, VAE, CLIP ViT-L/14 text encoder and scheduler at their real sizes, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bksdm_ext import layouts
    from tiny import write_clip_tokenizer

    torch.manual_seed(0)
    return {
        "unet": UNet2DConditionModel(**layouts.teacher_unet_config("v1")),
        "vae": AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                             up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                             sample_size=512),
        "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                     num_hidden_layers=12, projection_dim=768)),
        "tokenizer": CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory / "tokenizer")),
        "scheduler": DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000),
    }


def run_path(name: str, args) -> dict:
    import torch

    from bksdm_ext.train.config import DistillConfig
    from train_helpers import write_images

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bksdm-speed-"))
    data = write_images(tmp / "data", 4, size=(args.resolution + 16, args.resolution + 32))
    parts = full_size_parts(tmp)
    config = DistillConfig(teacher="benchmark/in-memory", data=str(data), layout=args.layout,
                           resolution=args.resolution, train_batch_size=1, gradient_accumulation_steps=1,
                           max_steps=1, checkpoint_every=0, sample_every=0, log_every=10_000, num_workers=0,
                           mixed_precision="bf16" if name.startswith("fast-bf16") else "no",
                           teacher_half=name.startswith(("fast-bf16", "fast-fp32-bf16teacher")), cache=True,
                           optimizer="adamw8bit" if name.endswith("adamw8bit") else "adamw",
                           cache_dir=str(tmp / "cache"), channels_last=False)
    if name.startswith("plain"):
        if name == "plain-fp32-kept-memory":
            from bksdm_ext.train.speed import keep_freed_memory

            keep_freed_memory()
        result = plain(config, parts, args.steps)
    else:
        result = fast(config, parts, tmp, args.steps)
    result["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return result


def plain(config, parts, steps: int) -> dict:
    """The official code's step, phase by phase."""
    import torch

    from bksdm_ext.student import build_student
    from bksdm_ext.train.speed import PhaseTimer
    from bksdm_ext.train.data import CaptionedImages, read_metadata
    from bksdm_ext.train.losses import distill_loss, feature_taps

    teacher, vae, text_encoder, scheduler = parts["unet"], parts["vae"], parts["text_encoder"], parts["scheduler"]
    for model in (teacher, vae, text_encoder):
        model.requires_grad_(False).eval()
    student, _ = build_student(teacher, config.layout)
    student.train()
    teacher_tap, student_tap = feature_taps(teacher, student, config.layout)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                                  eps=config.adam_epsilon)
    shadow = [p.detach().clone() for p in student.parameters()]
    updates = [0]

    def ema_step():  # diffusers' EMAModel.step without foreach (its default), as the official code uses it
        updates[0] += 1
        decay = min(config.ema_decay, (1 + updates[0]) / (10 + updates[0]))
        with torch.no_grad():
            for s_param, param in zip(shadow, student.parameters()):
                s_param.sub_((1 - decay) * (s_param - param))

    items = read_metadata(config.data).items
    dataset = CaptionedImages(items, config.resolution, True, True, config.seed)
    timer = PhaseTimer()

    def step(i):
        sample = dataset[(0, i % len(dataset))]
        with timer("data"):
            pixels = sample["pixels"][None]
            ids = parts["tokenizer"]([sample["caption"]], padding="max_length", truncation=True,
                                     max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            with timer("encode"):
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                text = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            with timer("teacher"), teacher_tap:
                teacher_out = teacher(noisy, t, text).sample
        with timer("student"), student_tap:
            student_out = student(noisy, t, text).sample
        loss, _ = distill_loss(student_out, teacher_out, noise, student_tap.outputs(), teacher_tap.outputs(),
                               (1.0, 1.0, 1.0))
        with timer("backward"):
            loss.backward()
        with timer("clip"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        with timer("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        with timer("ema"):
            ema_step()

    step(0)
    timer.totals.clear()
    start = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    return {"step_s": (time.perf_counter() - start) / steps, "phases": {k: v / steps for k, v in timer.totals.items()}}


def fast(config, parts, tmp: Path, steps: int) -> dict:
    """Our training code as a job runs it, minus loading from disk."""
    from bksdm_ext.train import distill
    from bksdm_ext.train.loop import Job, fit
    from bksdm_ext.train.data import Batches, read_metadata

    job = Job(config, tmp / "job")
    run = distill.Distillation(config, job, parts)
    start = time.perf_counter()
    dataset = distill.make_dataset(job, config, read_metadata(config.data).items, parts)
    cache_s = time.perf_counter() - start

    def make_batches(position):
        return Batches(dataset, 1, config.seed, start=position)

    fit(job, {"student": run.prepared}, run.loss, make_batches, None, config.ema_decay)  # warm-up step
    job.timer.totals.clear()
    config.max_steps = steps
    start = time.perf_counter()
    fit(job, {"student": run.prepared}, run.loss, make_batches, None, config.ema_decay)
    elapsed = time.perf_counter() - start
    return {"step_s": elapsed / steps, "phases": {k: v / steps for k, v in job.timer.totals.items()},
            "cache_s_per_pair": cache_s / len(dataset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--layout", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="run all paths this many times, keep the fastest")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_path(args.one, args)), flush=True)
        return
    results = {}
    for name in [name for _ in range(args.rounds) for name in args.paths]:
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--resolution",
                   str(args.resolution), "--layout", args.layout, "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:  # e.g. killed for memory on a shared machine: the other runs still count
            print(f"{name} failed (exit {out.returncode}):\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[0][len("RESULT "):])
        if name not in results or r["step_s"] < results[name]["step_s"]:
            results[name] = r
        print(f"{name:24s} {r['step_s']:7.2f} s/step  {1 / r['step_s']:.3f} samples/s  "
              f"peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
    if results:
        report(results, args)


def report(results: dict, args) -> None:
    base = results.get("plain-fp32")
    print(f"\nSD-v1 teacher -> {args.layout}, {args.resolution} px, batch 1, {args.threads} threads, "
          f"{args.steps} steps after a warm-up")
    phases = sorted({p for r in results.values() for p in r["phases"]})
    print(f"{'path':24s} {'s/step':>7s} {'samples/s':>9s} {'speed-up':>8s} {'peak GB':>7s}  " +
          " ".join(f"{p:>9s}" for p in phases))
    for name, r in results.items():
        speedup = base["step_s"] / r["step_s"] if base else float("nan")
        print(f"{name:24s} {r['step_s']:7.2f} {1 / r['step_s']:9.3f} {speedup:7.2f}x {r['peak_rss_gb']:7.1f}  " +
              " ".join(f"{r['phases'].get(p, 0.0):9.2f}" for p in phases))
    for name, r in results.items():
        if "cache_s_per_pair" in r:
            print(f"{name}: building the latent cache took {r['cache_s_per_pair']:.2f} s per pair (once).")
    print("(phase columns: seconds per step; " + "; ".join(f"{k}: {v}" for k, v in PATHS.items()) + ")")


if __name__ == "__main__":
    main()
