"""End to end in a real WebUI: SD LoRAs, a few-step LoRA and ControlNet on BK-SDM-Small (1.10.1 tested; the LoRA
tests also on 1.6.0, where the LCM sampler does not exist yet and its test skips).

Needs what tests/test_webui_e2e.py needs, and for the ControlNet tests CONTROLNET_DIR: a tree of
Mikubill/sd-webui-controlnet (v1.1.455 = 56cec5b2 tested; e.g. `git archive 56cec5b2 | tar -x`),
copied into the test WebUI's extensions/; the WebUI's venv must import its dependencies
(CONTROLNET_PYTHONPATH adds a path for them, e.g. a `pip install --target DIR controlnet_aux==0.0.9
addict yapf`). Full-size random weights: a teacher, the Small student built from it, and the Small
student built from the teacher with a random SD LoRA merged in (fp32, so that merging is exact).
"""

from __future__ import annotations

import base64
import gc
import inspect
import io
import json
import os
from pathlib import Path

import pytest

from test_webui_e2e import WORK, launch, pixels  # skips (and says what to set) without a WebUI

pytestmark = [pytest.mark.webui, pytest.mark.slow]

ADDONS = WORK / "addons"  # this module's own checkpoints, LoRAs and ControlNet
CONTROLNET_DIR = os.environ.get("CONTROLNET_DIR")
PROMPT = "a photo of a cat"

PROBE = r'''
# Test-only: records, for the last U-Net call, the scaled SD residuals as ControlNet computes them
# (ControlParams.apply_effective_region_mask, in SD order), each input block's output and each
# output block's input, so that what reached each skip connection can be read back.
import torch
from modules import script_callbacks, scripts

records = {"sd": [], "skips": {}, "inputs": {}}
handles = []


def _apply(original):
    def apply_effective_region_mask(self, out):
        out = original(self, out)
        records["sd"].append(out.detach().float().cpu())
        return out
    return apply_effective_region_mask


for data in scripts.scripts_data:
    params = getattr(data.module, "ControlParams", None)
    if params is not None and not getattr(params, "_probe", False):
        params.apply_effective_region_mask = _apply(params.apply_effective_region_mask)
        params._probe = True


def _clear(module, args):  # a forward pre-hook: returns None, so the arguments are left as they are
    for value in records.values():
        value.clear()


class Probe(scripts.Script):
    def title(self):
        return "bksdm addons probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        while handles:
            handles.pop().remove()
        unet = p.sd_model.model.diffusion_model
        handles.append(unet.register_forward_pre_hook(_clear))
        for j, block in enumerate(unet.input_blocks):
            handles.append(block.register_forward_hook(
                lambda m, a, out, j=j: records["skips"].__setitem__(j, out.detach().float().cpu())))
        for k, block in enumerate(unet.output_blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k=k: records["inputs"].__setitem__(k, a[0].detach().float().cpu())))


def _residuals():
    """For each output block k: the max difference between what was added to its skip and each SD residual."""
    n = len(records["skips"])
    table = []
    for k in range(len(records["inputs"])):
        skip = records["skips"][n - 1 - k]
        added = records["inputs"][k][:, -skip.shape[1]:] - skip
        table.append([float((added - sd).abs().max()) if sd.shape == added.shape else None for sd in records["sd"]]
                     + [float(added.abs().max())])
    return {"table": table, "sd_count": len(records["sd"])}


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/probe/residuals", _residuals, methods=["GET"]))
'''


def _full_teacher():
    import torch
    from diffusers import UNet2DConditionModel

    from bksdm_ext import layouts
    from tiny import random_full_size

    return random_full_size(UNet2DConditionModel, layouts.unet_config("teacher", "v1"), seed=8, dtype=torch.float32)


def _write_student(path: Path, teacher, vae, text_encoder) -> None:
    import shutil

    from bksdm_ext.convert import convert
    from bksdm_ext.student import build_student
    from tiny import write_pipeline

    student, _ = build_student(teacher, "small")
    folder = ADDONS / "src" / path.stem
    shutil.rmtree(folder, ignore_errors=True)
    write_pipeline(folder, student, vae, text_encoder, "v1")
    del student
    convert(folder, path)  # fp32
    shutil.rmtree(folder)


def _apply_in_place(unet, tensors, names) -> None:
    import torch

    from lora_helpers import delta

    with torch.no_grad():
        for module, key in names.items():
            weight = unet.get_submodule(module).weight
            change = delta(tensors, key, weight.shape)
            if change is not None:
                weight.add_(change)


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    """Checkpoints, LoRAs and a random SD-1.5 ControlNet (kept under BKSDM_E2E_DIR/addons for reruns)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from bksdm_ext import layouts
    from lora_helpers import kohya_names, lora_layers, random_lora
    from tiny import SD_VAE_CONFIG, random_full_size, text_encoder_config

    ckpts, loras = ADDONS / "ckpts", ADDONS / "lora"
    out = {"plain": ckpts / "small-of-teacher.safetensors", "merged": ckpts / "small-of-merged.safetensors",
           "sd-detail": loras / "sd-detail.safetensors", "lcm-shaped": loras / "lcm-shaped.safetensors",
           "controlnet": ADDONS / "rand-cn.safetensors"}
    if all(p.exists() for p in out.values()):
        return out
    ckpts.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    teacher = _full_teacher()
    layers = lora_layers(teacher)
    names = kohya_names(layers)
    save_file(random_lora(layers, names, seed=5, rank=4, size=0.05), str(out["sd-detail"]))
    # LCM-LoRA for SD-1.5 (latent-consistency/lcm-lora-sdv1-5): kohya keys, rank 64 on the U-Net's layers
    save_file({k: v.half() for k, v in random_lora(layers, names, seed=6, rank=64, size=0.01).items()},
              str(out["lcm-shaped"]))
    accepted = inspect.signature(ControlNetModel.__init__).parameters  # follows register_to_config's wrapper
    config = {k: v for k, v in layouts.unet_config("teacher", "v1").items() if k in accepted}
    controlnet = random_full_size(ControlNetModel, config, seed=43)  # zero convs random too: residuals act
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(out["controlnet"]))
    del controlnet
    vae = random_full_size(AutoencoderKL, SD_VAE_CONFIG, seed=9)
    text_encoder = random_full_size(CLIPTextModel, text_encoder_config("v1"), seed=10)
    _write_student(out["plain"], teacher, vae, text_encoder)
    from safetensors.torch import load_file

    _apply_in_place(teacher, load_file(str(out["sd-detail"])), names)
    _write_student(out["merged"], teacher, vae, text_encoder)
    del teacher, vae, text_encoder
    gc.collect()
    return out


def _b64_png(side: int = 64) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def webui(files):
    extensions, env = {}, {}
    if CONTROLNET_DIR:
        extensions["sd-webui-controlnet"] = Path(CONTROLNET_DIR)
        if os.environ.get("CONTROLNET_PYTHONPATH"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["CONTROLNET_PYTHONPATH"],
                                                              os.environ.get("PYTHONPATH")]))

    def prepare(data: Path) -> None:
        (data / "models" / "ControlNet").mkdir(parents=True)
        os.link(files["controlnet"], data / "models" / "ControlNet" / "rand-cn.safetensors")

    server = launch("addons", files["plain"], "--ckpt-dir", str(ADDONS / "ckpts"), probe=PROBE,
                    extensions=extensions, env=env, lora_dir=ADDONS / "lora", prepare=prepare)
    yield server
    server.stop()


def _mean_difference(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a) / 255


def test_sd_lora_on_the_student_equals_the_student_of_the_merged_teacher(webui, files):
    from safetensors.torch import load_file

    from bksdm_ext.addons import lora

    webui.switch("small-of-merged")
    merged = pixels(webui.txt2img(prompt=PROMPT)["images"][0])
    webui.switch("small-of-teacher")
    plain = pixels(webui.txt2img(prompt=PROMPT)["images"][0])
    answer = webui.txt2img(prompt=f"{PROMPT} <lora:sd-detail:1>")
    with_lora = pixels(answer["images"][0])
    assert len(set(plain)) > 1, "the random model made a blank image: nothing to compare"
    assert _mean_difference(with_lora, merged) <= 1e-3
    assert _mean_difference(with_lora, plain) > 1e-2  # the LoRA does change the image
    expected = lora.remap(load_file(str(files["sd-detail"])), "teacher", "small").summary("sd-detail")
    assert "in removed blocks" in expected
    infotext = json.loads(answer["info"])["infotexts"][0]
    assert f'BK-SDM LoRA: "{expected}"' in infotext


def test_an_lcm_shaped_lora_runs_with_the_lcm_sampler_at_4_steps(webui):
    if "LCM" not in webui.samplers:
        pytest.skip("this WebUI has no LCM sampler (built in from 1.8.0)")
    webui.switch("small-of-teacher")
    answer = webui.txt2img(prompt=f"{PROMPT} <lora:lcm-shaped:1>", sampler_name="LCM", scheduler="Automatic",
                           steps=4, cfg_scale=1.5)
    infotext = json.loads(answer["info"])["infotexts"][0]
    assert "Sampler: LCM" in infotext and "Steps: 4" in infotext
    assert "BK-SDM LoRA: \"lcm-shaped " in infotext and "in removed blocks" in infotext


def _controlnet_unit(**options) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [dict({
        "enabled": True, "module": "none", "model": "rand-cn", "image": _b64_png(), "weight": 1.0,
        "resize_mode": "Just Resize", "processor_res": 64, "control_mode": "Balanced", "pixel_perfect": False},
        **options)]}}}


@pytest.mark.skipif(not CONTROLNET_DIR, reason="set CONTROLNET_DIR to a sd-webui-controlnet tree (v1.1.455)")
def test_controlnet_residuals_reach_the_blocks_copied_from_their_teacher_blocks(webui):
    webui.switch("small-of-teacher")
    plain = pixels(webui.txt2img(prompt=PROMPT)["images"][0])
    answer = webui.txt2img(prompt=PROMPT, **_controlnet_unit())
    assert pixels(answer["images"][0]) != plain
    probe = webui.get("/probe/residuals")
    assert probe["sd_count"] == 13
    # output block k reads the skip of input block 7-k; Small's input blocks come from SD's 0,1,3,4,6,7,9,10
    sources = (0, 1, 3, 4, 6, 7, 9, 10)
    for k, row in enumerate(probe["table"]):
        source = sources[7 - k]
        size = row[-1]  # the largest value added to that skip
        assert size > 1e-3 and row[source] is not None and row[source] <= 1e-5 * max(1.0, size), (k, row)
        others = [d for i, d in enumerate(row[:13]) if i != source and d is not None]
        assert all(d > 1e-2 * size for d in others), (k, row)


@pytest.mark.skipif(not CONTROLNET_DIR, reason="set CONTROLNET_DIR to a sd-webui-controlnet tree (v1.1.455)")
def test_a_reference_only_unit_is_refused_and_the_generation_runs_without_it(webui):
    webui.switch("small-of-teacher")
    plain = pixels(webui.txt2img(prompt=PROMPT)["images"][0])
    answer = webui.txt2img(prompt=PROMPT, **_controlnet_unit(module="reference_only", model="None"))
    assert pixels(answer["images"][0]) == plain
    infotext = json.loads(answer["info"])["infotexts"][0]
    assert "BK-SDM ControlNet: ControlNet unit 0 (reference_only) refused" in infotext
