"""Recording overhead of BK-SDM timings, measured side by side (recording on vs off) in one run.

    python benchmarks/timing_overhead.py [--rounds 30] [--steps 20]

Three measurements:
1. End to end: a tiny U-Net in k-diffusion's DPM++ 2M loop (CFG batch of 2), images generated
   alternately with recording off (no hooks installed) and on (hooks, recorder, record, store insert).
2. Per U-Net call: a hooked forward with an active recorder against the same forward without hooks,
   on a module that does almost nothing, so the hooks' cost is not lost in the U-Net's time; plus
   what the WebUI adapter's CFG callbacks add per evaluation.
3. Per image: what recording adds once per image (recorder start/finish, the record, the insert).
Targets (issue 7): at most 50 us per U-Net call and 5 ms per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: the tiny test U-Net

from bksdm_ext.timings import device as device_info  # noqa: E402
from bksdm_ext.timings.recorder import GenerationRecorder, RecorderSlot  # noqa: E402
from bksdm_ext.timings.store import GenerationRecord, TimingStore  # noqa: E402


def guided_model(unet, cond):
    from k_diffusion import external

    class Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample

    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    denoiser = external.DiscreteEpsDDPMDenoiser(Eps(), alphas, quantize=False)

    def guided(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cond)
        uncond, conditioned = out.chunk(2)
        return uncond + (conditioned - uncond) * 7.0

    return denoiser, guided


def one_image(denoiser, guided, steps: int) -> torch.Tensor:
    from k_diffusion import sampling

    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1234)) * sigmas[0]
    return sampling.sample_dpmpp_2m(guided, x, sigmas, disable=True)


def record_of(timings, described) -> GenerationRecord:
    return GenerationRecord(checkpoint="tiny", sampler="DPM++ 2M", steps=20, width=64, height=64, source="overhead",
                            **timings.record_fields(), **described.record_fields())


def end_to_end(rounds: int, steps: int, store: TimingStore) -> tuple[list[float], list[float], int]:
    from tiny import CROSS_DIM, tiny_unet

    unet = tiny_unet()
    cond = torch.randn(2, 77, CROSS_DIM)
    denoiser, guided = guided_model(unet, cond)
    described = device_info.describe_cached("cpu")
    off, on, calls = [], [], 0
    with torch.no_grad():
        one_image(denoiser, guided, steps)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            one_image(denoiser, guided, steps)
            off.append(time.perf_counter() - start)

            start = time.perf_counter()
            slot = RecorderSlot("overhead")
            slot.hook_unet(unet)
            recorder = slot.active = GenerationRecorder("cpu")
            recorder.start()
            with recorder.sampling():
                one_image(denoiser, guided, steps)
            slot.active = None
            timings = recorder.finish()
            store.add(record_of(timings, described))
            slot.remove_hooks()
            on.append(time.perf_counter() - start)
            calls = timings.unet_calls
    return off, on, calls


def per_call(calls: int = 20_000, repeats: int = 7) -> tuple[float, float]:
    """Median seconds per forward of a near-empty module: (without hooks, with hooks + active recorder)."""
    module = torch.nn.Identity()
    x = torch.zeros(1)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - start) / calls

    plain, hooked = [], []
    slot = RecorderSlot("overhead")
    for _ in range(repeats):
        plain.append(run())
        slot.hook_unet(module)
        slot.active = GenerationRecorder("cpu")
        hooked.append(run())
        slot.active = None
        slot.remove_hooks()
    return statistics.median(plain), statistics.median(hooked)


def per_webui_evaluation(calls: int = 20_000, repeats: int = 7) -> float:
    """Median seconds that the WebUI adapter adds per sampler evaluation on top of the hooks: its two CFG
    callbacks (bksdm_ext.webui.timings: re-check the model's hooks, mark the evaluation), as core calls."""
    unet, decoder = torch.nn.Identity(), torch.nn.Identity()
    slot = RecorderSlot("overhead")
    slot.hook_unet(unet)
    slot.hook_decoder(decoder)
    recorder = GenerationRecorder("cpu")
    recorder.begin_sampling()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            slot.hook_unet(unet)  # on_cfg_denoiser: hook_model on the current model, a no-op once hooked
            slot.hook_decoder(decoder)
            if not recorder.sampling_open:
                recorder.begin_sampling()
            recorder.begin_evaluation()
            recorder.end_evaluation()  # on_cfg_denoised
        times.append((time.perf_counter() - start) / calls)
    slot.remove_hooks()
    return statistics.median(times)


def per_image(store: TimingStore, repeats: int = 200) -> float:
    """Median seconds of the once-per-image work of recording (20 evaluations' marks included)."""
    described = device_info.describe_cached("cpu")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        recorder = GenerationRecorder("cpu")
        recorder.start()
        recorder.begin_sampling()
        for _ in range(20):
            recorder.unet_started()
            recorder.unet_finished()
        recorder.end_sampling()
        store.add(record_of(recorder.finish(), described))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="images with recording off and on, alternated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder, TimingStore(Path(folder) / "timings.sqlite3") as store:
        off, on, calls = end_to_end(args.rounds, args.steps, store)
        plain, hooked = per_call()
        callbacks = per_webui_evaluation()
        fixed = per_image(store)
    off_ms, on_ms = statistics.median(off) * 1000, statistics.median(on) * 1000
    pairs = sorted((b - a) * 1000 for a, b in zip(off, on))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, {args.steps} steps, "
          f"{calls} U-Net calls per image")
    print(f"1. end to end, per image: off {off_ms:.2f} ms, on {on_ms:.2f} ms (median); "
          f"paired difference median {statistics.median(pairs):+.2f} ms "
          f"(p25 {pairs[len(pairs) // 4]:+.2f}, p75 {pairs[3 * len(pairs) // 4]:+.2f})")
    added_us = (hooked - plain) * 1e6
    print(f"2. per U-Net call: {plain * 1e6:.2f} us without hooks, {hooked * 1e6:.2f} us with hooks and an "
          f"active recorder: +{added_us:.2f} us (target <= 50 us)")
    print(f"   + the WebUI's two CFG callbacks per evaluation: {callbacks * 1e6:.2f} us, "
          f"so {added_us + callbacks * 1e6:.2f} us per evaluation in the WebUI")
    print(f"3. per image, recorder + record + SQLite insert: {fixed * 1000:.3f} ms; with {calls} hooked calls: "
          f"{fixed * 1000 + calls * added_us / 1000:.3f} ms (target <= 5 ms)")


if __name__ == "__main__":
    main()
