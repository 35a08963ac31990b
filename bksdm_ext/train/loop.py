"""The training loop shared by distillation and DreamBooth: one run of a job folder, and `fit`.

`fit` reads top to bottom: build the optimiser and EMA, resume from a checkpoint, check the disk, then
step until max_steps (accumulate micro-batches, clip, step, average), logging, checkpointing and
rendering samples on their schedules, and stopping at a cancel request with a checkpoint.
The job folder's paths and what a checkpoint is come from `bksdm_ext.job`; checkpoints are written by
`checkpoints.py`, the optimiser, EMA and precision come from `speed.py`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io import write_text
from ..job import JobFolder, Progress
from .checkpoints import (check_disk_space, checkpoint_bytes, load_checkpoint, rng_state, save_checkpoint,
                          seed_everything, set_rng_state)
from .speed import EMA, PhaseTimer, keep_freed_memory, make_accelerator, make_optimizer, say


# --- what a run reports ---------------------------------------------------------------------------


class RunLog:
    """What a run reports: progress.json, losses.csv and TensorBoard events; only the main process writes."""

    def __init__(self, job_dir: Path, total_steps: int, enabled: bool = True):
        self.folder, self.enabled = JobFolder(job_dir), enabled
        self.csv_path = self.folder.losses
        self.state = Progress(state="running", total_steps=total_steps, samples_per_s=0.0, pid=os.getpid())
        self._tb = _tensorboard(self.folder.tb) if enabled else None

    def update(self, **fields) -> None:
        self.state.update(**fields)
        if self.enabled:
            self.folder.write_progress(self.state)

    def log_losses(self, step: int, losses: dict[str, float], samples_per_s: float) -> None:
        """One CSV row per step; a resumed run first drops rows past its checkpoint."""
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *losses, "samples_per_s"])
            writer.writerow([step, *(f"{v:.9g}" for v in losses.values()), f"{samples_per_s:.4g}"])
        if self._tb is not None:
            for name, value in losses.items():
                self._tb.add_scalar(f"loss/{name}", value, step)
            self._tb.add_scalar("samples_per_s", samples_per_s, step)

    def truncate_losses(self, step: int) -> None:
        if not (self.enabled and self.csv_path.exists()):
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        write_text(self.csv_path, "".join(",".join(r) + "\n" for r in kept))

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _tensorboard(directory: Path):
    """A TensorBoard event writer: tensorboardX (light; install.py adds it), else torch's (needs tensorboard)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("No TensorBoard writer (pip install tensorboardX): losses go to losses.csv only.", flush=True)
            return None
    return SummaryWriter(str(directory))


# --- cancellation -------------------------------------------------------------------------------


class CancelWatch:
    """Set when the job folder gets a cancel request or the process a SIGTERM/SIGINT (SIGBREAK on Windows)."""

    def __init__(self, job_dir: Path):
        self.folder, self.requested = JobFolder(job_dir), False
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def __call__(self, accelerator=None) -> bool:
        """Whether to stop now; all ranks agree, so they stop at the same step."""
        local = self.requested or self.folder.cancel_requested()
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([float(local)], device=accelerator.device)
            return bool(accelerator.reduce(flag, "sum").item() > 0)
        return local


# --- one run of a job folder ---------------------------------------------------------------------


class Job:
    """One run of a job folder: config, accelerator, progress, cancellation, timing and a noise RNG."""

    def __init__(self, config, job_dir: Path, accelerator=None):
        self.config, self.job_dir = config, Path(job_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.folder = JobFolder(self.job_dir)
        if self.main:
            self.folder.create()
        self.progress = RunLog(self.job_dir, config.max_steps, enabled=self.main)
        self.cancelled = CancelWatch(self.job_dir)
        self.timer = PhaseTimer()
        if self.device.type == "cpu" and keep_freed_memory():
            self.say("CPU training: freed memory is kept for reuse (glibc mallopt), so steps do not re-fault it.")
        self.say(f"{type(config).__name__} on {self.accelerator.num_processes} process(es), device {self.device}, "
                 f"mixed precision {self.accelerator.mixed_precision}.")
        seed_everything(config.seed + self.accelerator.process_index)
        # noise and timesteps come from their own generator so that nothing else (data loader
        # start-up, library code) shifts them: a resumed run draws exactly what a straight one does
        rank = self.accelerator.process_index
        self.generator = torch.Generator(self.accelerator.device).manual_seed(config.seed + rank)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def say(self, message: str) -> None:
        say(self.accelerator, message)


# --- the loop -----------------------------------------------------------------------------------


def fit(job: Job, modules: dict[str, torch.nn.Module], loss_fn, make_batches, render=None,
        ema_decay: float | None = None, resume: str | None = None,
        output: tuple[Path, int] | None = None) -> tuple[str, EMA | None]:
    """Train `modules` on `loss_fn(batch) -> (loss, {term: tensor})` until max_steps.

    Returns ('done' or 'cancelled', the EMA or None).

    `modules` are already prepared by the accelerator; their trainable parameters are what the
    optimiser, the EMA and the checkpoints hold. `make_batches(start)` gives this rank's micro-batches
    (a `data.Batches`) from loader position `start`; `render(step, ema)` writes validation images and
    returns their paths. `output` is (folder, bytes) of the model written when the run is done: its
    space is checked with the checkpoints' before the first step.
    """
    config, acc, timer = job.config, job.accelerator, job.timer
    unwrapped = {name: acc.unwrap_model(m) for name, m in modules.items()}
    names = [f"{name}.{key}" for name, m in unwrapped.items() for key, p in m.named_parameters() if p.requires_grad]
    params = [p for m in unwrapped.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, job.device)
    ema = EMA(params, ema_decay) if ema_decay else None
    accum = config.gradient_accumulation_steps

    # resume
    step, skipped, position = 0, {}, 0
    checkpoint = job.folder.find_checkpoint(resume)
    if checkpoint is not None:
        tensors, training, rng, state = load_checkpoint(checkpoint, acc.process_index)
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(tensors["trainable"][name])
        optimizer.load_state_dict(training["optimizer"])
        if ema is not None:
            ema.load_state_dict(tensors["ema"], names, state["ema_updates"])
        if rng:
            set_rng_state(rng, job.generator)
        step, skipped, position = state["step"], state.get("skipped", {}), state["data_position"]
        job.progress.truncate_losses(step)
        job.progress.update(step=step, last_checkpoint=str(checkpoint), message=f"resumed from {checkpoint.name}")
        job.say(f"Resumed from {checkpoint} at step {step}.")
    elif resume:
        job.say("No checkpoint yet: starting from the beginning.")
    if job.main:
        job.folder.remove_partial_checkpoints()
        job.say(check_disk_space(job.job_dir, config, checkpoint_bytes(params, ema is not None, optimizer), step,
                                 output))

    def checkpoint_now() -> None:
        tensors = {"trainable": dict(zip(names, params))}
        if ema is not None:
            tensors["ema"] = ema.state_dict(names)
        state = {"data_position": batches.position, "skipped": skipped, "ema_updates": ema.updates if ema else 0,
                 "time": time.time()}
        with timer("checkpoint"):
            path = save_checkpoint(job.job_dir, step, tensors, {"optimizer": optimizer.state_dict()},
                                   rng_state(job.generator), state, config.checkpoints_keep, acc.process_index, acc)
        job.progress.update(last_checkpoint=str(path))
        job.say(f"Checkpoint {path.name} saved.")

    batches = make_batches(position)
    for module in modules.values():
        module.train()
    job.progress.update(step=step, state="running")
    start_time, start_step, outcome, seen = time.perf_counter(), step, "done", 0
    while step < config.max_steps:
        if job.cancelled(acc):
            outcome = "cancelled"
            break
        sums = {}
        for micro in range(accum):
            with timer("data"):
                batch = next(batches)
            for reason, count in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
            sync = contextlib.nullcontext() if micro == accum - 1 else _no_sync(acc, modules)
            with sync:
                loss, terms = loss_fn(batch)
                with timer("backward"):
                    acc.backward(loss / accum)
            for name, value in {"total": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / accum
            seen += batch["count"]
        if config.max_grad_norm:
            with timer("clip"):
                acc.clip_grad_norm_(params, config.max_grad_norm)
        with timer("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with timer("ema"):
                ema.update()
        step += 1

        if step % config.log_every == 0 or step == config.max_steps or step == start_step + 1:
            losses = {k: acc.reduce(v, "mean").item() for k, v in sums.items()}
            elapsed = time.perf_counter() - start_time
            rate = seen * acc.num_processes / elapsed
            eta = elapsed / (step - start_step) * (config.max_steps - step)
            job.progress.log_losses(step, losses, rate)
            job.progress.update(step=step, losses=losses, samples_per_s=rate, eta_s=eta)
            job.say(f"step {step}/{config.max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in losses.items())
                    + f" | {rate:.3g} samples/s" + (f" | skipped {skipped}" if skipped else ""))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            checkpoint_now()
        if render is not None and config.sample_every and step % config.sample_every == 0:
            with timer("samples"):
                paths = render(step, ema)
            if paths:
                job.progress.update(last_sample=str(paths[-1]))
    if outcome == "cancelled" or (config.checkpoint_every and step == config.max_steps and step > start_step):
        checkpoint_now()
    if outcome == "cancelled":
        job.progress.update(state="cancelled", step=step,
                            message=f"Cancelled at step {step}; resume with --resume latest.")
        job.say(f"Cancelled at step {step}.")
    return outcome, ema


@contextmanager
def _no_sync(accelerator, modules):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    with contextlib.ExitStack() as stack:
        for module in modules.values():
            stack.enter_context(accelerator.no_sync(module))
        yield
