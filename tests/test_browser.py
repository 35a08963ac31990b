"""The BK-SDM app in a real browser: headless Debian chromium driven by Playwright (no browser download).

Starts `bksdm app` on a loopback port, fills the Distill form for the tiny teacher, watches the
progress bar and the log move, cancels, resumes, and sees the job finish with its loss chart and
sample images. The page is saved as artifacts/bksdm-app-*.png.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from browser_helpers import browser  # noqa: F401 (a fixture)
from browser_helpers import (ARTIFACTS, check_data, check_form_height, fill, fraction, open_accordions, pick, raw_names,
                             state_of, tab_kinds, visible_labels, wait_page)
from jobs_helpers import free_port, tiny_distill_values, wait_until, write_tiny_dataset

from bksdm_ext import kinds

pytestmark = [pytest.mark.browser, pytest.mark.slow]



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
        yield url, tmp_path / "data"
    finally:
        for job_dir in (tmp_path / "data" / "jobs").glob("*"):
            (job_dir / "cancel").touch()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:  # a job of its still winding down on a loaded machine
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()


STEPS = 120


def test_distill_from_the_browser(app, browser, tiny_pipeline_v1, tmp_path):  # the page closes before the app stops
    url, data_dir = app
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.goto(url)
    page.locator("#bksdm_distill_teacher").wait_for()
    # the forms: short with their accordions closed, and labelled for people
    for kind in tab_kinds():
        page.locator("#bksdm_tabs > .tab-nav button", has_text=kinds.get(kind).title).first.click()
        check_form_height(page, kind, 768, ARTIFACTS)
        assert visible_labels(page) & raw_names() == set()
    page.locator("#bksdm_tabs > .tab-nav button", has_text="Distill").first.click()

    # the Quick test preset in one choice
    pick(page, "bksdm_distill_preset", "Quick test")
    wait_page(lambda: page.locator("#bksdm_distill_max_steps input").input_value() == "64", 30, "the preset", page)
    assert "Quick test" in page.locator("#bksdm_distill_preset_help").first.inner_text()

    # the teacher from the list of known models (refreshed after it appeared), the data checked
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / "tiny-teacher").symlink_to(tiny_pipeline_v1, target_is_directory=True)
    page.locator("#bksdm_distill_teacher_refresh").click()
    page.wait_for_timeout(1000)
    pick(page, "bksdm_distill_teacher", "models/tiny-teacher")
    dataset = write_tiny_dataset(tmp_path / "dataset")
    check_data(page, "distill", dataset)

    # enough steps that a person (and this test) can watch it and cancel it midway on a fast machine
    values = tiny_distill_values(tiny_pipeline_v1, dataset, steps=STEPS)
    values["checkpoint_every"] = 20
    del values["teacher"], values["data"]
    open_accordions(page, "distill")  # the advanced settings
    for field, value in values.items():
        fill(page, "distill", field, value)
    page.locator("#bksdm_launch_distill").click()
    result = page.locator("#bksdm_launch_result_distill .bksdm-message")
    wait_page(lambda: result.count() and ("is running" in result.inner_text() or "is queued" in result.inner_text()), 60,
              "the launch", page)
    assert "refused" not in result.inner_text() and "4 images with captions" in result.inner_text()
    job_id = result.inner_text().split("Job ")[1].split(" ")[0]

    page.locator("button", has_text="Jobs").first.click()
    # the Jobs view follows the job just launched; while it runs, Delete is off and Cancel on
    wait_page(lambda: job_id in page.locator("#bksdm_status .bksdm-status").inner_text(), 30, "the launched job selected", page)
    wait_page(lambda: state_of(page) == "running", 120, "running", page)
    assert page.locator("#bksdm_delete").is_disabled() and page.locator("#bksdm_cancel").is_enabled()
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
    gallery = page.locator("#bksdm_samples").inner_text()
    assert "teacher: a photo of a square" in gallery and f"step {STEPS}: a photo of a square" in gallery
    assert page.locator("#bksdm_resume").is_disabled() and page.locator("#bksdm_delete").is_enabled()
    assert page.locator("#bksdm_use").count() == 0 or not page.locator("#bksdm_use").is_visible()  # no txt2img here
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "bksdm-app-done.png"), full_page=True)

    # deleting asks first, then removes the job and its folder
    job_folder = Path(page.locator("#bksdm_status .bksdm-status").inner_text().split("Folder: ")[1].strip())
    page.locator("#bksdm_delete").click()
    page.locator("#bksdm_delete_confirm").click()
    wait_page(lambda: "Deleted" in page.locator("#bksdm_action_result").first.inner_text(), 30, "the deletion", page)
    assert not job_folder.exists()


def test_evaluate_from_the_browser(browser, app, tiny_pipeline_v1, tmp_path):
    """Two tiny models picked from the list in the Evaluate form (the first the teacher); the finished
    evaluation's table, the paper's numbers, the grid, the CSV and the history in the Jobs view."""
    from bksdm_ext.pipeline_folder import load_unet, write_student_folder
    from bksdm_ext.student import build_student

    url, data_dir = app
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "tiny-teacher").symlink_to(tiny_pipeline_v1, target_is_directory=True)
    unet, root = load_unet(tiny_pipeline_v1)
    write_student_folder(build_student(unet, "small")[0], models / "tiny-small", root)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")

    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.goto(url)
    page.locator("#bksdm_tabs button", has_text="Evaluate").first.click()
    check_form_height(page, "evaluate", 768, ARTIFACTS)
    assert "the first line is the teacher" in page.locator("#bksdm_evaluate_models").inner_text()
    page.locator("#bksdm_evaluate_models_refresh").click()
    page.wait_for_timeout(1000)
    for title in ("models/tiny-teacher", "models/tiny-small"):
        pick(page, "bksdm_evaluate_models_pick", title)
    box = page.locator("#bksdm_evaluate_models textarea")
    wait_page(lambda: box.input_value() == "models/tiny-teacher\nmodels/tiny-small", 30, "the picked models", page)
    for field, value in {"prompts": prompts, "metrics": "teacher-distance", "steps": 2, "resolution": 64,
                         "eval_size": 64, "grid_prompts": 2}.items():
        page.locator(f"#bksdm_evaluate_{field}").locator("textarea, input").first.fill(str(value))
    pick(page, "bksdm_evaluate_device", "cpu")
    page.locator("#bksdm_launch_evaluate").click()
    result = page.locator("#bksdm_launch_result_evaluate .bksdm-message")
    wait_page(lambda: result.count() and ("is running" in result.inner_text() or "is queued" in result.inner_text()),
              60, "the launch", page)

    page.locator("button", has_text="Jobs").first.click()
    wait_page(lambda: state_of(page) == "done", 300, "the evaluation to finish", page)
    table = page.locator("#bksdm_evaluation_models")
    wait_page(lambda: table.count() and table.is_visible(), 60, "the results", page)
    text = page.locator("#bksdm_evaluation_table").first.inner_text()
    assert "tiny-teacher (teacher)" in text and "tiny-small (student)" in text and "pixel MSE vs teacher" in text
    assert "N = 2 images per model" in text and "PNDM, 2 steps" in text
    assert "For reference only (published in the BK-SDM paper" in text and "paper: SD-v1.4" in text
    wait_page(lambda: page.locator("#bksdm_evaluation_grid img").count() > 0, 30, "the grid", page)
    assert "results.csv" in page.locator("#bksdm_evaluation_csv").first.inner_text()
    assert "tiny-small" in page.locator("#bksdm_evaluation_history_table").first.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "bksdm-app-evaluate.png"), full_page=True)
