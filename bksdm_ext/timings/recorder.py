"""Timing one generation: total, sampling, each U-Net evaluation, VAE decode, peak memory.

On CUDA every mark is a CUDA event recorded on the stream, and all of them are resolved with one
synchronisation when the generation ends, so timing adds no host sync per step. On CPU a mark is
`time.perf_counter()`. The U-Net and VAE decoder are timed by forward hooks (`RecorderSlot`), so
the count of U-Net evaluations is what the model really ran, whatever the sampler says.

An evaluation is one denoiser call of the sampler. When a caller marks evaluations
(`begin_evaluation` / `end_evaluation`, as the WebUI's CFG denoiser callbacks do), the U-Net forwards
inside one (cond and uncond run separately, e.g. for prompts of different lengths) count once.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


class CpuClock:
    def mark(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class CudaClock:
    """Marks are CUDA events on the current stream; `sync` waits once for all of them."""

    def __init__(self, device=None):
        import torch

        self._torch = torch
        self.device = torch.device(device or "cuda")

    def mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        self._torch.cuda.synchronize(self.device)

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1000.0


def clock_for(device) -> CpuClock | CudaClock:
    return CudaClock(device) if str(device).startswith("cuda") else CpuClock()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Timings:
    total_s: float
    sampling_s: float
    vae_decode_s: float | None
    unet_calls: int
    unet_median_ms: float | None
    unet_p90_ms: float | None
    it_per_s: float | None
    peak_memory_mb: float | None

    def record_fields(self) -> dict:
        """The timing part of a GenerationRecord."""
        return dict(self.__dict__)


class GenerationRecorder:
    """Collects marks during one generation; `finish()` turns them into `Timings`."""

    def __init__(self, device="cpu"):
        self.clock = clock_for(device)
        self._cuda = isinstance(self.clock, CudaClock)
        self._start = None
        self._sampling: list = []  # [start, end] marks
        self._decoding: list = []  # [start, end, inside_sampling]
        self._unet: list = []  # [start, end] marks, one pair per evaluation
        self._in_evaluation = False
        self._evaluation_open = False
        self.broken = False  # set when recording failed: its timings are not to be trusted

    def start(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.clock.device)
        self._start = time.perf_counter()

    # sampling and decode phases ------------------------------------------------------------
    @property
    def sampling_open(self) -> bool:
        return bool(self._sampling) and self._sampling[-1][1] is None

    def begin_sampling(self) -> None:
        self._sampling.append([self.clock.mark(), None])

    def end_sampling(self) -> None:
        if self._sampling and self._sampling[-1][1] is None:
            self._sampling[-1][1] = self.clock.mark()

    @contextmanager
    def sampling(self):
        self.begin_sampling()
        try:
            yield
        finally:
            self.end_sampling()

    def begin_decode(self) -> None:
        self._decoding.append([self.clock.mark(), None, self.sampling_open])

    def end_decode(self) -> None:
        if self._decoding and self._decoding[-1][1] is None:
            self._decoding[-1][1] = self.clock.mark()

    @contextmanager
    def decoding(self):
        self.begin_decode()
        try:
            yield
        finally:
            self.end_decode()

    # U-Net evaluations (called from forward hooks: keep these cheap) ---------------------------
    def begin_evaluation(self) -> None:
        self._in_evaluation = True
        self._evaluation_open = False

    def end_evaluation(self) -> None:
        self._in_evaluation = False

    def unet_started(self) -> None:
        if self._in_evaluation:
            if self._evaluation_open:
                return  # a further forward of the same evaluation
            self._evaluation_open = True
        self._unet.append([self.clock.mark(), None])

    def unet_finished(self) -> None:
        if self._unet:
            self._unet[-1][1] = self.clock.mark()

    # ------------------------------------------------------------------------------------------
    def finish(self) -> Timings:
        if self._start is None:
            raise RuntimeError("GenerationRecorder.finish() before start()")
        self.clock.sync()
        total = time.perf_counter() - self._start
        seconds = self.clock.seconds
        decode_spans = [(seconds(s, e), inside) for s, e, inside in self._decoding if e is not None]
        sampling = sum(seconds(s, e) for s, e in self._sampling if e is not None)
        sampling -= sum(d for d, inside in decode_spans if inside)  # e.g. full-VAE live previews
        unet = [seconds(s, e) * 1000 for s, e in self._unet if e is not None]
        peak = None
        if self._cuda:
            import torch

            peak = torch.cuda.max_memory_allocated(self.clock.device) / 2**20
        return Timings(
            total_s=total,
            sampling_s=max(sampling, 0.0),
            vae_decode_s=sum(d for d, _ in decode_spans) if decode_spans else None,
            unet_calls=len(unet),
            unet_median_ms=percentile(unet, 50) if unet else None,
            unet_p90_ms=percentile(unet, 90) if unet else None,
            it_per_s=len(unet) / sampling if unet and sampling > 0 else None,
            peak_memory_mb=peak,
        )


class RecorderSlot:
    """Where hooks installed on models find the generation being recorded (None between generations).

    Hooks are installed once per module and stay; with no active recorder they cost one attribute
    read. A recording error is logged once and recording stops; the generation goes on.
    """

    def __init__(self, name: str = "timings"):
        self.name = name
        self.active: GenerationRecorder | None = None
        self._hooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._reported = False

    def failed(self, error: BaseException) -> None:
        recorder, self.active = self.active, None
        if isinstance(recorder, GenerationRecorder):
            recorder.broken = True
        if not self._reported:
            self._reported = True
            log.error("BK-SDM %s: recording failed and is off for this generation: %r", self.name, error)

    def _hooks(self, begin: str, end: str):
        def pre(module, args):
            recorder = self.active
            if recorder is not None:
                try:
                    getattr(recorder, begin)()
                except Exception as error:  # timing must never break a generation
                    self.failed(error)

        def post(module, args, output):
            recorder = self.active
            if recorder is not None:
                try:
                    getattr(recorder, end)()
                except Exception as error:
                    self.failed(error)

        return pre, post

    def _install(self, module, begin: str, end: str) -> bool:
        if module is None or module in self._hooked:
            return False
        pre, post = self._hooks(begin, end)
        self._hooked[module] = (module.register_forward_pre_hook(pre), module.register_forward_hook(post))
        return True

    def hook_unet(self, module) -> bool:
        """Time every forward of this U-Net; returns False when it already was."""
        return self._install(module, "unet_started", "unet_finished")

    def hook_decoder(self, module) -> bool:
        """Time every forward of this VAE decoder as decode time."""
        return self._install(module, "begin_decode", "end_decode")

    def remove_hooks(self) -> None:
        for handles in list(self._hooked.values()):
            for handle in handles:
                handle.remove()
        self._hooked.clear()
