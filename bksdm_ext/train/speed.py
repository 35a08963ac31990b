"""Speed and precision settings of a training run: accelerator, autocast and half dtypes, the optimiser,
the EMA, U-Net speed switches, the CPU allocator setting, and a per-phase wall-time timer.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from ..errors import BKSDMError


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


def say(accelerator, message: str) -> None:
    """Log to stdout (the runner appends it to log.txt), from the main process only."""
    if accelerator is None or accelerator.is_main_process:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
