"""End to end in a real WebUI (1.10.1 tested): prune the loaded SD checkpoint from the tab, in a browser.

The WebUI starts with `--ckpt` on the generated full-size random SD-v1 checkpoint (WEBUI_CKPT, else the one
tests/test_webui_e2e.py generates). Headless chromium opens the WebUI's page, goes to BK-SDM > Prune and
clicks "Prune the checkpoint selected in the WebUI". The `prune` job runs (with its disk check); when it is
done, the page's own script refreshes the WebUI's checkpoint list, which then lists the pruned file while
the user's selection stays. Selected, the pruned checkpoint loads whole (counted twice: our loader's report,
and the result of the WebUI's own `load_state_dict` call, recorded by a test-only script), matches the
diffusers U-Net without a mid block, generates, and its infotext names the layout. CI's counterpart is
tests/test_prune_tab.py (the same handler on stand-ins of the WebUI).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from browser_helpers import ARTIFACTS, browser  # noqa: F401 (a fixture)

from test_webui_e2e import WORK, _write_checkpoint, launch  # skips (and says what to set) without a WebUI

pytestmark = [pytest.mark.webui, pytest.mark.slow, pytest.mark.browser]

LOADS_PROBE = """
# Test-only: records what torch's load_state_dict(state_dict, strict=False) returned for the model of each
# checkpoint load (sd_models.load_model_weights), so that missing/unexpected keys are not only our report;
# and which of the missing are parameters (weights) rather than buffers the model computes from its yaml.
# The WebUI 1.10 loads under sd_disable_initialization.LoadStateDictOnMeta, which replaces
# torch.nn.Module.load_state_dict by a wrapper dropping the result and calls what it replaced: this.
import torch
from modules import script_callbacks, sd_models

loads, loading = [], {}
_torch_load_state_dict = torch.nn.Module.load_state_dict


def load_state_dict(module, *args, **kwargs):
    result = _torch_load_state_dict(module, *args, **kwargs)
    if module is loading.get("model"):
        parameters = {name for name, _ in module.named_parameters()}
        loads.append({"checkpoint": loading["title"], "missing": sorted(result.missing_keys),
                      "missing_parameters": sorted(set(result.missing_keys) & parameters),
                      "unexpected": sorted(result.unexpected_keys)})
    return result


torch.nn.Module.load_state_dict = load_state_dict
_load_model_weights = sd_models.load_model_weights


def load_model_weights(model, checkpoint_info, state_dict, timer):
    loading.update(model=model, title=checkpoint_info.title)
    try:
        return _load_model_weights(model, checkpoint_info, state_dict, timer)
    finally:
        loading.clear()


sd_models.load_model_weights = load_model_weights


def _routes(demo, app):
    app.add_api_route("/probe/loads", lambda: loads, methods=["GET"])


script_callbacks.on_app_started(_routes)
"""


@pytest.fixture(scope="module")
def teacher() -> Path:
    if os.environ.get("WEBUI_CKPT"):
        return Path(os.environ["WEBUI_CKPT"])
    return _write_checkpoint(WORK / "ckpts" / "sd1-teacher.safetensors", "teacher", "v1")


def _wait(predicate, timeout: float, what: str, page=None):
    deadline = time.time() + timeout
    while not (value := predicate()):
        if time.time() > deadline:
            if page is not None:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "webui-prune-timeout.png"), full_page=True)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)
    return value


def test_prune_the_loaded_checkpoint_from_the_tab(browser, teacher):  # noqa: F811 (the fixture)
    server = launch("prune", teacher, probe=LOADS_PROBE)
    try:
        titles = {Path(m["filename"]).stem: m["title"] for m in server.get("/sdapi/v1/sd-models")}
        selected = titles[teacher.stem]
        assert server.get("/sdapi/v1/options")["sd_model_checkpoint"] == selected
        assert server.get("/bksdm/v1/model")["loaded"]["layout"] is None  # SD itself, loaded by the WebUI
        [teacher_load] = server.get("/probe/loads")
        assert teacher_load["checkpoint"] == selected  # the probe sees the start-up load

        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(server.base, timeout=300_000)
        page.locator("#tabs > .tab-nav button", has_text="BK-SDM").first.click(timeout=300_000)
        page.locator("#bksdm_tabs button", has_text="Prune").first.click()
        page.locator("#bksdm_prune_current").click()
        result = page.locator("#bksdm_launch_result_prune .bksdm-message")
        message = _wait(lambda: result.count() and result.inner_text(), 120, "the launch", page)
        assert "follow it in the Jobs tab" in message, message
        job_id = message.split("Job ")[1].split(" ")[0]
        # the form names what it launched on, as the WebUI's list titles it
        assert page.locator("#bksdm_prune_source input").first.input_value() == selected

        job = _wait(lambda: (j := server.get(f"/bksdm/v1/jobs/{job_id}"))["state"] in ("done", "failed", "cancelled")
                    and j, 900, "the prune job", page)
        log = Path(job["folder"], "log.txt").read_text()
        assert job["state"] == "done", log[-3000:]
        config = (Path(job["folder"]) / "config.toml").read_text()
        assert str(teacher) in config and 'keep = "sd-nomid"' in config
        pruned = WORK / "data-prune" / "models" / "Stable-diffusion" / "BK-SDM" / f"{teacher.stem}-sd-nomid.safetensors"
        assert Path(job["progress"]["output"]) == pruned and pruned.is_file()
        assert "762,482,884" in log  # the U-Net parameters without the mid-stage

        # listed without anyone pressing refresh: the tab's script refreshes the WebUI's list when a job ends
        stem = pruned.stem
        listed = _wait(lambda: {Path(m["filename"]).stem: m["title"] for m in server.get("/sdapi/v1/sd-models")}
                       .get(stem), 120, "the pruned checkpoint in the WebUI's list", page)
        assert listed.startswith(f"BK-SDM/{pruned.name}")
        assert server.get("/sdapi/v1/options")["sd_model_checkpoint"] == selected  # the user's selection stays
        assert page.locator("#setting_sd_model_checkpoint input").first.input_value() == selected
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui-prune-done.png"), full_page=True)
        page.close()

        # selected, it loads whole, equals the diffusers U-Net without a mid block, and generates
        loads_before = len(server.get("/probe/loads"))
        server.post("/sdapi/v1/options", {"sd_model_checkpoint": listed})
        report = server.get("/bksdm/v1/model")["loaded"]
        title = f"BK-SDM/{pruned.name}"  # the WebUI adds the hash to the title once it has loaded the file
        assert report["checkpoint"].startswith(title) and (report["layout"], report["version"]) == ("sd-nomid", "v1")
        keys = report["keys"]
        assert keys["missing"] == keys["unexpected"] == keys["mismatched"] == keys["unused"] == []
        [load] = server.get("/probe/loads")[loads_before:]
        # every weight of the model is in the file, nothing else is. Missing are only the buffers LatentDiffusion
        # computes from its yaml (the noise schedule): our converter writes none of them, so the teacher it made
        # misses the same ones.
        assert load["checkpoint"].startswith(title), load
        assert load["missing_parameters"] == load["unexpected"] == [], load
        assert load["missing"] == teacher_load["missing"], (load, teacher_load)
        print("load_state_dict of the pruned checkpoint: missing (buffers only)", load["missing"])
        check = server.post("/bksdm/v1/model/verify")
        assert check["layout"] == "sd-nomid" and check["max_abs_diff"] <= 1e-4 and check["output_std"] > 0.01
        answer = server.post("/sdapi/v1/txt2img", {"prompt": "a photo of a cat", "steps": 2, "width": 64,
                                                   "height": 64, "seed": 1234, "sampler_name": "Euler"})
        assert len(answer["images"]) == 1
        infotext = json.loads(answer["info"])["infotexts"][0]
        assert "BK-SDM: sd-nomid (v1)" in infotext and f"Model: {stem}," in infotext, infotext
    finally:
        server.stop()
