"""End to end in a real WebUI: every txt2img/img2img call adds one timing row; the benchmark route works.

Needs WEBUI_DIR (a WebUI 1.6-1.10 checkout), WEBUI_PYTHON (its venv's python) and WEBUI_CKPT (an SD
checkpoint file); HF_HOME must hold the CLIP tokenizer when running offline.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bksdm_ext.timings.store import TimingStore

pytestmark = [pytest.mark.webui, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
NEEDED = ("WEBUI_DIR", "WEBUI_PYTHON", "WEBUI_CKPT")


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
    data = tmp_path_factory.mktemp("webui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "sd-webui-bk-sdm").symlink_to(REPO)
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


def test_benchmark_route_records_the_protocol_and_returns_the_table(webui):
    base, db = webui
    checkpoints = _call(f"{base}/sdapi/v1/sd-models")
    title = checkpoints[0]["title"]
    before = len(_rows(db))
    answer = _call(f"{base}/bksdm/v1/timings/benchmark", {"checkpoints": [title], "images": 1, "warmup": 1,
                                                          "width": 64, "height": 64, "steps": 2})
    rows = _rows(db)
    assert answer["records"] == 1 and len(rows) == before + 1  # the warm-up image is not recorded
    assert (rows[-1].source, rows[-1].sampler, rows[-1].steps, rows[-1].unet_calls) == ("webui-bench", "DPM++ 2M", 2, 2)
    assert rows[-1].schedule == "Karras" or rows[-1].sampler.endswith("Karras")
    (group,) = answer["groups"]
    assert group["speedup"] == pytest.approx(1.0) and group["size"] == "64x64"
    table = _call(f"{base}/bksdm/v1/timings?source=webui-bench")
    assert table["records"] >= 1 and table["groups"][0]["checkpoint"] == rows[-1].checkpoint
