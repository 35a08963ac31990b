"""DreamBooth: prior-preservation loss, bad inputs, full and LoRA runs, class images, WebUI LoRA export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.job import JobFolder
from bksdm_ext.train import checkpoints, losses
from bksdm_ext.train.config import DreamBoothConfig
from tiny import tiny_text_encoder, tiny_unet, tiny_unet_config, write_tiny_pipeline
from train_helpers import one_thread, small_settings, write_images  # noqa: F401


@pytest.fixture(scope="module")
def tiny_small_v1(tmp_path_factory):
    """A tiny BK-SDM-Small pipeline folder (the base model users personalise)."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("bk-small"), "small", "v1")


def settings(**overrides):
    return small_settings(**{"train_batch_size": 1, "num_class_images": 2, "class_steps": 2, "sample_prompts": [],
                             **overrides})


def test_prior_preservation_loss_on_fixed_tensors():
    prediction = torch.cat([torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)])  # instance half, class half
    target = torch.cat([torch.full((2, 4, 2, 2), 3.0), torch.full((2, 4, 2, 2), -1.0)])
    total, terms = losses.prior_preservation_loss(prediction, target, prior_weight=0.5)
    assert terms["instance"].item() == pytest.approx(9.0)  # (0 - 3)^2
    assert terms["prior"].item() == pytest.approx(4.0)  # (1 - -1)^2
    assert total.item() == pytest.approx(9.0 + 0.5 * 4.0)


def test_bad_inputs_are_refused_before_training(tmp_path, tiny_small_v1):
    photos = write_images(tmp_path / "photos", 2, metadata=False)
    good = DreamBoothConfig(base_model=str(tiny_small_v1), instance_data=str(photos), **settings())
    good.validate()
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = write_images(tmp_path / "mixed", 1, metadata=False)
    (mixed / "notes.txt").write_text("hello")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_small_v1, odd)
    config = json.loads((odd / "unet" / "config.json").read_text())
    (odd / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 3}))
    cases = [
        (dict(instance_data=str(empty)), "holds no images"),
        (dict(instance_data=str(tmp_path / "nowhere")), "not a folder"),
        (dict(instance_data=str(mixed)), "not images: notes.txt"),
        (dict(instance_prompt="a dog"), "does not contain the identifier"),
        (dict(base_model=str(odd)), "neither SD-1.x/2.x nor a BK-SDM layout"),
        (dict(mode="dora"), "mode must be"),
    ]
    for change, message in cases:
        with pytest.raises(BKSDMError, match=message):
            DreamBoothConfig(**{**good.to_dict(), **change}).validate()
    assert DreamBoothConfig(base_model="x", mode="lora").lr == 1e-4 and DreamBoothConfig(base_model="x").lr == 1e-6


def _text_weights(job: Path, name: str):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(job / "output" / name / "text_encoder").state_dict()


def test_full_run_trains_unet_and_text_encoder_and_loads_strictly_in_ldm(tmp_path, tiny_small_v1, one_thread):
    import importlib

    import yaml
    from safetensors.torch import load_file

    from bksdm_ext.train import dreambooth

    photos = write_images(tmp_path / "photos", 2, metadata=False)
    job = tmp_path / "job"
    config = DreamBoothConfig(base_model=str(tiny_small_v1), instance_data=str(photos), output_name="dog",
                              **settings(max_steps=2, learning_rate=1e-3))
    assert dreambooth.train(config, job) == "done"
    assert len(list((job / "class_images").glob("class-*.png"))) == 2
    rows = JobFolder(job).read_losses()
    assert {"total", "instance", "prior"} <= set(rows[0])
    before = tiny_text_encoder("v1").state_dict()
    after = _text_weights(job, "dog")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained jointly

    single = job / "output" / "dog.safetensors"
    unet_config = yaml.safe_load(single.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]
    module, cls = unet_config["target"].rsplit(".", 1)
    unet = getattr(importlib.import_module(module), cls)(**unet_config["params"])
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in load_file(str(single)).items() if k.startswith(prefix)},
                         strict=True)

    # frozen text encoder when asked; the class images of the first job are reused, not regenerated
    stamps = {p.name: p.stat().st_mtime_ns for p in (job / "class_images").glob("*.png")}
    job2 = tmp_path / "job2"
    frozen = DreamBoothConfig(**{**config.to_dict(), "train_text_encoder": False,
                                 "class_data": str(job / "class_images")})
    assert dreambooth.train(frozen, job2) == "done"
    assert {p.name: p.stat().st_mtime_ns for p in (job / "class_images").glob("*.png")} == stamps
    assert not (job2 / "class_images").exists()
    unchanged = _text_weights(job2, "dog")
    assert all(torch.equal(before[k], unchanged[k]) for k in before)


def _instance_loss(base: Path, photos: Path, prompt: str, lora: Path | None = None) -> float:
    """The denoising loss on the instance photos at 16 fixed (noise, timestep) draws: training must lower it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from bksdm_ext.train.data import augment, open_rgb
    from bksdm_ext.train.dreambooth import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, add_lora
    from bksdm_ext.train.models import encode_images, encode_prompts

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    if lora is not None:
        weights = load_file(str(lora))
        for model, prefix, targets in ((unet, "unet.", UNET_LORA_TARGETS), (text_encoder, "text_encoder.",
                                                                            TEXT_LORA_TARGETS)):
            add_lora(model, 4, 4.0, targets)
            set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    vae, scheduler = AutoencoderKL.from_pretrained(base / "vae"), DDPMScheduler.from_pretrained(base / "scheduler")
    images = sorted(photos.glob("*.png"))
    pixels = torch.stack([augment(open_rgb(p), 64, True, False, None) for p in images])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = encode_images(vae, pixels, sample=False)
        text = encode_prompts(CLIPTokenizer.from_pretrained(base / "tokenizer"), text_encoder,
                              [prompt] * len(images), "cpu")
        total = 0.0
        for _ in range(16):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (len(images),), generator=generator)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, text).sample
            total += torch.nn.functional.mse_loss(prediction, noise).item() / 16
    return total


def test_lora_run_lowers_the_instance_loss_and_exports_webui_and_diffusers_files(tmp_path, tiny_small_v1, one_thread):
    from safetensors.torch import load_file

    from bksdm_ext.train import dreambooth

    photos = write_images(tmp_path / "photos", 2, metadata=False)
    job = tmp_path / "job"
    config = DreamBoothConfig(base_model=str(tiny_small_v1), instance_data=str(photos), output_name="dog", mode="lora",
                              prior_preservation=False, **settings(max_steps=30, learning_rate=1e-2, lora_rank=4,
                                                                   lora_alpha=4.0, text_lora_rank=4,
                                                                   text_lora_alpha=4.0))
    assert dreambooth.train(config, job) == "done"
    diffusers_lora = job / "output" / "dog-diffusers" / "pytorch_lora_weights.safetensors"
    before = _instance_loss(tiny_small_v1, photos, config.instance_prompt)
    after = _instance_loss(tiny_small_v1, photos, config.instance_prompt, diffusers_lora)
    assert after < before * 0.95, (before, after)

    lora = load_file(str(job / "output" / "dog.safetensors"))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in lora
    assert lora["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    diffusers_form = load_file(str(diffusers_lora))
    assert {k.split(".")[0] for k in diffusers_form} == {"unet", "text_encoder"}


# --- the WebUI LoRA file ------------------------------------------------------------------------


def _lora_unet(layout: str, version: str = "v1", seed: int = 1):
    from bksdm_ext.train.dreambooth import UNET_LORA_TARGETS, add_lora

    unet = tiny_unet(layout, version)
    add_lora(unet, 4, 6.0, UNET_LORA_TARGETS)
    torch.manual_seed(seed)
    with torch.no_grad():  # as after training: up-projections are no longer zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return unet


def _webui_apply(model: torch.nn.Module, lora: dict, prefix: str, multiplier: float = 1.0) -> int:
    """What the WebUI's Lora extension does for a Linear: W += up @ down * alpha / rank * multiplier."""
    modules = {prefix + name.replace(".", "_"): m for name, m in model.named_modules()}
    applied = 0
    for key in {k.split(".")[0] for k in lora}:
        module = modules[key.replace("lora_unet_", prefix, 1)]
        down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
        with torch.no_grad():
            module.weight += up @ down * (lora[f"{key}.alpha"] / down.shape[0]) * multiplier
        applied += 1
    return applied


@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
def test_unet_lora_keys_name_ldm_modules_and_applying_them_matches_peft(layout, one_thread):
    from bksdm_ext.convert.keymaps import unet_to_ldm
    from bksdm_ext.ldm_unet import BKUNetModel
    from bksdm_ext.train.dreambooth import webui_lora_state_dict

    unet = _lora_unet(layout)
    lora = webui_lora_state_dict(unet, None, layout)
    params = {**layouts.ldm_unet_params_from_config(tiny_unet_config(layout)), "use_checkpoint": False}
    names = {"diffusion_model_" + n.replace(".", "_") for n, _ in BKUNetModel(**params).named_modules()}
    keys = {k.split(".")[0] for k in lora}
    assert len(keys) == 2 * sum(1 for n, _ in unet.named_modules() if n.endswith("attn1")) * 2  # to_q, to_v x attn1/2
    assert all(k.replace("lora_unet_", "diffusion_model_", 1) in names for k in keys), sorted(keys)[:3]

    base_state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}

    def ldm_model():
        model = BKUNetModel(**params).eval()
        model.load_state_dict(unet_to_ldm(base_state, layout), strict=True)
        return model

    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = ldm_model()(x, t, context)
        patched = ldm_model()
        assert _webui_apply(patched, lora, "diffusion_model_") == len(keys)
        with_lora = patched(x, t, context)
        zero = ldm_model()
        _webui_apply(zero, {k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in lora.items()},
                     "diffusion_model_")
        at_alpha_zero = zero(x, t, context)
        peft_out = unet(x, t, encoder_hidden_states=context).sample
    assert not torch.allclose(with_lora, plain, atol=1e-4)
    assert torch.equal(at_alpha_zero, plain)
    assert torch.allclose(with_lora, peft_out, atol=1e-4)  # the same network as the trained peft model


def test_text_encoder_lora_keys_follow_the_webui_mapping_for_v1_and_v2():
    import open_clip

    from bksdm_ext.train.dreambooth import TEXT_LORA_TARGETS, add_lora, webui_lora_state_dict

    text_encoder = tiny_text_encoder("v1")
    add_lora(text_encoder, 4, 17.0, TEXT_LORA_TARGETS)
    unet = _lora_unet("small")

    # v1: the extension looks the key up as `transformer_` + the CLIP module name (FrozenCLIPEmbedder.transformer)
    v1 = webui_lora_state_dict(unet, text_encoder, "small", "v1")
    te_keys = {k.split(".")[0] for k in v1 if k.startswith("lora_te_")}
    clip_names = {"transformer_" + n.replace(".", "_") for n, _ in tiny_text_encoder("v1").named_modules()}
    assert len(te_keys) == 3 * 2
    assert all(k.replace("lora_te_", "transformer_", 1) in clip_names for k in te_keys)

    # v2: the extension turns lora_te_…_self_attn_X_proj into model_transformer_resblocks_N_attn_X_proj and
    # applies to OpenCLIP's fused attention only when q, k, v and out_proj are all present
    v2 = webui_lora_state_dict(unet, text_encoder, "small", "v2")
    te_keys = {k.split(".")[0] for k in v2 if k.startswith("lora_te_")}
    transformer = open_clip.transformer.Transformer(width=32, layers=3, heads=4)
    openclip_names = {"model_transformer_" + n.replace(".", "_"): m for n, m in transformer.named_modules()}
    groups = {}
    for key in te_keys:
        m = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj", key)
        assert m, key
        mha = f"model_transformer_resblocks_{m[1]}_attn"
        assert isinstance(openclip_names[mha], torch.nn.MultiheadAttention)
        groups.setdefault(mha, set()).add(m[2])
    assert groups and all(g == {"q", "k", "v", "out"} for g in groups.values())
    for key in te_keys:
        if "_k_proj" in key or "_out_proj" in key:
            assert not v2[f"{key}.lora_up.weight"].any()  # untrained: a zero update


def test_lora_resume_continues_exactly_through_the_shared_core(tmp_path, tiny_small_v1, one_thread):
    from bksdm_ext.train import dreambooth

    photos = write_images(tmp_path / "photos", 2, metadata=False)
    base = dict(base_model=str(tiny_small_v1), instance_data=str(photos), mode="lora", output_name="dog",
                **settings(max_steps=4, checkpoint_every=2, learning_rate=1e-3, num_class_images=2))
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    dreambooth.train(DreamBoothConfig(**base), straight)
    dreambooth.train(DreamBoothConfig(**{**base, "max_steps": 2}), halves)
    dreambooth.train(DreamBoothConfig(**base), halves, resume="latest")
    a, b = JobFolder(straight).read_losses(), JobFolder(halves).read_losses()
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        assert row_a["total"] == pytest.approx(row_b["total"], abs=1e-6)
    trained = checkpoints.load_checkpoint(JobFolder(halves).complete_checkpoints()[-1])[0]["trainable"]
    assert trained and all(".lora_" in k for k in trained)  # only the adapters are trained and saved
