"""The BK-SDM app in a real browser: headless Debian chromium driven by Playwright (no browser download).

Starts `bksdm app` on a loopback port, fills the Distill form for the tiny teacher, watches the
progress bar and the log move, cancels, resumes, and sees the job finish with its loss chart and
sample images. The page is saved as artifacts/bksdm-app-*.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs_helpers import free_port, tiny_distill_values, wait_until, write_tiny_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("BKSDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def app(tmp_path):
    """`bksdm app` as a user starts it, on a free loopback port; yields its URL."""
    port = free_port()
    log = open(tmp_path / "app.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "bksdm_ext.cli", "app", "--data-dir", str(tmp_path / "data"),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # tiny models
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        def up():
            assert server.poll() is None, (tmp_path / "app.log").read_text()
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 120, "bksdm app to answer")
        yield url
    finally:
        for job_dir in (tmp_path / "data" / "jobs").glob("*"):
            (job_dir / "cancel").touch()
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): `apt-get install -y chromium`, "
                    "or set BKSDM_CHROMIUM to a Chromium binary.")
    sync_api = pytest.importorskip("playwright.sync_api", reason="`pip install playwright` (the driver only; "
                                   "the test uses the system chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


STEPS = 120
DROPDOWNS = {"layout", "mixed_precision", "optimizer"}  # the config fields with `choices`


def fill(page, field: str, value) -> None:
    """Set one Distill form field the way a user does."""
    root = page.locator(f"#bksdm_distill_{field}")
    if isinstance(value, bool):
        box = root.locator("input[type=checkbox]")
        if box.is_checked() != value:
            box.click()
    elif field in DROPDOWNS:
        root.locator("input").first.click()
        page.locator(f"ul.options li[data-value='{value}']").first.click()
    else:
        root.locator("textarea, input").first.fill("\n".join(value) if isinstance(value, list) else str(value))


def state_of(page) -> str:
    cell = page.locator("#bksdm_state")
    return cell.inner_text() if cell.count() else ""


def fraction(page) -> float:
    bar = page.locator("#bksdm_progress_fill")
    return float(bar.get_attribute("data-fraction")) if bar.count() else 0.0


def wait_page(predicate, timeout: float, what: str, page) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "bksdm-app-timeout.png"), full_page=True)
            raise AssertionError(f"timed out waiting for {what}; state {state_of(page)!r}, "
                                 f"log:\n{page.locator('#bksdm_log textarea').input_value()[-2000:]}")
        page.wait_for_timeout(300)


def test_distill_from_the_browser(browser, app, tiny_pipeline_v1, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(app)
    page.locator("#bksdm_distill_teacher").wait_for()

    # enough steps that a person (and this test) can watch it and cancel it midway on a fast machine
    values = tiny_distill_values(tiny_pipeline_v1, write_tiny_dataset(tmp_path / "dataset"), steps=STEPS)
    values["checkpoint_every"] = 20
    page.locator("#bksdm_distill_more").get_by_text("Training recipe").click()  # the recipe fields live in a closed accordion
    for field, value in values.items():
        fill(page, field, value)
    page.locator("#bksdm_launch_distill").click()
    result = page.locator("#bksdm_launch_result_distill .bksdm-message")
    wait_page(lambda: result.count() and ("is running" in result.inner_text() or "is queued" in result.inner_text()), 60,
              "the launch", page)
    assert "refused" not in result.inner_text()

    page.locator("button", has_text="Jobs").first.click()
    log = page.locator("#bksdm_log textarea")
    wait_page(lambda: fraction(page) > 0 and f"step 1/{STEPS}" in log.input_value(), 180, "the first steps", page)
    first, first_log = fraction(page), log.input_value()
    wait_page(lambda: fraction(page) > first, 120, "the progress bar to advance", page)
    assert log.input_value() != first_log  # the log tail follows the job

    page.locator("#bksdm_cancel").click()
    wait_page(lambda: state_of(page) == "cancelled", 120, "cancelled", page)
    stopped = fraction(page)
    assert 0 < stopped < 1
    assert "resume continues from the last checkpoint" in page.locator("#bksdm_status .bksdm-status").inner_text()

    page.locator("#bksdm_resume").click()
    wait_page(lambda: state_of(page) == "done", 300, "done", page)
    assert fraction(page) == 1.0
    assert "--resume latest" in log.input_value()
    # the loss chart drew its lines, the gallery shows sample images
    wait_page(lambda: page.locator("#bksdm_loss_plot canvas, #bksdm_loss_plot svg").count() > 0, 30, "the chart", page)
    wait_page(lambda: page.locator("#bksdm_samples img").count() > 0, 30, "the samples", page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "bksdm-app-done.png"), full_page=True)

    # deleting asks first, then removes the job and its folder
    job_folder = Path(page.locator("#bksdm_status .bksdm-status").inner_text().split("Folder: ")[1].strip())
    page.locator("#bksdm_delete").click()
    page.locator("#bksdm_delete_confirm").click()
    wait_page(lambda: "Deleted" in page.locator("#bksdm_action_result").first.inner_text(), 30, "the deletion", page)
    assert not job_folder.exists()
