"""End to end in a real AUTOMATIC1111 WebUI (headless, CPU): install, list, load, generate, refuse.

Needs a WebUI checkout and its venv (see README, "End-to-end tests"):
    WEBUI_DIR=/path/to/stable-diffusion-webui  WEBUI_PYTHON=/path/to/venv/bin/python
and, offline, HF_HOME holding the openai/clip-vit-large-patch14 tokenizer and config.
The test links this repository into a fresh data dir's extensions/, runs install.py as the WebUI
does, writes full-size random BK checkpoints (the way a user makes them: a diffusers folder
converted with `bksdm convert`) and drives the WebUI through its HTTP API.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.webui, pytest.mark.slow]

WEBUI_DIR = os.environ.get("WEBUI_DIR")
WEBUI_PYTHON = os.environ.get("WEBUI_PYTHON")
if not (WEBUI_DIR and WEBUI_PYTHON):
    pytest.skip("real-WebUI tests: set WEBUI_DIR (a stable-diffusion-webui v1.6-1.10 checkout with its "
                "repositories/) and WEBUI_PYTHON (its venv's python); offline, also HF_HOME with the CLIP "
                "tokenizer. See README, 'End-to-end tests'.", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BKSDM_E2E_DIR", "/tmp/bksdm-e2e"))  # generated checkpoints are kept for reuse
# each launch's fresh data dir and log (another folder lets two WebUI versions' runs share WORK's checkpoints)
RUNS = Path(os.environ.get("BKSDM_E2E_RUNS", WORK))
BK_FILES = {  # name: (layout, version)
    "base-v1": ("base", "v1"),
    "small-v1": ("small", "v1"),
    "tiny-v1": ("tiny", "v1"),
    "small-v2-768": ("small", "v2-768"),
}


# --- fixtures -----------------------------------------------------------------------------------


def _write_checkpoint(target: Path, layout: str, version: str) -> Path:
    """A full-size random pipeline folder converted to a WebUI single file, as a user would."""
    if target.exists():
        return target
    from bksdm_ext.convert import convert
    from tiny import write_full_size_pipeline

    folder = WORK / "src" / target.stem
    shutil.rmtree(folder, ignore_errors=True)
    write_full_size_pipeline(folder, layout, version, seed=len(target.stem))
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(folder, target, half=True)
    shutil.rmtree(folder)
    return target


def _write_broken_checkpoints(small: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    broken = WORK / "ckpts" / "BK-SDM"
    truncated = broken / "truncated-small.safetensors"
    if not truncated.exists():
        with open(small, "rb") as src, open(truncated, "wb") as dst:
            dst.write(src.read(50_000_000))
    missing = broken / "missing-tensor-small.safetensors"
    if not missing.exists():
        tensors = load_file(str(small))
        del tensors["model.diffusion_model.output_blocks.3.1.proj_out.weight"]
        save_file(tensors, str(missing))
    return {"truncated": truncated, "missing": missing}


LORAS = {  # file: (the one module it changes, its width); the same weights for the same width
    "bk-test": ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", 320),  # LDM naming, as ours export
    "bk-diffusers": ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 1280),  # diffusers
    "bk-out2": ("lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q", 1280),  # where that is on Small
    "bk-out3": ("lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q", 1280),  # where SD numbering puts it
}


def _write_lora(folder: Path) -> Path:
    """Small LoRAs on single attention projections that BK-SDM-Small has."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for file, (name, width) in LORAS.items():
        generator = torch.Generator().manual_seed(width)
        down, up = torch.randn(4, width, generator=generator), torch.randn(width, 4, generator=generator)
        save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                   f"{name}.alpha": torch.tensor(4.0)}, str(folder / f"{file}.safetensors"))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode(response):
    body = response.read()
    is_json = "json" in (response.headers.get("content-type") or "")
    return json.loads(body or b"null") if is_json else body.decode(errors="replace")


class WebUI:
    def __init__(self, port: int, process: subprocess.Popen, log: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.process = process
        self.log = log

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _decode(response)
        except urllib.error.HTTPError as error:
            return error.code, _decode(error)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)

    def get(self, path: str) -> dict:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, body: dict | None = None) -> dict:
        status, answer = self.call("POST", path, body or {})
        assert status == 200, (path, status, answer)
        return answer

    def titles(self) -> dict[str, str]:
        return {Path(m["filename"]).stem: m["title"] for m in self.get("/sdapi/v1/sd-models")}

    def switch(self, name: str) -> dict:
        self.post("/sdapi/v1/options", {"sd_model_checkpoint": self.titles()[name]})
        return self.get("/bksdm/v1/model")

    def has(self, path: str) -> bool:
        """Whether this WebUI has an API route (a feature probe: e.g. /sdapi/v1/schedulers is 1.9+)."""
        return self.call("GET", path)[0] == 200

    @functools.cached_property
    def samplers(self) -> set[str]:
        return {sampler["name"] for sampler in self.get("/sdapi/v1/samplers")}

    @functools.cached_property
    def sampling(self) -> dict:
        """DPM++ 2M Karras: 1.9+ names the schedule apart, 1.6-1.8 in the sampler's name."""
        if self.has("/sdapi/v1/schedulers"):
            return {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}
        return {"sampler_name": "DPM++ 2M Karras"}

    def txt2img(self, **extra) -> dict:
        body = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 1234, "cfg_scale": 7,
                **self.sampling} | extra
        return self.post("/sdapi/v1/txt2img", body)


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    files = {name: _write_checkpoint(WORK / "ckpts" / "BK-SDM" / f"{name}.safetensors", *spec)
             for name, spec in BK_FILES.items()}
    files["sd1-teacher"] = _write_checkpoint(WORK / "ckpts" / "sd1-teacher.safetensors", "teacher", "v1")
    files.update(_write_broken_checkpoints(files["small-v1"]))
    return files


def run_install_py() -> None:
    """Our install.py, as the WebUI runs an extension's installer at start (the launches here skip that)."""
    subprocess.run([WEBUI_PYTHON, str(REPO / "install.py")], cwd=WEBUI_DIR, env=dict(os.environ, PYTHONPATH=WEBUI_DIR),
                   check=True)


def launch(name: str, ckpt: Path, *flags: str, probe: str | None = None, extensions: dict[str, Path] | None = None,
           env: dict[str, str] | None = None, lora_dir: Path | None = None, prepare=None) -> WebUI:
    """A WebUI with this extension in a fresh data dir, once its model is loaded.

    `probe`: the source of a test-only script, installed as one more extension loaded after ours;
    `extensions`: other extensions' trees, copied in by name; `prepare(data_dir)`: runs before launch.
    """
    run_install_py()  # quick when done
    data = RUNS / f"data-{name}"
    shutil.rmtree(data, ignore_errors=True)
    (data / "extensions").mkdir(parents=True)
    os.symlink(REPO, data / "extensions" / "sd-webui-bk-sdm")
    for folder, tree in (extensions or {}).items():
        shutil.copytree(tree, data / "extensions" / folder, ignore=shutil.ignore_patterns(".git"))
    if prepare:
        prepare(data)
    if probe:
        (data / "extensions" / "zz-bksdm-probe" / "scripts").mkdir(parents=True)
        (data / "extensions" / "zz-bksdm-probe" / "scripts" / "probe.py").write_text(probe)
    log = RUNS / f"webui-{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    lora_dir = lora_dir or _write_lora(WORK / "lora")
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        port = _free_port()
        command = [WEBUI_PYTHON, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
                   "--skip-install", "--skip-version-check", "--use-cpu", "all", "--no-half", "--no-half-vae",
                   "--api", "--server-name", "127.0.0.1", "--port", str(port), "--no-download-sd-model",
                   "--disable-nan-check", "--data-dir", str(data), "--ckpt-dir", str(WORK / "ckpts"),
                   "--lora-dir", str(lora_dir), "--ckpt", str(ckpt), *flags]
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=WEBUI_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = WebUI(port, process, log)
        deadline = time.time() + 900
        while time.time() < deadline and process.poll() is None and not started(log):
            time.sleep(1)  # no request before the WebUI has added its middleware (see STARTUP_ATTEMPTS)
        while time.time() < deadline and process.poll() is None:
            try:
                if server.get("/bksdm/v1/model")["state"] == "loaded":  # the start-up load is over
                    return server
            except (urllib.error.URLError, ConnectionError, AssertionError):
                pass
            time.sleep(3)
        if process.poll() is None:
            server.stop()
            pytest.fail(f"the WebUI did not load its model in 15 minutes: see {log}")
        if attempt == STARTUP_ATTEMPTS or not startup_race(log.read_text(errors="replace")):
            pytest.fail(f"the WebUI exited: see {log}")
        kept = log.with_name(f"{log.stem}.attempt{attempt}.log")
        log.replace(kept)
        print(f"the WebUI ended in a start-up race (see {kept}); starting it again")
    raise AssertionError("unreachable")


# Two start-up races of the WebUI itself (1.6-1.10), neither in our code, which load makes likelier:
# - after gradio serves, the WebUI adds middleware (setup_middleware, then the API's @app.middleware); a
#   request in between makes starlette build its stack, and the next add raises "Cannot add middleware
#   after an application has started": the WebUI exits. So launch() sends nothing before the WebUI has
#   printed its "Startup time" (after its app_started callbacks);
# - gradio 3.41's launch() checks its own page with a HEAD request of 3 s timeout (networking.url_ok,
#   whose ReadTimeout is not caught) and gives its server thread 5 s to come up: a late answer under
#   heavy load ends the WebUI too. That failure (and the first, should a request still come early) is
#   started again, with the failed attempt's log kept.
STARTUP_ATTEMPTS = 3
STARTUP_RACES = ("in url_ok", "When localhost is not accessible", "Server failed to start",
                 "Cannot add middleware after an application has started")


def started(log: Path) -> bool:
    return "Startup time:" in log.read_text(errors="replace")


def startup_race(log: str) -> bool:
    """Whether a WebUI's log ends in one of its start-up races (above)."""
    return "Startup time:" not in log and any(failure in log for failure in STARTUP_RACES)


@pytest.fixture(scope="module")
def webui(checkpoints):
    server = launch("main", checkpoints["small-v1"])
    yield server
    server.stop()


# --- tests --------------------------------------------------------------------------------------


def test_install_py_only_adds_packages_and_is_quick_when_done(tmp_path):
    freeze = lambda: dict(  # noqa: E731
        line.split("==", 1) for line in subprocess.run([WEBUI_PYTHON, "-m", "pip", "freeze"], capture_output=True,
                                                       text=True, check=True).stdout.splitlines() if "==" in line)
    before = freeze()
    env = dict(os.environ, PYTHONPATH=WEBUI_DIR)
    subprocess.run([WEBUI_PYTHON, str(REPO / "install.py")], cwd=WEBUI_DIR, env=env, check=True)
    after = freeze()
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}, "install.py changed a WebUI package"
    assert {"diffusers", "peft"} <= set(after)
    start = time.perf_counter()
    subprocess.run([WEBUI_PYTHON, str(REPO / "install.py")], cwd=WEBUI_DIR, env=env, check=True)
    assert time.perf_counter() - start < 2.0


def test_bk_checkpoints_are_listed(webui):
    titles = webui.titles()
    for name in BK_FILES:
        assert titles[name].startswith(f"BK-SDM/{name}.safetensors")


@pytest.mark.parametrize("name", list(BK_FILES))
def test_each_bk_layout_loads_whole_and_generates(webui, name):
    layout, version = BK_FILES[name]
    report = webui.switch(name)["loaded"]
    assert report["checkpoint"] == webui.titles()[name]
    assert (report["layout"], report["version"]) == (layout, version)
    assert report["prediction_type"] == ("v_prediction" if version == "v2-768" else "epsilon")
    keys = report["keys"]
    assert keys["missing"] == keys["unexpected"] == keys["mismatched"] == []
    if version.startswith("v2"):  # SD2's never-run last text block and projection, listed apart
        assert keys["unused"] and all(k.startswith("cond_stage_model.model.") for k in keys["unused"])
    else:
        assert keys["unused"] == []
    check = webui.post("/bksdm/v1/model/verify")
    assert check["max_abs_diff"] <= 1e-4 and check["output_std"] > 0.01
    result = webui.txt2img()
    assert len(result["images"]) == 1
    assert f"BK-SDM: {layout} ({version})" in json.loads(result["info"])["infotexts"][0]
    image = result["images"][0]
    img2img = webui.post("/sdapi/v1/img2img", {"init_images": [image], "prompt": "a cat", "steps": 3,
                                               "denoising_strength": 0.8, "width": 64, "height": 64,
                                               "sampler_name": "Euler a"})
    assert len(img2img["images"]) == 1


def image(encoded: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def pixels(encoded: str) -> bytes:
    return image(encoded).convert("RGB").tobytes()  # the PNG also carries the infotext


def test_hires_fix_on_a_bk_layout(webui):
    webui.switch("tiny-v1")
    result = webui.txt2img(enable_hr=True, hr_scale=2, hr_second_pass_steps=1, denoising_strength=0.5,
                           hr_upscaler="Latent")
    assert image(result["images"][0]).size == (128, 128)


@pytest.mark.parametrize("broken", ["truncated", "missing"])
def test_broken_bk_file_is_refused_and_the_previous_model_still_generates(webui, broken):
    webui.switch("base-v1")
    name = {"truncated": "truncated-small", "missing": "missing-tensor-small"}[broken]
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": webui.titles()[name]})
    report = webui.get("/bksdm/v1/model")
    assert report["loaded"]["layout"] == "base"
    assert ("truncated or corrupt" if broken == "truncated" else "1 missing") in report["last_refusal"]["message"]
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == webui.titles()["base-v1"]
    # through a generation request's override the refusal is the request's error
    status, answer = webui.call("POST", "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 1, "width": 64, "height": 64,
        "override_settings": {"sd_model_checkpoint": webui.titles()["truncated-small"]}})
    assert status >= 400 and "truncated or corrupt" in json.dumps(answer)
    assert len(webui.txt2img()["images"]) == 1
    assert webui.get("/bksdm/v1/model")["loaded"]["layout"] == "base"


def _infotext(result: dict) -> str:
    return json.loads(result["info"])["infotexts"][0]


NOT_CHECKPOINTS = {  # file: (tensors it holds, what the refusal says)
    "unet-only": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                   "model.diffusion_model.input_blocks.11.0.in_layers.0.weight": (1280,),
                   "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1)}, "U-Net-only file"),
    "vae-only": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "VAE only"),
    "a-lora": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 320),
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": (320, 4)}, "is a LoRA"),
}


def test_files_that_are_no_checkpoints_are_refused_and_the_previous_model_still_generates(webui):
    import torch
    from safetensors.torch import save_file

    folder = RUNS / "data-main" / "models" / "Stable-diffusion" / "not-checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (tensors, _) in NOT_CHECKPOINTS.items():
        save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(folder / f"{name}.safetensors"))
    webui.post("/sdapi/v1/refresh-checkpoints")
    try:
        webui.switch("tiny-v1")
        for name, (_, message) in NOT_CHECKPOINTS.items():
            webui.post("/sdapi/v1/options", {"sd_model_checkpoint": webui.titles()[name]})
            report = webui.get("/bksdm/v1/model")
            assert report["state"] == "loaded" and report["loaded"]["layout"] == "tiny", (name, report)
            assert message in report["last_refusal"]["message"], (name, report["last_refusal"])
            assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == webui.titles()["tiny-v1"]
            assert "BK-SDM: tiny (v1)" in _infotext(webui.txt2img())
    finally:
        shutil.rmtree(folder)
        webui.post("/sdapi/v1/refresh-checkpoints")


def test_switching_to_standard_sd_and_back(webui):
    webui.switch("small-v1")
    sd = webui.switch("sd1-teacher")["loaded"]
    assert sd["layout"] is None and sd["keys"]["missing"] == []
    assert "BK-SDM" not in json.loads(webui.txt2img()["info"])["infotexts"][0]
    back = webui.switch("small-v1")["loaded"]
    assert back["layout"] == "small" and back["keys"]["missing"] == []
    assert webui.post("/bksdm/v1/model/verify")["max_abs_diff"] <= 1e-4


def test_the_models_view_lists_each_bk_checkpoint_with_its_costs_and_speed(webui):
    for name in ("sd1-teacher", "small-v1"):  # one measured generation each, under the same condition
        webui.switch(name)
        webui.txt2img()
    rows = {row["checkpoint"]: row for row in webui.get("/bksdm/v1/models")}
    titles = webui.titles()
    assert {titles[name] for name in BK_FILES} | {titles["missing-tensor-small"]} <= set(rows)
    assert titles["sd1-teacher"] not in rows and titles["truncated-small"] not in rows  # SD itself; unreadable
    for name, (layout, version) in BK_FILES.items():
        row = rows[titles[name]]
        assert (row["layout"], row["version"]) == (layout, version)
        assert 0.3 < row["parameter_ratio"] < 1 and 0.4 < row["macs_ratio"] < 1, row
    small = rows[titles["small-v1"]]
    assert small["unet_parameters"] == 482_346_884  # BK-SDM-Small's U-Net, counted from the file's header
    assert small["s_per_image"] > 0 and "DPM++ 2M Karras, 2 steps, 64x64" in small["measured"]
    assert small["speedup"] > 0  # against sd1-teacher under the same condition
    assert "1 missing" in rows[titles["missing-tensor-small"]]["problem"]


def test_the_tab_is_in_the_ui(webui):
    config = webui.get("/config")
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "BK-SDM" in labels


def test_a_few_step_job_says_whether_this_webui_has_its_sampler(webui, tmp_path):
    """An LCM-LoRA job's "Use in txt2img": the LCM sampler is set where the WebUI has it (1.8+); on 1.6/1.7
    the tab says it is missing and sets no sampler."""
    from jobs_helpers import write_tiny_dataset
    from tiny import write_tiny_pipeline

    values = {"model": str(write_tiny_pipeline(tmp_path / "small", "small", "v1")),
              "data": str(write_tiny_dataset(tmp_path / "data")), "output_dir": str(tmp_path / "out"),
              "resolution": 64, "train_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 2,
              "mixed_precision": "no", "teacher_half": False, "num_workers": 0, "checkpoint_every": 0,
              "sample_every": 0, "sample_prompts": [], "log_every": 1, "lora_rank": 4, "lora_alpha": 4.0}
    job = webui.post("/bksdm/v1/jobs", {"kind": "lcm", "config": values})
    deadline = time.time() + 900
    while (state := webui.get(f"/bksdm/v1/jobs/{job['id']}"))["state"] not in ("done", "failed", "cancelled"):
        assert time.time() < deadline, state
        time.sleep(2)
    assert state["state"] == "done", state
    config = webui.get("/config")
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "bksdm_use")
    use = next(i for i, dep in enumerate(config["dependencies"]) if button in dep["targets"])
    status, text = _raw(webui, "/api/predict", json.dumps({"fn_index": use, "data": [job["id"]]}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200, text[:500]
    message, plan = json.loads(text)["data"]
    assert "is a LoRA" in message and "Few-step model: LCM sampler" in message
    if "LCM" in webui.samplers:
        assert "no LCM sampler" not in message and json.loads(plan)["sampler"] == "LCM"
    else:
        assert "This WebUI has no LCM sampler (it came with WebUI 1.8)" in message, message
        assert json.loads(plan)["sampler"] is None


def test_lora_in_ldm_naming_applies_to_a_bk_layout(webui):
    webui.switch("small-v1")
    plain = pixels(webui.txt2img(prompt="a photo of a cat")["images"][0])
    off = webui.txt2img(prompt="a photo of a cat <lora:bk-test:0>")
    on = webui.txt2img(prompt="a photo of a cat <lora:bk-test:1>")
    assert pixels(off["images"][0]) == plain
    assert pixels(on["images"][0]) != plain
    assert "bk-test" in json.loads(on["info"])["infotexts"][0]


def test_hypertile_follows_the_bk_layout(webui):
    if not (Path(WEBUI_DIR) / "extensions-builtin" / "hypertile").is_dir():
        pytest.skip("this WebUI has no Hypertile (built in from 1.7.0)")
    webui.switch("small-v1")
    webui.post("/sdapi/v1/options", {"hypertile_enable_unet": True})
    try:
        infotext = json.loads(webui.txt2img()["info"])["infotexts"][0]
        assert "Hypertile U-Net: True" in infotext and "BK-SDM warning" not in infotext
    finally:
        webui.post("/sdapi/v1/options", {"hypertile_enable_unet": False})


def test_a_distill_job_runs_through_the_api_while_the_webui_keeps_answering(webui, tmp_path):
    from jobs_helpers import tiny_distill_values, write_tiny_dataset
    from tiny import write_tiny_pipeline

    models = RUNS / "data-main" / "models" / "Stable-diffusion" / "BK-SDM"
    values = tiny_distill_values(write_tiny_pipeline(tmp_path / "teacher"), write_tiny_dataset(tmp_path / "data"),
                                 steps=6)
    values.update(output_dir=str(models), output_name="e2e-tiny-student")
    job = webui.post("/bksdm/v1/jobs", {"kind": "distill", "config": values, "request_id": "e2e-1"})
    again = webui.post("/bksdm/v1/jobs", {"kind": "distill", "config": values, "request_id": "e2e-1"})
    assert again["id"] == job["id"]
    slowest, deadline = 0.0, time.time() + 900
    while (state := webui.get(f"/bksdm/v1/jobs/{job['id']}"))["state"] not in ("done", "failed", "cancelled"):
        assert time.time() < deadline, state
        start = time.perf_counter()
        webui.get("/sdapi/v1/sd-models")
        status, _ = webui.call("GET", "/")  # the UI page
        slowest = max(slowest, time.perf_counter() - start)
        assert status == 200
        time.sleep(2)
    assert state["state"] == "done", state
    assert slowest < 10, f"the WebUI took {slowest:.1f} s to answer while the job ran"
    webui.post("/sdapi/v1/refresh-checkpoints")
    assert "e2e-tiny-student" in webui.titles()


def test_after_two_jobs_the_list_holds_checkpoints_only_and_the_users_selection_stays(webui, tmp_path):
    from jobs_helpers import tiny_distill_values, write_tiny_dataset
    from tiny import write_tiny_pipeline

    models = RUNS / "data-main" / "models" / "Stable-diffusion"
    webui.switch("base-v1")  # the user's pick; the WebUI was started with --ckpt small-v1
    teacher, data = write_tiny_pipeline(tmp_path / "teacher"), write_tiny_dataset(tmp_path / "data")
    jobs = []
    for index in (1, 2):
        values = tiny_distill_values(teacher, data, steps=2)
        values.update(output_dir=str(models / "BK-SDM"), output_name=f"e2e-list-{index}")
        jobs.append(webui.post("/bksdm/v1/jobs", {"kind": "distill", "config": values}))
    deadline = time.time() + 900
    for job in jobs:
        while (state := webui.get(f"/bksdm/v1/jobs/{job['id']}"))["state"] not in ("done", "failed", "cancelled"):
            assert time.time() < deadline, state
            time.sleep(2)
        assert state["state"] == "done", state
        assert (Path(state["folder"]) / "output" / f"e2e-list-{jobs.index(job) + 1}" / "model_index.json").is_file()
    webui.post("/sdapi/v1/refresh-checkpoints")  # what the tab does when a job ends (javascript/bksdm.js)
    listed = [Path(m["filename"]) for m in webui.get("/sdapi/v1/sd-models")]
    assert {"e2e-list-1", "e2e-list-2"} <= {path.stem for path in listed}
    assert not list(models.rglob("model_index.json"))  # no diffusers copy in the models folder
    assert all(path.suffix == ".safetensors" and path.stem != "diffusion_pytorch_model" for path in listed)
    # the selection did not move: the next generation runs the user's checkpoint
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == webui.titles()["base-v1"]
    infotext = _infotext(webui.txt2img())
    assert "Model: base-v1," in infotext and "BK-SDM: base (v1)" in infotext


def _raw(webui: WebUI, path: str, body: bytes, headers: dict) -> tuple[int, str]:
    """A POST with exactly these headers (Host too), as a rebinding or foreign page would send it."""
    request = urllib.request.Request(webui.base + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def test_foreign_pages_cannot_press_the_tabs_buttons_through_gradio(webui, tmp_path):
    """gradio 3.41 builds a handler's gr.Request from a /api/predict body's `request`: the real Host and
    Origin are checked in front of it. Every attack is answered 403 (or its WebSocket closed) and makes no
    job; the same Launch from the WebUI's own address makes one."""
    from jobs_helpers import press, tiny_distill_values, write_tiny_dataset
    from tiny import write_tiny_pipeline
    from websockets.exceptions import ConnectionClosed

    def job_ids() -> set[str]:  # the module's WebUI keeps the jobs of the tests before
        return {job["id"] for job in webui.get("/bksdm/v1/jobs")}

    earlier = job_ids()
    config = webui.get("/config")
    ids = {c["id"]: c.get("props", {}) for c in config["components"]}
    button = next(i for i, props in ids.items() if props.get("elem_id") == "bksdm_launch_distill")
    launch = next(i for i, dep in enumerate(config["dependencies"]) if button in dep["targets"])
    values = tiny_distill_values(write_tiny_pipeline(tmp_path / "teacher"), write_tiny_dataset(tmp_path / "data"),
                                 steps=100_000)
    values["output_dir"] = str(tmp_path / "out")
    data = []
    for i in config["dependencies"][launch]["inputs"]:
        name = ids[i]["elem_id"].removeprefix("bksdm_distill_")
        value = values.get(name, ids[i].get("value"))
        data.append("\n".join(value) if isinstance(value, list) else value)
    port = webui.base.rsplit(":", 1)[1]
    own = f"127.0.0.1:{port}"
    forged = json.dumps({"fn_index": launch, "data": data, "session_hash": "evil",
                         "request": {"url": f"http://{own}/", "headers": {"host": own, "origin": f"http://{own}"},
                                     "query_params": {}, "path_params": {},
                                     "client": {"host": "127.0.0.1", "port": 1}}}).encode()
    attacks = [  # (path, headers): the body is the forged one each time
        ("/api/predict", {"Host": f"attacker.example:{port}", "Content-Type": "application/json"}),  # rebinding
        ("/run/predict", {"Origin": "http://evil.example", "Content-Type": "application/json"}),  # cross-origin
        ("/run/predict", {"Origin": "http://evil.example", "Content-Type": "text/plain"}),  # no-cors
    ]
    for path, headers in attacks:
        status, text = _raw(webui, path, forged, headers)
        assert status == 403 and "Refused" in text, (path, headers, status, text[:300])
    status, _ = _raw(webui, "/bksdm/v1/jobs", json.dumps({"kind": "distill", "config": values}).encode(),
                     {"Host": f"attacker.example:{port}", "Content-Type": "application/json"})
    assert status == 403
    with pytest.raises(ConnectionClosed):  # the queue's WebSocket from a foreign page, pressing Launch
        press(webui.base, launch, data, origin="http://evil.example")
    assert job_ids() == earlier
    # the WebUI's page itself, under another name (a reverse proxy), is served as before
    assert urllib.request.urlopen(urllib.request.Request(webui.base + "/", headers={"Host": f"proxy.example:{port}"}),
                                  timeout=60).status == 200

    # our own API client: no Origin, Host 127.0.0.1:PORT, the same Launch without the forged request
    status, text = _raw(webui, "/api/predict", json.dumps({"fn_index": launch, "data": data}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200 and "follow it in the Jobs tab" in text, text[:500]
    [job] = [job for job in webui.get("/bksdm/v1/jobs") if job["id"] not in earlier]
    webui.post(f"/bksdm/v1/jobs/{job['id']}/cancel")
    deadline = time.time() + 120
    while webui.get(f"/bksdm/v1/jobs/{job['id']}")["state"] not in ("cancelled", "done", "failed"):
        assert time.time() < deadline
        time.sleep(1)


def test_diffusers_named_lora_lands_on_the_bk_block(webui):
    webui.switch("small-v1")
    shown = {name: pixels(webui.txt2img(prompt=f"a photo of a cat <lora:{name}:1>")["images"][0])
             for name in ("bk-diffusers", "bk-out2", "bk-out3")}
    assert shown["bk-diffusers"] == shown["bk-out2"] != shown["bk-out3"]


HANDOFF_PROBE = """
# Test-only: the VRAM hand-off acts only with CUDA; on this CPU WebUI it is switched on and the
# model's moves (which are no-ops on the CPU) are recorded instead.
from modules import script_callbacks, sd_models

from bksdm_ext.webui import extension

extension._handoff_wanted = lambda: True
moves = []


def _counted(name):
    original = getattr(sd_models, name)

    def wrapper(*args, **kwargs):
        moves.append(name)
        return original(*args, **kwargs)

    setattr(sd_models, name, wrapper)


for _name in ("send_model_to_cpu", "send_model_to_device"):
    _counted(_name)


def _routes(demo, app):
    app.add_api_route("/probe/handoff", lambda: {"moves": list(moves), "lent": extension.ext.lent}, methods=["GET"])


script_callbacks.on_app_started(_routes)
"""


def test_a_generation_during_a_job_borrows_the_model_and_gives_it_back(checkpoints, webui, tmp_path):
    from jobs_helpers import tiny_distill_values, write_tiny_dataset
    from tiny import write_tiny_pipeline

    webui.stop()  # one WebUI at a time (memory)
    server = launch("handoff", checkpoints["small-v1"], probe=HANDOFF_PROBE)
    try:
        def moves():
            return server.get("/probe/handoff")["moves"]

        start = len(moves())
        values = tiny_distill_values(write_tiny_pipeline(tmp_path / "teacher"), write_tiny_dataset(tmp_path / "data"),
                                     steps=100_000)
        values["output_dir"] = str(tmp_path / "out")
        job = server.post("/bksdm/v1/jobs", {"kind": "distill", "config": values})
        assert moves()[start:] == ["send_model_to_cpu"]  # freed before the job's process started
        assert len(server.txt2img()["images"]) == 1
        deadline = time.time() + 30  # the runner's next ticks give the GPU back
        while (probe := server.get("/probe/handoff"))["lent"] and time.time() < deadline:
            time.sleep(0.5)
        assert probe["moves"][start:] == ["send_model_to_cpu", "send_model_to_device", "send_model_to_cpu"]
        assert not probe["lent"]
        server.post(f"/bksdm/v1/jobs/{job['id']}/cancel")
        deadline = time.time() + 120
        while server.get(f"/bksdm/v1/jobs/{job['id']}")["state"] not in ("cancelled", "done", "failed"):
            assert time.time() < deadline
            time.sleep(1)
        deadline = time.time() + 30  # the queue is empty: the model goes back for good
        while len(moves()) - start < 4 and time.time() < deadline:
            time.sleep(0.5)
        assert moves()[start:] == ["send_model_to_cpu", "send_model_to_device", "send_model_to_cpu",
                                   "send_model_to_device"]
        assert len(server.txt2img()["images"]) == 1
    finally:
        server.stop()


def test_lowvram_and_sdp_attention_on_a_bk_layout(checkpoints, webui):
    webui.stop()  # one WebUI at a time (memory): this test stays the last of the file
    server = launch("lowvram", checkpoints["tiny-v1"], "--lowvram", "--opt-sdp-attention")
    try:
        assert "Applying attention optimization: sdp" in server.log.read_text()
        assert server.get("/bksdm/v1/model")["loaded"]["layout"] == "tiny"
        assert server.post("/bksdm/v1/model/verify")["max_abs_diff"] <= 1e-4
        assert len(server.txt2img()["images"]) == 1
    finally:
        server.stop()
