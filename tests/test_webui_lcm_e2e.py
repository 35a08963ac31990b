"""End to end in a real WebUI (1.10.1 tested): a LoRA trained by our `lcm` job, on BK-SDM-Small, LCM sampler.

Needs what tests/test_webui_e2e.py needs. The model is a full-size random BK-SDM-Small in fp32: a tiny
test model cannot be loaded by the WebUI (its 32-wide text encoder is not the CLIP-L the WebUI
builds, and the WebUI's LDM U-Net config has SD's channel widths). The LoRA is trained the way a user
runs a job: a config.toml in a job folder and `python -m bksdm_ext.job lcm --job-dir ...` (a few steps
at 64 px, and a learning rate high enough that so few steps change the image). The reference is
independent of the WebUI file the job wrote and of the Lora extension: the job's diffusers-form LoRA,
merged into the diffusers U-Net with the arithmetic diffusers and peft apply (tests/lora_helpers.py),
converted to a checkpoint by `bksdm convert`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_webui_e2e import REPO, WORK, launch, pixels  # skips (and says what to set) without a WebUI

pytestmark = [pytest.mark.webui, pytest.mark.slow]

LCM = WORK / "lcm"  # this module's checkpoints and LoRA folder (the base model is kept for reruns)
NAME = "bk-lcm-trained"
PROMPT = "a photo of a cat"
FEW_STEP = dict(sampler_name="LCM", scheduler="Automatic", steps=4, cfg_scale=1.5, seed=77)

PROBE = r'''
# Test-only: what the built-in Lora extension made of each network of the last generation.
from modules import script_callbacks


def _networks():
    import networks  # extensions-builtin/Lora

    return [{"name": net.name, "matched": len(net.modules),
             "summary": getattr(getattr(net, "bksdm_report", None), "summary", None),
             "changed": getattr(getattr(net, "bksdm_report", None), "changed", None)}
            for net in networks.loaded_networks]


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/probe/lora", _networks, methods=["GET"]))
'''


def _base_model() -> tuple[Path, Path]:
    """A full-size random BK-SDM-Small pipeline folder (fp32) and its WebUI checkpoint, made once."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from bksdm_ext import layouts
    from bksdm_ext.convert import convert
    from tiny import SD_VAE_CONFIG, random_full_size, text_encoder_config, write_pipeline

    folder, single = LCM / "src" / "bk-small", LCM / "ckpts" / "bk-small-base.safetensors"
    if single.exists() and (folder / "model_index.json").exists():
        return folder, single
    shutil.rmtree(folder, ignore_errors=True)
    write_pipeline(folder, random_full_size(UNet2DConditionModel, layouts.unet_config("small", "v1"), 11, torch.float32),
                   random_full_size(AutoencoderKL, SD_VAE_CONFIG, 12, torch.float32),
                   random_full_size(CLIPTextModel, text_encoder_config("v1"), 13, torch.float32), "v1")
    single.parent.mkdir(parents=True, exist_ok=True)
    convert(folder, single)  # fp32, so that the merged reference is exact
    return folder, single


def _train(model: Path, job: Path, lora_dir: Path) -> None:
    from bksdm_ext.train.lcm_distill import LcmConfig
    from train_helpers import one_thread_env, write_images

    data = write_images(job.parent / "data", 4)
    config = LcmConfig(model=str(model), data=str(data), output_dir=str(lora_dir), output_name=NAME,
                       lora_rank=8, lora_alpha=4.0,  # alpha != rank: each file must carry its own scale
                       resolution=64, train_batch_size=1, max_steps=3, learning_rate=1e-2, mixed_precision="no",
                       checkpoint_every=0, sample_every=0, log_every=1, num_workers=0)
    config.validate()
    job.mkdir(parents=True)
    config.save(job / "config.toml")
    env = dict(one_thread_env(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-m", "bksdm_ext.job", "lcm", "--job-dir", str(job)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)
    progress = json.loads((job / "progress.json").read_text())
    assert run.returncode == 0 and progress["state"] == "done", (progress, run.stderr[-3000:])


def _merged(folder: Path, diffusers_lora: Path, target: Path) -> None:
    """The base pipeline with the job's diffusers-form LoRA merged into its U-Net, as a WebUI checkpoint."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from bksdm_ext.convert import convert
    from lora_helpers import lora_layers, merge, peft_names

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tensors = load_file(str(diffusers_lora))
    layers = lora_layers(unet)
    adapted = {k.rsplit(".lora_", 1)[0][len("unet."):] for k in tensors}
    assert adapted <= set(layers), adapted - set(layers)
    weights = {f"{n}.weight": m.weight.detach() for n, m in layers.items()}
    with torch.no_grad():
        for key, value in merge(weights, tensors, peft_names(layers)).items():
            unet.get_submodule(key[: -len(".weight")]).weight.copy_(value)
    source = target.parent / "merged-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        os.symlink(folder / part, source / part)
    unet.save_pretrained(source / "unet")
    del unet
    try:
        convert(source, target)
    finally:
        shutil.rmtree(source)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    folder, base = _base_model()
    lora_dir = LCM / "lora"
    shutil.rmtree(lora_dir, ignore_errors=True)  # a file left by an earlier run is another job's: refused
    job = tmp_path_factory.mktemp("lcm") / "job"
    _train(folder, job, lora_dir)
    merged = LCM / "ckpts" / "bk-small-merged.safetensors"
    _remove(merged)
    _merged(folder, job / "output" / f"{NAME}-diffusers" / "pytorch_lora_weights.safetensors", merged)
    return {"base": base, "merged": merged, "lora": lora_dir / f"{NAME}.safetensors", "lora_dir": lora_dir}


@pytest.fixture(scope="module")
def webui(trained):
    server = launch("lcm", trained["base"], "--ckpt-dir", str(LCM / "ckpts"), probe=PROBE,
                    lora_dir=trained["lora_dir"])
    yield server
    server.stop()
    _remove(trained["merged"])  # remade from each run's LoRA


def _remove(checkpoint: Path) -> None:
    for path in (checkpoint, checkpoint.with_suffix(".yaml")):
        path.unlink(missing_ok=True)


def _mean_difference(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a) / 255


def test_a_lora_trained_by_the_lcm_job_applies_on_bk_with_the_lcm_sampler_at_4_steps(webui, trained):
    from safetensors import safe_open

    report = webui.switch("bk-small-merged")["loaded"]
    assert report["layout"] == "small" and report["keys"]["missing"] == report["keys"]["unexpected"] == []
    merged = pixels(webui.txt2img(prompt=PROMPT, **FEW_STEP)["images"][0])
    webui.switch("bk-small-base")
    plain = pixels(webui.txt2img(prompt=PROMPT, **FEW_STEP)["images"][0])
    answer = webui.txt2img(prompt=f"{PROMPT} <lora:{NAME}:1>", **FEW_STEP)
    with_lora = pixels(answer["images"][0])

    infotext = json.loads(answer["info"])["infotexts"][0]
    assert "Sampler: LCM" in infotext and "Steps: 4" in infotext and "CFG scale: 1.5" in infotext
    assert f'Lora hashes: "{NAME}: ' in infotext  # applied, by the WebUI's own record
    assert "BK-SDM LoRA" not in infotext  # made for this layout: nothing was moved or dropped
    with safe_open(str(trained["lora"]), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        assert f.metadata()["bksdm.layout"] == "small"
    [network] = webui.get("/probe/lora")
    assert network["summary"] == f"{NAME} {len(modules)} of {len(modules)} modules placed"
    assert network["matched"] == len(modules) and network["changed"] is False  # every module found its layer

    assert len(set(plain)) > 1, "the random model made a blank image: nothing to compare"
    change, error = _mean_difference(with_lora, plain), _mean_difference(with_lora, merged)
    print(f"mean |with LoRA - without| = {change:.4f}, |with LoRA - merged| = {error:.6f}")
    assert change > 1e-2, f"the trained LoRA does not change the image ({change:.4f})"
    assert error <= 1e-3, f"the LoRA in the WebUI is not the merged one ({error:.6f})"
