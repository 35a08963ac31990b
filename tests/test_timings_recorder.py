"""The recorder on real tiny generations: consistent times and the real number of U-Net evaluations."""

import logging

import pytest
import torch

from bksdm_ext.timings.bench import generate, load_pipeline
from bksdm_ext.timings.protocol import Protocol
from bksdm_ext.timings.recorder import GenerationRecorder, RecorderSlot, percentile

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_v1):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared 2-core machine
    yield load_pipeline(tiny_pipeline_v1, "cpu")
    torch.set_num_threads(threads)


def timed_generation(pipe, **protocol):
    """Generate once with recording on; also count U-Net forwards with an independent hook."""
    forwards = []
    counter = pipe.unet.register_forward_hook(lambda *args: forwards.append(1))
    slot = RecorderSlot()
    slot.hook_unet(pipe.unet)
    slot.hook_decoder(pipe.vae.decoder)
    recorder = slot.active = GenerationRecorder("cpu")
    init = protocol.pop("init_image", None)
    try:
        images, timings = generate(pipe, Protocol(width=64, height=64, steps=STEPS, **protocol), recorder, 1234,
                                   init_image=init)
    finally:
        slot.active = None
        slot.remove_hooks()
        counter.remove()
    return images, timings, len(forwards)


def assert_consistent(timings):
    assert 0 < timings.sampling_s
    assert 0 < timings.vae_decode_s
    assert timings.sampling_s + timings.vae_decode_s <= timings.total_s
    assert 0 < timings.unet_median_ms <= timings.unet_p90_ms
    # at least half the evaluations took the median or longer, and all of them ran inside sampling
    assert timings.unet_median_ms / 1000 * ((timings.unet_calls + 1) // 2) <= timings.sampling_s
    assert timings.unet_p90_ms / 1000 <= timings.sampling_s
    assert timings.it_per_s == pytest.approx(timings.unet_calls / timings.sampling_s)
    assert timings.peak_memory_mb is None  # CPU: no GPU memory to report


@pytest.mark.parametrize("sampler, expected_calls", [
    ("Euler", STEPS),
    ("DPM++ 2M", STEPS),
    ("Heun", 2 * STEPS - 1),  # k-diffusion's Heun: one extra evaluation per step but the last
])
def test_unet_calls_are_the_samplers_real_evaluations(pipe, sampler, expected_calls):
    images, timings, forwards = timed_generation(pipe, sampler=sampler)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.uint8
    assert timings.unet_calls == forwards == expected_calls
    assert_consistent(timings)


@pytest.mark.slow
def test_dpmpp_sde_calls_the_model_about_twice_a_step(pipe):
    _, timings, forwards = timed_generation(pipe, sampler="DPM++ SDE")
    assert timings.unet_calls == forwards == 2 * STEPS - 1
    assert_consistent(timings)


def test_img2img_runs_steps_times_strength(pipe):
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    _, timings, forwards = timed_generation(pipe, sampler="Euler", strength=0.5, init_image=init)
    assert timings.unet_calls == forwards == int(0.5 * STEPS) + 1  # the WebUI's img2img: t_enc + 1 steps
    assert_consistent(timings)


class TwoForwardModel(torch.nn.Module):
    """Stands in for a WebUI denoiser that runs cond and uncond as two U-Net forwards."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.unet(x) + self.unet(x)


def test_forwards_inside_one_marked_evaluation_count_once():
    model = TwoForwardModel()
    slot = RecorderSlot()
    assert slot.hook_unet(model.unet) and not slot.hook_unet(model.unet)  # installed once
    recorder = slot.active = GenerationRecorder("cpu")
    recorder.start()
    with recorder.sampling():
        for _ in range(3):  # marked: 3 evaluations of 2 forwards each
            recorder.begin_evaluation()
            model(torch.zeros(1, 8))
            recorder.end_evaluation()
        model(torch.zeros(1, 8))  # unmarked: each forward is an evaluation
    timings = recorder.finish()
    assert timings.unet_calls == 5


def test_decode_during_sampling_is_not_sampling_time():
    recorder = GenerationRecorder("cpu")
    recorder.start()
    with recorder.sampling():
        with recorder.decoding():  # e.g. a full-VAE live preview
            torch.randn(200, 200) @ torch.randn(200, 200)
    with recorder.decoding():
        torch.randn(200, 200) @ torch.randn(200, 200)
    timings = recorder.finish()
    assert timings.sampling_s + timings.vae_decode_s <= timings.total_s
    assert timings.unet_calls == 0 and timings.unet_median_ms is None and timings.it_per_s is None


def test_a_recording_error_is_logged_once_and_the_generation_goes_on(caplog):
    model = TwoForwardModel()
    slot = RecorderSlot("test")
    slot.hook_unet(model.unet)
    slot.active = object()  # not a recorder: every hook call fails
    with caplog.at_level(logging.ERROR):
        out = model(torch.ones(1, 8))
        slot.active = object()
        model(torch.ones(1, 8))
    assert out.shape == (1, 8)
    assert slot.active is None
    recorder = slot.active = GenerationRecorder("cpu")
    recorder._unet = None  # its evaluation list broken: the next hook call fails inside the recorder
    with caplog.at_level(logging.ERROR):
        model(torch.ones(1, 8))
    assert slot.active is None and recorder.broken
    assert caplog.text.count("recording failed") == 1


def test_percentile_matches_numpy():
    import numpy as np

    values = [5.0, 1.0, 3.0, 9.0, 7.5, 2.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
