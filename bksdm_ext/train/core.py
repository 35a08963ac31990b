"""The training core shared by distillation and DreamBooth: job folder, progress, checkpoints, speed parts.

A job folder holds `config.toml`, `progress.json` (atomic), `losses.csv`, `log.txt` (the runner
captures stdout), `checkpoints/step-N/`, `samples/`, `tb/` (TensorBoard events) and `output/`.
A checkpoint is written into a temporary folder and renamed into place, so a kill at any moment
leaves the previous one whole. RNG states are saved and restored here rather than by accelerate
(0.21's `load_state` silently skips them under recent torch).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import BKSDMError
from ..io import disk_full, existing_parent, free_bytes, human_size, require_free_space

CHECKPOINT_PREFIX = "step-"
PARTIAL_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"  # a checkpoint being written; renamed to step-N when complete
FULL_DISK_BYTES = 16 << 20  # a write that failed with less than this left free is taken for a full disk


# --- job folder ---------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Progress:
    """progress.json, losses.csv and TensorBoard events of a job; only the main process writes."""

    def __init__(self, job_dir: Path, total_steps: int, enabled: bool = True):
        self.path, self.enabled = job_dir / "progress.json", enabled
        self.csv_path = job_dir / "losses.csv"
        self.state = {"state": "running", "step": 0, "total_steps": total_steps, "losses": {}, "samples_per_s": 0.0,
                      "eta_s": None, "last_checkpoint": None, "last_sample": None, "message": "", "updated": 0.0,
                      "pid": os.getpid()}
        self._tb = _tensorboard(job_dir / "tb") if enabled else None

    def update(self, **fields) -> None:
        self.state.update(fields, updated=time.time())
        if self.enabled:
            atomic_write_text(self.path, json.dumps(self.state, indent=1))

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
        atomic_write_text(self.csv_path, "".join(",".join(r) + "\n" for r in kept))

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


def progress_state(job_dir: str | os.PathLike) -> dict:
    """A job's progress.json ({} before the job has written one)."""
    path = Path(job_dir) / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_losses(job_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a job's losses.csv as numbers."""
    with open(Path(job_dir) / "losses.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --- cancellation -------------------------------------------------------------------------------


class CancelWatch:
    """Set when the job folder gets a `cancel` file or the process a SIGTERM/SIGINT (SIGBREAK on Windows)."""

    def __init__(self, job_dir: Path):
        self.file, self.requested = job_dir / "cancel", False
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def __call__(self, accelerator=None) -> bool:
        """Whether to stop now; all ranks agree, so they stop at the same step."""
        local = self.requested or self.file.exists()
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([float(local)], device=accelerator.device)
            return bool(accelerator.reduce(flag, "sum").item() > 0)
        return local


# --- RNG ----------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random state a step touches, as tensors (safetensors-storable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": torch.tensor([np_state[2], np_state[3], np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(job_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its temp name)."""
    root = job_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file():
                try:
                    found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
                except ValueError:
                    continue
    return [p for _, p in sorted(found)]


def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], training: dict,
                    rng: dict[str, torch.Tensor], state: dict, keep: int, rank: int = 0, accelerator=None) -> Path:
    """Write checkpoints/step-N atomically: `tensors` groups to safetensors, the rest beside them.

    `training` (optimiser and scheduler state dicts) is plain tensors and numbers, loadable with
    weights_only=True. Every rank writes its own RNG file into the temp folder before the main
    process renames it.
    """
    root = job_dir / "checkpoints"
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f"{PARTIAL_PREFIX}{step}"
    main = rank == 0
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    try:
        save_file(rng, str(tmp / f"rng-{rank}.safetensors"))
        if main:
            for name, group in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()},
                          str(tmp / f"{name}.safetensors"))
            torch.save(training, tmp / "training.pt")
        _barrier(accelerator)
        if main:
            _fsync_dir_files(tmp)
            atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step}, indent=1))
    except BaseException as error:
        # torch.save reports a full disk as "unexpected pos": read the disk before freeing the partial
        full = isinstance(error, Exception) and free_bytes(root) < FULL_DISK_BYTES
        if main:  # give the partial checkpoint's space back at once
            shutil.rmtree(tmp, ignore_errors=True)
        if full and not disk_full(error):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from error
        raise
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in checkpoint_dirs(job_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def remove_partial_checkpoints(job_dir: Path) -> None:
    """Delete the temp folders of checkpoints whose writing was killed: never loadable, often gigabytes."""
    root = job_dir / "checkpoints"
    for partial in root.glob(f"{PARTIAL_PREFIX}*") if root.is_dir() else ():
        shutil.rmtree(partial, ignore_errors=True)


def checkpoint_bytes(params, ema: bool, optimizer) -> int:
    """About what one checkpoint takes: the trainable weights, their fp32 EMA and AdamW's two moments."""
    weights = sum(p.numel() * p.element_size() for p in params)
    numel = sum(p.numel() for p in params)
    moments = 2 * numel * (1 if "8bit" in type(optimizer).__name__ else 4)
    return weights + (4 * numel if ema else 0) + moments


def checkpoints_needed(step: int, max_steps: int, every: int, keep: int, existing: int) -> int:
    """How many more checkpoints' worth of disk the rest of a run needs at its peak.

    The run writes one every `every` steps before `max_steps` and one at the end (or at a cancel); a
    new one is complete before the oldest beyond `keep` (0: keep all) is deleted.
    """
    writes = 1 + (len(range(every * (step // every + 1), max_steps, every)) if every else 0)
    if not keep:
        return writes
    return max(min(keep, existing + writes - 1) + 1 - existing, 1)


def check_disk_space(job_dir: Path, config, checkpoint_size: int, step: int,
                     output: tuple[Path, int] | None = None) -> str:
    """Refuse, before the first step, a run whose checkpoints (and finished model) cannot fit on disk.

    Returns what it checked, for the log.
    """
    count = checkpoints_needed(step, config.max_steps, config.checkpoint_every, config.checkpoints_keep,
                               len(checkpoint_dirs(job_dir)))
    needs = [(job_dir / "checkpoints", count * checkpoint_size,
              f"{count:,} checkpoint(s) of about {human_size(checkpoint_size)}")]
    if output is not None:
        needs.append((output[0], output[1], "the finished model"))
    by_disk: dict[int, list] = {}
    for path, size, what in needs:  # the output folder may lie on another disk
        where = existing_parent(path)
        entry = by_disk.setdefault(where.stat().st_dev, [path, where, 0, []])
        entry[2] += size
        entry[3].append(what)
    checked = []
    for path, where, size, what in by_disk.values():
        free = require_free_space(path, size, " and ".join(what),
                                  f"Free some space, lower checkpoints_keep (now {config.checkpoints_keep}; 0 keeps "
                                  "all), or put the job folder and output_dir on a larger disk.")
        checked.append(f"{' and '.join(what)}: up to {human_size(size)} of {human_size(free)} free under {where}")
    return "Disk: " + "; ".join(checked) + "."


def _barrier(accelerator):
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def find_checkpoint(job_dir: Path, resume: str | None) -> Path | None:
    """`latest` → newest complete checkpoint (None if none yet); a path or `step-N` → that one."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(job_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute():
        path = job_dir / "checkpoints" / resume
    if not (path / "state.json").is_file():
        raise BKSDMError(f"No complete checkpoint at {path}: use --resume latest or a checkpoints/step-N folder.")
    return path


def load_checkpoint(path: Path, rank: int = 0) -> tuple[dict, dict, dict, dict]:
    """(tensors by group, training state, RNG state of this rank, state.json)."""
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if not p.name.startswith("rng-")}
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-{rank}.safetensors"
    rng = load_file(str(rng_file)) if rng_file.exists() else {}
    state = json.loads((path / "state.json").read_text())
    return tensors, training, rng, state


# --- speed parts --------------------------------------------------------------------------------


def make_optimizer(params, config, device: torch.device):
    """AdamW with the fastest step available: bitsandbytes 8-bit if asked, else fused, else foreach."""
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=config.lr if hasattr(config, "lr") else config.learning_rate,
                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        # its CPU backend warns at import that a 4-bit matmul kernel (a hub download) is missing: the
        # 8-bit optimiser never uses it, and a job's log should not say "Failed"
        cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")

        def unused_kernel(record: logging.LogRecord) -> bool:  # a logging filter may be a plain callable
            return "gemm_4bit_forward" not in record.getMessage()

        cpu_ops.addFilter(unused_kernel)
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BKSDMError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                             "or use adamw.") from None
        finally:
            cpu_ops.removeFilter(unused_kernel)
        return bnb.optim.AdamW8bit(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class EMA:
    """Exponential moving average of parameters, updated with one foreach lerp per step.

    Decay warms up as (1 + n) / (10 + n), capped at `decay` (diffusers' EMAModel, the official code's).
    """

    def __init__(self, params, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        n = self.updates - 1
        decay = 0.0 if n <= 0 else min(self.decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor], names: list[str], updates: int) -> None:
        for shadow, name in zip(self.shadow, names, strict=True):
            shadow.copy_(state[name])
        self.updates = updates

    @contextmanager
    def applied(self):
        """Temporarily put the averaged weights into the model (for samples and export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: fp16 needs a GPU, so CPU runs use bf16 (AVX-512 BF16 / AMX make it fast)."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16


def half_dtype(device: torch.device) -> torch.dtype:
    """Frozen models in half precision: fp16 on GPU, bf16 on CPU (fp16 matmuls are slow there)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves blocks above 32 MB (and, dynamically, smaller ones) with mmap and unmaps
    them on free, so every CPU training step re-faults its gradients and activations page by page:
    about a million page faults and several seconds of kernel time a step for a full-size U-Net,
    a third or more of the step on a 2-core machine. With mmap off for new blocks and trimming off
    (-1, as mallopt(3) documents), the heap keeps its peak size and, after a few steps, steps fault
    nothing (the peak itself is unchanged).

    Process-wide and irreversible, so only training processes call it, and only on the CPU (CUDA
    memory has its own caching allocator). Returns whether it took effect (False off glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(option, value) == 1
               for option, value in ((m_mmap_max, 0), (m_trim_threshold, -1), (m_top_pad, 256 << 20)))


def make_accelerator(config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if PartialState().num_processes == 1:
        # accelerate keeps one precision per process; a second run in the same process (the library
        # entry point called again, a notebook) may ask for another. Nothing else shares this state.
        AcceleratorState._reset_state()
    on_gpu = torch.cuda.is_available()
    precision = config.mixed_precision if on_gpu else ("no" if config.mixed_precision == "no" else "bf16")
    accelerator = Accelerator(mixed_precision=precision, cpu=not on_gpu)
    if config.mixed_precision == "fp16" and not on_gpu:
        say(accelerator, "fp16 mixed precision needs a GPU: training in bf16 on the CPU.")
    return accelerator


def say(accelerator, message: str) -> None:
    """Log to stdout (the runner appends it to log.txt), from the main process only."""
    if accelerator is None or accelerator.is_main_process:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def apply_speedups(unet, config, trainable: bool):
    """Memory format, attention kernel and gradient checkpointing of a U-Net."""
    if config.channels_last and unet.device.type == "cuda":  # measured slower with oneDNN on CPU
        unet.to(memory_format=torch.channels_last)
    if config.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # not installed or no kernel for this device
            print(f"xformers not usable ({error}); using PyTorch SDPA.", flush=True)
    if trainable and config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers uses non-reentrant checkpointing
    return unet


# --- validation images --------------------------------------------------------------------------


@torch.no_grad()
def render_samples(pipeline_parts: dict, unet, prompts, directory: Path, stem: str, steps: int, resolution: int,
                   seed: int, sampler: str = "PNDMScheduler", guidance_scale: float = 7.5) -> list[Path]:
    """Render the fixed prompts with `unet` and the rest of a pipeline; PNGs `stem-i.png`.

    `sampler`: a diffusers scheduler class name (PNDM by default; LCM for few-step models).
    """
    import diffusers
    from diffusers import StableDiffusionPipeline

    parts = pipeline_parts
    scheduler = getattr(diffusers, sampler).from_config(parts["scheduler"].config)
    was_training = unet.training
    unet.eval()
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        image = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                     generator=generator, guidance_scale=guidance_scale).images[0]
        path = directory / f"{stem}-{i}.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        image.save(tmp)
        os.replace(tmp, path)
        paths.append(path)
    unet.train(was_training)
    return paths


# --- running a job ------------------------------------------------------------------------------


def run_job(kind: str, job_dir: str | os.PathLike, resume: str | None = None) -> int:
    """Run the job in `job_dir` (its config.toml) and keep progress.json's state true to the outcome.

    Returns the exit code: 0 for done or cancelled, 1 for failed (the message is in progress.json).
    """
    from .config import config_class

    job_dir = Path(job_dir)
    progress_path = job_dir / "progress.json"
    try:
        config = config_class(kind).load(job_dir / "config.toml")
        config.validate()
        train = _trainer(kind)
        outcome = train(config, job_dir, resume)
    except BKSDMError as error:
        return _fail(progress_path, str(error))
    except Exception as error:  # any other failure: readable line in progress, traceback in the log
        traceback.print_exc()
        return _fail(progress_path, _failure_message(error, job_dir))
    return 0 if outcome in ("done", "cancelled") else 1


def _failure_message(error: Exception, job_dir: Path) -> str:
    if disk_full(error):
        last = checkpoint_dirs(job_dir)
        kept = f"the last complete checkpoint, {last[-1].name}, is intact" if last else "no checkpoint was saved yet"
        where = getattr(error, "filename", None) or job_dir
        return (f"The disk is full (writing under {where}): {kept}. Free some space "
                f"(or lower checkpoints_keep), then resume the job.")
    return f"{type(error).__name__}: {error}"


def _trainer(kind: str):
    if kind == "distill":
        from .distill import train
    else:
        from .dreambooth import train
    return train


def _fail(progress_path: Path, message: str) -> int:
    print(f"FAILED: {message}", file=sys.stderr, flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        state = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        state.update(state="failed", message=message, updated=time.time(), pid=os.getpid())
        try:
            progress_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(progress_path, json.dumps(state, indent=1))
        except OSError as error:  # a full disk: the message above is in the log, the exit code tells the runner
            print(f"progress.json not updated: {error}", file=sys.stderr, flush=True)
    return 1


# --- the shared loop ----------------------------------------------------------------------------


class PhaseTimer:
    """Wall time per named phase of a step (synchronising the GPU so the numbers are honest)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


class Job:
    """One run of a job folder: config, accelerator, progress, cancellation, timing and a noise RNG."""

    def __init__(self, config, job_dir: Path, accelerator=None):
        self.config, self.job_dir = config, Path(job_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.main = self.accelerator.is_main_process
        if self.main:
            for sub in ("checkpoints", "samples"):
                (self.job_dir / sub).mkdir(parents=True, exist_ok=True)
        self.progress = Progress(self.job_dir, config.max_steps, enabled=self.main)
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


def fit(job: Job, modules: dict[str, torch.nn.Module], loss_fn, make_batches, render=None,
        ema_decay: float | None = None, resume: str | None = None,
        output: tuple[Path, int] | None = None, ema: EMA | None = None) -> tuple[str, EMA | None]:
    """Train `modules` on `loss_fn(batch) -> (loss, {term: tensor})` until max_steps.

    Returns ('done' or 'cancelled', the EMA or None).

    `modules` are already prepared by the accelerator; their trainable parameters are what the
    optimiser, the EMA and the checkpoints hold. `make_batches(start)` gives this rank's micro-batches
    (a `data.Batches`) from loader position `start`; `render(step, ema)` writes validation images and
    returns their paths. `output` is (folder, bytes) of the model written when the run is done: its
    space is checked with the checkpoints' before the first step. `ema`: an EMA of the trainable
    parameters the caller built itself because its loss reads it (LCM's target network), in place of
    one of `ema_decay`; it is checkpointed and resumed the same way.
    """
    config, acc, timer = job.config, job.accelerator, job.timer
    unwrapped = {name: acc.unwrap_model(m) for name, m in modules.items()}
    names = [f"{name}.{key}" for name, m in unwrapped.items() for key, p in m.named_parameters() if p.requires_grad]
    params = [p for m in unwrapped.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, job.device)
    if ema is None:
        ema = EMA(params, ema_decay) if ema_decay else None
    elif [id(p) for p in ema.params] != [id(p) for p in params]:
        raise ValueError("The EMA given to fit must average exactly the trainable parameters of `modules`.")
    accum = config.gradient_accumulation_steps

    # resume
    step, skipped, position = 0, {}, 0
    checkpoint = find_checkpoint(job.job_dir, resume)
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
        remove_partial_checkpoints(job.job_dir)
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
