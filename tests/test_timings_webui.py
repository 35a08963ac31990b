"""End to end in a real WebUI: every txt2img/img2img call adds one timing row; the benchmark route works.

Needs WEBUI_DIR (a WebUI 1.6-1.10 checkout), WEBUI_PYTHON (its venv's python) and WEBUI_CKPT (an SD
checkpoint file); WEBUI_BK_CKPT (a BK-SDM single file, e.g. from `bksdm build-student` + `bksdm convert`)
adds the BK side; HF_HOME must hold the CLIP tokenizer when running offline.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bksdm_ext.timings.store import TimingStore

pytestmark = [pytest.mark.webui, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
NEEDED = ("WEBUI_DIR", "WEBUI_PYTHON", "WEBUI_CKPT")

# A real WebUI script (test-only extension) doing what others do to generations: one that dies before
# postprocess, and a nested img2img run from postprocess_image the way ADetailer runs its inpainting.
HELPER = """
from modules import processing, scripts


class TimingsE2EHelper(scripts.Script):
    def title(self):
        return "timings e2e helper"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_batch(self, p, *args, **kwargs):
        if "FAIL-NOW" in p.prompt:  # script errors are caught by the WebUI; a bad sampler kills p.sample
            p.sampler_name = "no such sampler (timings e2e helper)"

    def postprocess_image(self, p, pp, *args):
        if "NESTED" in p.prompt:
            inner = processing.StableDiffusionProcessingImg2Img(
                sd_model=p.sd_model, init_images=[pp.image], prompt="inner", steps=4, denoising_strength=0.5,
                width=p.width, height=p.height, sampler_name="Euler", do_not_save_samples=True,
                do_not_save_grid=True)
            inner.scripts, inner.script_args = p.scripts, p.script_args
            processing.process_images(inner)
"""


STARTUP_ANSWERS: list[dict] = []  # GET /bksdm/v1/model from the server's first answer until its model loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, payload: dict | None = None, timeout: float = 900):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    missing = [name for name in NEEDED if not os.environ.get(name)]
    if missing or sys.platform == "win32":
        pytest.skip(f"set {', '.join(missing)} to run the WebUI end-to-end timing tests (Linux)")
    from test_webui_e2e import run_install_py

    run_install_py()  # as the WebUI does at start (it is launched with --skip-install here)
    data = tmp_path_factory.mktemp("webui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "sd-webui-bk-sdm").symlink_to(REPO)
    (data / "extensions" / "timings-e2e-helper" / "scripts").mkdir(parents=True)
    (data / "extensions" / "timings-e2e-helper" / "scripts" / "helper.py").write_text(HELPER)
    if os.environ.get("WEBUI_BK_CKPT"):
        models = data / "models" / "Stable-diffusion"
        models.mkdir(parents=True)
        bk = Path(os.environ["WEBUI_BK_CKPT"])
        for path in [bk, bk.with_suffix(".yaml")]:
            if path.exists():
                (models / path.name).symlink_to(path)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(data / "webui.log", "w")
    server = subprocess.Popen(
        [os.environ["WEBUI_PYTHON"], "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
         "--skip-install", "--skip-version-check", "--use-cpu", "all", "--no-half", "--no-half-vae", "--api",
         "--nowebui", "--server-name", "127.0.0.1", "--port", str(port), "--no-download-sd-model",
         "--disable-nan-check", "--data-dir", str(data), "--ckpt", os.environ["WEBUI_CKPT"]],
        cwd=os.environ["WEBUI_DIR"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                _call(f"{base}/sdapi/v1/sd-models", timeout=10)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the WebUI did not start; see {data / 'webui.log'}")
                time.sleep(2)
        while True:  # what the model route says until the start-up model is there
            STARTUP_ANSWERS.append(_call(f"{base}/bksdm/v1/model", timeout=30))
            if STARTUP_ANSWERS[-1]["state"] != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield base, data / "bksdm" / "timings.sqlite3"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _rows(path):
    if not path.exists():
        return []
    with TimingStore(path) as store:
        return store.records()


def test_each_generation_adds_exactly_one_row(webui):
    base, db = webui
    checkpoint = Path(os.environ["WEBUI_CKPT"]).stem
    before = len(_rows(db))
    _call(f"{base}/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                       "sampler_name": "Euler", "cfg_scale": 7, "seed": 5})
    rows = _rows(db)
    assert len(rows) == before + 1
    row = rows[-1]
    assert (row.source, row.checkpoint, row.layout, row.mode, row.sampler, row.steps, row.unet_calls) == (
        "webui", checkpoint, "sd", "txt2img", "Euler", 2, 2)
    assert (row.width, row.height, row.batch_size, row.n_iter, row.seed) == (64, 64, 1, 1, 5)
    assert row.sampling_s + row.vae_decode_s <= row.total_s
    assert row.checkpoint_hash and row.webui_version and row.attention and row.precision == "float32"

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buffer, format="PNG")
    _call(f"{base}/sdapi/v1/img2img", {"prompt": "a cat", "steps": 4, "denoising_strength": 0.5, "width": 64,
                                       "height": 64, "sampler_name": "Euler", "seed": 6,
                                       "init_images": [base64.b64encode(buffer.getvalue()).decode()]})
    rows = _rows(db)
    assert len(rows) == before + 2
    assert (rows[-1].mode, rows[-1].denoising_strength, rows[-1].unet_calls) == ("img2img", 0.5, int(0.5 * 4) + 1)


def test_hires_fix_counts_both_passes_and_upscaling_is_not_sampling(webui):
    base, db = webui
    before = len(_rows(db))
    _call(f"{base}/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                                       "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                                       "hr_second_pass_steps": 2, "denoising_strength": 0.5})
    rows = _rows(db)
    assert len(rows) == before + 1
    row = rows[-1]
    # first pass 2 steps; the second pass runs its 2 steps of a schedule stretched to 2 / 0.5 (the WebUI's rule)
    assert (row.hires, row.denoising_strength, row.steps, row.unet_calls) == (True, 0.5, 2, 4)
    assert row.sampling_s + row.vae_decode_s <= row.total_s


def test_a_nested_generation_is_recorded_on_its_own_and_a_dead_one_not_at_all(webui):
    base, db = webui
    before = len(_rows(db))
    with pytest.raises(urllib.error.HTTPError):
        _call(f"{base}/sdapi/v1/txt2img", {"prompt": "FAIL-NOW", "steps": 2, "width": 64, "height": 64,
                                           "sampler_name": "Euler"})
    assert len(_rows(db)) == before
    _call(f"{base}/sdapi/v1/txt2img", {"prompt": "NESTED", "steps": 2, "width": 64, "height": 64,
                                       "sampler_name": "Euler"})
    inner, outer = _rows(db)[before:]
    # the outer run's script arguments can change the inner steps: compare with the steps it ran
    assert (inner.mode, inner.denoising_strength, inner.unet_calls) == ("img2img", 0.5, int(0.5 * inner.steps) + 1)
    assert (outer.mode, outer.steps, outer.unet_calls) == ("txt2img", 2, 2)
    assert inner.total_s < outer.total_s  # the inner run happened inside the outer one
    for row in (inner, outer):
        assert row.sampling_s + row.vae_decode_s <= row.total_s


def test_a_ui_style_generation_records_the_schedule_its_infotext_shows(webui):
    base, db = webui
    before = len(_rows(db))
    try:
        _call(f"{base}/sdapi/v1/schedulers")
        schedulers = True  # 1.9+
    except urllib.error.HTTPError:
        schedulers = False
    # what the UI sends: 1.9+ the sampler, and "Automatic" as the schedule (DPM++ 2M then runs its own, Karras);
    # 1.6-1.8 its sampler names carry the schedule
    sampling = {"sampler_name": "DPM++ 2M", "scheduler": "Automatic"} if schedulers else {
        "sampler_name": "DPM++ 2M Karras"}
    result = _call(f"{base}/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **sampling})
    infotext = json.loads(result["info"])["infotexts"][0]
    shown = dict(part.split(": ", 1) for part in infotext.splitlines()[-1].split(", ") if ": " in part)
    row = _rows(db)[before]
    if schedulers:
        assert (row.sampler, row.schedule) == (shown["Sampler"], shown["Schedule type"]) == ("DPM++ 2M", "Karras")
    else:  # kept in the 1.9+ form, so that rows of every version group together
        assert "Schedule type" not in shown and shown["Sampler"] == "DPM++ 2M Karras"
        assert (row.sampler, row.schedule) == ("DPM++ 2M", "Karras")


def test_the_model_route_said_loading_until_the_start_up_model_was_there(webui):
    states = [answer["state"] for answer in STARTUP_ANSWERS]
    assert states[-1] == "loaded" and "loading" in states and "none" not in states, states
    assert all(a["loading"] for a in STARTUP_ANSWERS if a["state"] == "loading")


def _titles(base):
    """(SD checkpoint title, BK checkpoint title or None)."""
    titles = {Path(m["filename"]).stem: m["title"] for m in _call(f"{base}/sdapi/v1/sd-models")}
    bk = Path(os.environ["WEBUI_BK_CKPT"]).stem if os.environ.get("WEBUI_BK_CKPT") else None
    return titles[Path(os.environ["WEBUI_CKPT"]).stem], titles.get(bk)


def test_a_bk_checkpoint_is_recorded_with_its_layout(webui):
    base, db = webui
    _, bk = _titles(base)
    if bk is None:
        pytest.skip("set WEBUI_BK_CKPT to a BK-SDM checkpoint file")
    before = len(_rows(db))
    _call(f"{base}/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                                       "override_settings": {"sd_model_checkpoint": bk}})
    rows = _rows(db)
    assert len(rows) == before + 1
    assert (rows[-1].checkpoint, rows[-1].layout, rows[-1].version, rows[-1].unet_calls) == (
        Path(os.environ["WEBUI_BK_CKPT"]).stem, "small", "v1", 2)


def test_benchmark_route_records_the_protocol_and_returns_the_table(webui):
    base, db = webui
    sd, bk = _titles(base)
    chosen = [sd] + ([bk] if bk else [])
    before = len(_rows(db))
    answer = _call(f"{base}/bksdm/v1/timings/benchmark", {"checkpoints": chosen, "images": 1, "warmup": 1,
                                                          "width": 64, "height": 64, "steps": 2})
    rows = _rows(db)[before:]
    assert answer["records"] == len(rows) == len(chosen)  # warm-up images are not recorded
    for row in rows:
        # the same on every WebUI version (before 1.9 the schedule is part of the sampler's name)
        assert (row.source, row.sampler, row.schedule, row.steps, row.unet_calls) == (
            "webui-bench", "DPM++ 2M", "Karras", 2, 2)
    assert [row.layout for row in rows] == ["sd", "small"][:len(chosen)]
    groups = {group["checkpoint"]: group for group in answer["groups"]}
    assert groups[rows[0].checkpoint]["speedup"] == pytest.approx(1.0)  # the first checkpoint is the reference
    if bk:
        assert groups[rows[1].checkpoint]["speedup"] == pytest.approx(rows[0].total_s / rows[1].total_s)
    table = _call(f"{base}/bksdm/v1/timings?source=webui-bench")
    assert table["records"] >= len(chosen) and {g["checkpoint"] for g in table["groups"]} >= set(groups)
