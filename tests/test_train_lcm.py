"""Latent consistency distillation: the maths on fixed tensors, the lcm job (LoRA and full), its outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bksdm_ext.train import lcm

# --- the maths on fixed tensors -----------------------------------------------------------------


def test_solver_takes_every_twentieth_of_a_thousand_timesteps():
    steps = lcm.solver_timesteps(1000, 50)
    assert steps.tolist() == [20 * i - 1 for i in range(1, 51)]


def test_boundary_scalings_match_the_lcm_scheduler_and_are_the_identity_at_zero():
    from diffusers import LCMScheduler

    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = lcm.boundary_scalings(t)
    scheduler = LCMScheduler()
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(out), rel=1e-6, abs=1e-12)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


def test_predicted_x0_and_noise_invert_the_forward_process_for_eps_and_v():
    alphas = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
    x0, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([2, 8])
    a = alphas[t].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for kind, output in (("epsilon", eps), ("v_prediction", v)):
        assert torch.allclose(lcm.predicted_x0(output, t, noisy, kind, alphas), x0, atol=1e-5)
        assert torch.allclose(lcm.predicted_noise(output, t, noisy, kind, alphas), eps, atol=1e-5)
    with pytest.raises(ValueError, match="sample"):
        lcm.predicted_x0(eps, t, noisy, "sample", alphas)


def test_lcd_loss_equals_a_hand_computed_value():
    # 4 training timesteps, a 2-step solver (timesteps 1 and 3, skip 2); index 1: t_{n+k} = 3, t_n = 1
    alphas = torch.tensor([0.9, 0.8, 0.5, 0.2], dtype=torch.float64)
    schedule = lcm.Schedule(alphas, "epsilon", lcm.solver_timesteps(4, 2))
    assert schedule.timesteps.tolist() == [1, 3] and schedule.skip == 2
    one = torch.ones(1, 1, 1, 1)
    latents, noise, text, uncond = one, 0.5 * one, 0.2 * one, 0.1 * one
    student = lambda x, t, c: 0.5 * x  # noqa: E731 (ε predictions of made-up networks)
    teacher = lambda x, t, c: c + 0 * x  # noqa: E731
    target = lambda x, t, c: 0.25 * x  # noqa: E731
    w = torch.tensor([2.0])
    loss, terms = lcm.lcd_loss(student, teacher, target, latents, noise, text, uncond, torch.tensor([1]), w, schedule)

    def scalings(t):
        return 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / math.sqrt((10 * t) ** 2 + 0.25)

    def x0_of(eps, x, a):
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    z = math.sqrt(0.2) * 1 + math.sqrt(0.8) * 0.5  # noised at t = 3
    skip3, out3 = scalings(3)
    prediction = skip3 * z + out3 * x0_of(0.5 * z, z, 0.2)
    x0 = x0_of(0.2, z, 0.2) + 2 * (x0_of(0.2, z, 0.2) - x0_of(0.1, z, 0.2))  # teacher's guided x0 and ε
    eps = 0.2 + 2 * (0.2 - 0.1)
    x_prev = math.sqrt(0.8) * x0 + math.sqrt(0.2) * eps  # DDIM to t = 1 (ᾱ = 0.8)
    skip1, out1 = scalings(1)
    goal = skip1 * x_prev + out1 * x0_of(0.25 * x_prev, x_prev, 0.8)
    expected = math.sqrt((prediction - goal) ** 2 + 0.001 ** 2) - 0.001
    assert expected == pytest.approx(0.1383822, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["mse"].item() == pytest.approx((prediction - goal) ** 2, rel=1e-4)


def test_lcd_loss_reaches_the_student_only_and_index_zero_ends_at_the_boundary():
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    schedule = lcm.Schedule(alphas, "epsilon", lcm.solver_timesteps())
    net = torch.nn.Conv2d(4, 4, 1)
    teacher = torch.nn.Conv2d(4, 4, 1).requires_grad_(False)
    seen = []

    def target(x, t, c):
        seen.append(t)
        return teacher(x)

    latents = torch.randn(2, 4, 2, 2)
    loss, _ = lcm.lcd_loss(lambda x, t, c: net(x), lambda x, t, c: teacher(x), target, latents,
                           torch.randn_like(latents), torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 49]),
                           torch.tensor([3.0, 15.0]), schedule)
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert seen[0].tolist() == [0, 979]  # t_n = max(t_{n+k} - 20, 0)


def test_guidance_is_drawn_in_its_range():
    w = lcm.draw_guidance(1000, 3.0, 15.0, torch.Generator().manual_seed(0), "cpu")
    assert 3.0 <= w.min() and w.max() <= 15.0 and w.std() > 3
    assert lcm.draw_guidance(4, 8.0, 8.0, torch.Generator(), "cpu").tolist() == [8.0] * 4


# --- the lcm job on tiny models -----------------------------------------------------------------

from bksdm_ext import layouts  # noqa: E402
from bksdm_ext.errors import BKSDMError  # noqa: E402
from bksdm_ext.job import JobFolder  # noqa: E402
from bksdm_ext.train import checkpoints, speed  # noqa: E402
from bksdm_ext.train.lcm_distill import LcmConfig  # noqa: E402
from tiny import write_tiny_pipeline  # noqa: E402
from train_helpers import one_thread, small_settings, write_images  # noqa: E402, F401


@pytest.fixture(scope="module")
def tiny_small_v1(tmp_path_factory):
    """A tiny BK-SDM-Small pipeline folder: the model made few-step."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("bk-small"), "small", "v1")


def lcm_settings(**overrides):
    return small_settings(**{"lora_rank": 4, "lora_alpha": 4.0, "sample_prompts": [], **overrides})


def _fixed_lcd_loss(model: Path, data: Path, lora: Path | None = None, draws: int = 16) -> float:
    """LCD loss of the model (with the trained LoRA) against its own frozen teacher at fixed draws."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from bksdm_ext.train.data import augment, open_rgb, read_metadata
    from bksdm_ext.train.lcm_distill import LORA_TARGETS
    from bksdm_ext.train.lora import add_lora
    from bksdm_ext.train.models import encode_images, encode_prompts

    teacher = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    student = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    if lora is not None:
        add_lora(student, 4, 4.0, LORA_TARGETS)
        weights = load_file(str(lora))
        set_peft_model_state_dict(student, {k[len("unet."):]: v for k, v in weights.items()})
    tokenizer, text_encoder = CLIPTokenizer.from_pretrained(model / "tokenizer"), CLIPTextModel.from_pretrained(
        model / "text_encoder")
    vae, scheduler = AutoencoderKL.from_pretrained(model / "vae"), DDPMScheduler.from_pretrained(model / "scheduler")
    items = read_metadata(str(data)).items
    pixels = torch.stack([augment(open_rgb(p), 64, True, False, None) for p, _ in items])
    schedule = lcm.Schedule.of(scheduler)
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = encode_images(vae, pixels, sample=False)
        text = encode_prompts(tokenizer, text_encoder, [c for _, c in items], "cpu")
        uncond = encode_prompts(tokenizer, text_encoder, [""] * len(items), "cpu")
        net = lambda unet: (lambda x, t, c: unet(x, t, c).sample)  # noqa: E731
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=generator)
            index = torch.randint(0, 50, (len(items),), generator=generator)
            w = lcm.draw_guidance(len(items), 3.0, 15.0, generator, "cpu")
            loss, _ = lcm.lcd_loss(net(student), net(teacher), net(student), latents, noise, text, uncond, index, w,
                                   schedule)
            total += loss.item() / draws
    return total


def test_lora_run_lowers_the_lcd_loss_and_writes_webui_and_diffusers_files(tmp_path, tiny_small_v1, one_thread):
    from safetensors import safe_open

    from bksdm_ext.train import lcm_distill

    data = write_images(tmp_path / "data", 4)
    job = tmp_path / "job"
    config = LcmConfig(model=str(tiny_small_v1), data=str(data),
                       **lcm_settings(max_steps=30, learning_rate=1e-2, train_batch_size=4))
    config.validate()
    assert lcm_distill.train(config, job) == "done"
    rows = JobFolder(job).read_losses()
    assert len(rows) == 30 and {"total", "mse"} <= set(rows[0])
    lora = job / "output" / "bk-sdm-small-lcm-lora-diffusers" / "pytorch_lora_weights.safetensors"
    before = _fixed_lcd_loss(tiny_small_v1, data)
    after = _fixed_lcd_loss(tiny_small_v1, data, lora)
    assert after < before * 0.97, (before, after)  # measured: 0.206 -> 0.193

    webui = job / "output" / "bk-sdm-small-lcm-lora.safetensors"
    with safe_open(str(webui), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert json.loads(meta["bksdm.recommended"]) == {"sampler": "LCM", "steps": 4, "steps_range": [2, 8],
                                                      "cfg_scale": 1.5, "cfg_range": [1.0, 2.0]}
    assert meta["bksdm.layout"] == "small" and meta["ss_network_dim"] == "4"
    # linear and convolution layers alike, under LDM names
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_2.lora_up.weight" in keys
    assert "LCM" in json.loads(webui.with_suffix(".json").read_text())["description"]


def test_n_steps_resume_n_steps_equals_2n_straight(tmp_path, tiny_small_v1, one_thread):
    from bksdm_ext.train import lcm_distill

    data = write_images(tmp_path / "data", 5)
    for mode in ("lora", "full"):
        base = dict(model=str(tiny_small_v1), data=str(data), mode=mode,
                    **lcm_settings(max_steps=4, checkpoint_every=2, learning_rate=1e-3, random_flip=True,
                                   center_crop=False, gradient_accumulation_steps=2))
        straight, halves = tmp_path / f"straight-{mode}", tmp_path / f"halves-{mode}"
        lcm_distill.train(LcmConfig(**base), straight)
        lcm_distill.train(LcmConfig(**{**base, "max_steps": 2}), halves)
        lcm_distill.train(LcmConfig(**base), halves, resume="latest")
        a, b = JobFolder(straight).read_losses(), JobFolder(halves).read_losses()
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        for row_a, row_b in zip(a, b):
            assert row_a["total"] == pytest.approx(row_b["total"], abs=1e-6), (mode, row_a["step"])
        final_a = checkpoints.load_checkpoint(JobFolder(straight).complete_checkpoints()[-1])[0]
        final_b = checkpoints.load_checkpoint(JobFolder(halves).complete_checkpoints()[-1])[0]
        assert set(final_a) == ({"trainable"} if mode == "lora" else {"trainable", "ema"})
        for group in final_a:
            for key, tensor in final_a[group].items():
                assert torch.allclose(tensor, final_b[group][key], atol=1e-6), (mode, key)


def test_full_mode_trains_against_its_ema_target_and_exports_a_strictly_loading_checkpoint(tmp_path, tiny_small_v1,
                                                                                         one_thread):
    import importlib

    import yaml
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bksdm_ext.train import lcm_distill

    data = write_images(tmp_path / "data", 2)
    job = tmp_path / "job"
    config = LcmConfig(model=str(tiny_small_v1), data=str(data), mode="full", teacher=str(tiny_small_v1),
                       **lcm_settings(max_steps=3, checkpoint_every=3, learning_rate=1e-3, sample_every=3,
                                      sample_steps=2, sample_prompts=["a cat"]))
    assert lcm_distill.train(config, job) == "done"
    assert (job / "samples" / "step-000003-0.png").is_file()
    single = job / "output" / "bk-sdm-small-lcm.safetensors"
    unet_config = yaml.safe_load(single.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]
    assert "time_cond_proj_dim" not in str(unet_config)  # the WebUI's LDM U-Net has no w-embedding input
    module, cls = unet_config["target"].rsplit(".", 1)
    ldm = getattr(importlib.import_module(module), cls)(**unet_config["params"])
    prefix = "model.diffusion_model."
    ldm.load_state_dict({k[len(prefix):]: v for k, v in load_file(str(single)).items() if k.startswith(prefix)},
                        strict=True)
    with safe_open(str(single), "pt") as f:
        assert json.loads(f.metadata()["bksdm.recommended"])["sampler"] == "LCM"
    # the export is the EMA target, and the diffusers folder samples with LCM by default
    trained = UNet2DConditionModel.from_pretrained(job / "output" / "bk-sdm-small-lcm", subfolder="unet")
    ema = checkpoints.load_checkpoint(JobFolder(job).complete_checkpoints()[-1])[0]["ema"]
    for key, tensor in trained.state_dict().items():
        assert torch.equal(tensor, ema[f"unet.{key}"]), key
    pipe = StableDiffusionPipeline.from_pretrained(job / "output" / "bk-sdm-small-lcm", safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"


def test_target_network_is_the_ema_itself(one_thread):
    from tiny import tiny_unet

    from bksdm_ext.train.lcm_distill import target_network

    student = tiny_unet("small")
    ema = speed.EMA(student.parameters(), 0.5)
    target = target_network(student, ema)
    assert not any(p.requires_grad for p in target.parameters())
    for _ in range(3):  # training moves the student; each EMA update moves the target, nothing is copied
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 32)
    with torch.no_grad():
        out = target(x, t, text).sample
        with ema.applied():
            expected = student(x, t, text).sample
        assert not torch.allclose(student(x, t, text).sample, expected)
    assert torch.equal(out, expected)


def test_bad_settings_are_refused(tmp_path, tiny_small_v1, tiny_pipeline_v1):
    data = write_images(tmp_path / "data", 1)
    good = LcmConfig(model=str(tiny_small_v1), data=str(data), **lcm_settings())
    good.validate()
    assert good.lr == 1e-4 and LcmConfig(mode="full").lr == 1e-6 and LcmConfig().lora_rank == 64
    assert (LcmConfig().w_min, LcmConfig().w_max, LcmConfig().solver_steps, LcmConfig().huber_c) == (3, 15, 50, 0.001)
    for change, message in [(dict(w_min=5.0, w_max=4.0), "w_min <= w_max"), (dict(mode="dora"), "dora"),
                            (dict(model=str(tmp_path / "nope")), "does not exist"), (dict(solver_steps=0), "at least 1"),
                            (dict(data=str(tmp_path)), "no metadata")]:
        with pytest.raises(BKSDMError, match=message):
            LcmConfig(**{**good.to_dict(), **change}).validate()


@pytest.mark.parametrize("layout", ["small", "tiny"])
def test_lcm_lora_applied_the_webui_way_gives_the_trained_peft_weights(layout, one_thread):
    from peft.tuners.lora import LoraLayer

    from bksdm_ext.convert.keymaps import unet_to_ldm
    from bksdm_ext.ldm_unet import BKUNetModel
    from bksdm_ext.train.lcm_distill import LORA_TARGETS
    from bksdm_ext.train.lora import add_lora, webui_lora_state_dict
    from tiny import tiny_unet, tiny_unet_config
    from train_helpers import webui_apply_lora

    unet = tiny_unet(layout)
    add_lora(unet, 4, 8.0, LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: up-projections are no longer zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora = webui_lora_state_dict(unet, None, layout)
    kinds = {type(m.base_layer).__name__ for m in unet.modules() if isinstance(m, LoraLayer)}
    assert kinds == {"Linear", "Conv2d"}  # LCM-LoRA adapts convolutions too (3x3 and 1x1)

    base = {k.replace(".base_layer", ""): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    params = {**layouts.ldm_unet_params_from_config(tiny_unet_config(layout)), "use_checkpoint": False}
    ldm = BKUNetModel(**params).eval()
    ldm.load_state_dict(unet_to_ldm(base, layout), strict=True)
    assert webui_apply_lora(ldm, lora, "diffusion_model_") == len({k.split(".")[0] for k in lora})

    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 5, 32)
    with torch.no_grad():
        peft_out = unet(x, t, encoder_hidden_states=context).sample
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                module.merge()  # peft's own effective weight W + scaling * B @ A
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    effective = unet_to_ldm(merged, layout)
    patched = ldm.state_dict()
    assert set(effective) == set(patched)
    worst = max((effective[k] - patched[k]).abs().max().item() for k in effective)
    assert worst <= 1e-4, worst
    original = unet_to_ldm(base, layout)
    changed = sum(not torch.equal(v, original[k]) for k, v in patched.items())
    assert changed == len({k.split(".")[0] for k in lora})
    with torch.no_grad():
        assert torch.allclose(ldm(x, t, context), peft_out, atol=1e-4)


def _read_as_diffusers_does(model, state: dict, is_unet: bool) -> None:
    """diffusers 0.31's reading of its LoRA file into `model` (loaders/unet.py `_process_lora`, and the text
    encoder's alike): rank from lora_B, alpha from `get_peft_kwargs` (the file has none), peft's injection.
    `load_lora_weights` itself needs transformers >= 4.34 (its PEFT backend); these are its steps."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    rank = {k: v.shape[1] for k, v in state.items() if "lora_B" in k}
    inject_adapter_in_model(LoraConfig(**get_peft_kwargs(rank, None, state, is_unet=is_unet)), model)
    assert not set_peft_model_state_dict(model, state).unexpected_keys


def test_the_diffusers_lora_file_read_as_diffusers_reads_it_gives_the_trained_lora(tmp_path, one_thread):
    from safetensors.torch import load_file

    from bksdm_ext.job import Outputs
    from bksdm_ext.train.dreambooth import TEXT_LORA_TARGETS
    from bksdm_ext.train.lcm_distill import LORA_TARGETS
    from bksdm_ext.train.lora import add_lora, write_lora
    from tiny import tiny_text_encoder, tiny_unet

    unet, text_encoder = tiny_unet("small"), tiny_text_encoder()
    add_lora(unet, 4, 8.0, LORA_TARGETS)  # alpha != rank, as DreamBooth's defaults (16, 27) are
    add_lora(text_encoder, 4, 2.0, TEXT_LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: up-projections are no longer zero
        for name, p in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = Outputs(tmp_path / "job", "", "lora")
    write_lora(out, unet, text_encoder, "small", {})
    tensors = load_file(str(out.lora_diffusers / "pytorch_lora_weights.safetensors"))
    fresh_unet, fresh_text = tiny_unet("small"), tiny_text_encoder()
    for model, prefix, is_unet in ((fresh_unet, "unet.", True), (fresh_text, "text_encoder.", False)):
        _read_as_diffusers_does(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                is_unet)
    x, t, context, ids = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 5, 32), torch.tensor([[1, 7, 9]])
    with torch.no_grad():
        trained, read = unet(x, t, context).sample, fresh_unet(x, t, context).sample
        assert (trained - tiny_unet("small")(x, t, context).sample).abs().max() > 1e-2  # the LoRA acts
        assert torch.allclose(read, trained, atol=1e-5), (read - trained).abs().max()
        trained, read = text_encoder(ids).last_hidden_state, fresh_text(ids).last_hidden_state
        assert (trained - tiny_text_encoder()(ids).last_hidden_state).abs().max() > 1e-2
        assert torch.allclose(read, trained, atol=1e-5), (read - trained).abs().max()
