"""The BK-SDM tab in a real WebUI 1.10.1, in a real browser (headless chromium at 1366x768), as a user.

Distill: the Quick-test preset cut down to 2 steps at 64 px, the teacher picked from the tab's list of the
WebUI's checkpoints, the data checked; the Jobs view follows the job; "Use in txt2img" selects the output
and a txt2img generation from the page runs it; the Models view lists it. Few-step (LCM): a LoRA goes to
the Lora folder, and "Use in txt2img" sets txt2img's sampler, steps and CFG.

The teacher is the full-size random SD-1 checkpoint of the e2e tests, not a tiny one: the WebUI builds
only full-size U-Nets (a tiny student is refused: "no WebUI config builds it"), and the student must load
for the generation. The student is BK-SDM-Tiny (the smallest that loads) without EMA, on CPU about 9 GB
for the job beside the WebUI's 5 GB. Skips without a WebUI (see test_webui_e2e.py), chromium or
playwright. Screenshots: artifacts/webui-*.png.
"""

from __future__ import annotations

import shutil
import time

import pytest
from browser_helpers import browser  # noqa: F401 (a fixture)
from browser_helpers import (ARTIFACTS, check_data, check_form_height, fill, fraction, open_accordions, pick, raw_names,
                             state_of, tab_kinds, visible_labels, wait_page)
from jobs_helpers import write_tiny_dataset
from test_webui_e2e import WORK, checkpoints, launch  # noqa: F401 (a fixture); skips without a WebUI

from bksdm_ext import kinds

pytestmark = [pytest.mark.webui, pytest.mark.browser, pytest.mark.slow]

VIEWPORT = {"width": 1366, "height": 768}
LORAS = WORK / "lora-browser"  # this WebUI's --lora-dir: the few-step LoRA must land here by default
JOB_MINUTES = 20


@pytest.fixture(scope="module")
def webui(checkpoints):  # noqa: F811
    shutil.rmtree(LORAS, ignore_errors=True)
    LORAS.mkdir(parents=True)
    server = launch("browser", checkpoints["tiny-v1"], lora_dir=LORAS)  # --ckpt, as the e2e tests start it
    yield server
    server.stop()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"webui-{name}.png"), full_page=True)


def wait(predicate, timeout: float, what: str, page) -> None:
    wait_page(predicate, timeout, what, page, prefix="webui")


def open_tab(page, url: str):
    page.goto(url)
    page.locator("#tabs > .tab-nav button", has_text="BK-SDM").first.click()
    page.locator("#bksdm_distill_teacher").wait_for()


def form(page, kind: str) -> None:
    page.locator("#bksdm_tabs > .tab-nav button", has_text=kinds.get(kind).title).first.click()
    page.locator(f"#bksdm_tab_{kind}").wait_for()


def refresh_picker(page, elem_id: str) -> None:
    page.locator(f"#{elem_id}_refresh").click()
    page.wait_for_timeout(1500)
    wait(lambda: not page.locator(f"#{elem_id} .pending").count(), 60, "the list's refresh", page)


def title_of(webui, stem: str) -> str:
    return webui.titles()[stem]


def launch_from(page, kind: str) -> str:
    """Press Launch; the id of the job it made (the message must say it is running or queued)."""
    page.locator(f"#bksdm_launch_{kind}").click()
    result = page.locator(f"#bksdm_launch_result_{kind} .bksdm-message")
    wait(lambda: result.count() and (" is running" in result.inner_text() or " is queued" in result.inner_text()),
         120, f"the {kind} launch", page)
    return result.inner_text().split("Job ")[1].split(" ")[0]


def follow_to_done(page, job_id: str, steps: int) -> None:
    """The Jobs view shows the job just launched (not another) until it is done."""
    page.locator("#bksdm_tabs > .tab-nav button", has_text="Jobs").first.click()
    status = page.locator("#bksdm_status .bksdm-status")
    wait(lambda: job_id in status.inner_text(), 60, "the launched job in the Jobs view", page)
    wait(lambda: state_of(page) == "done", JOB_MINUTES * 60, f"job {job_id} done", page)
    assert job_id in status.inner_text() and f"step {steps} / {steps}" in status.inner_text()
    assert fraction(page) == 1.0
    use = page.locator("#bksdm_use")
    wait(lambda: use.is_enabled(), 30, "Use in txt2img to be enabled", page)


def txt2img_controls(page) -> dict[str, str]:
    return {"sampler": page.locator("#txt2img_sampling input").first.input_value(),
            "steps": page.locator("#txt2img_steps input[type=number]").first.input_value(),
            "cfg_scale": page.locator("#txt2img_cfg_scale input[type=number]").first.input_value()}


def generate(page, prompt: str, steps: int | None = None) -> str:
    """A txt2img generation from the page at 64x64; its infotext as the page shows it."""
    page.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
    page.locator("#txt2img_prompt textarea").fill(prompt)
    boxes = {"txt2img_width": 64, "txt2img_height": 64, **({"txt2img_steps": steps} if steps else {})}
    for elem_id, value in boxes.items():
        box = page.locator(f"#{elem_id} input[type=number]").first
        box.fill(str(value))
        box.press("Tab")
    info = page.locator("#html_info_txt2img").first
    before = info.inner_text()
    page.locator("#txt2img_generate").click()
    wait(lambda: info.inner_text().strip() and info.inner_text() != before and "Model:" in info.inner_text(),
         600, "the generation's infotext", page)
    return info.inner_text()


def test_distill_in_the_webui_from_the_browser(browser, webui, tmp_path):
    page = browser.new_page(viewport=VIEWPORT)
    open_tab(page, webui.base)
    # every form: short with its accordions closed, and labelled for people
    for kind in tab_kinds():
        form(page, kind)
        check_form_height(page, kind, VIEWPORT["height"], ARTIFACTS, prefix="webui")
        assert visible_labels(page, "#tab_bksdm") & raw_names() == set(), kind
    form(page, "distill")

    # the Quick-test preset, then steps and size cut down for this CPU
    pick(page, "bksdm_distill_preset", "Quick test")
    wait(lambda: page.locator("#bksdm_distill_max_steps input").input_value() == "64", 60, "the preset", page)
    assert "Quick test" in page.locator("#bksdm_distill_preset_help").first.inner_text()
    # the teacher picked from the WebUI's checkpoint list, the data checked
    teacher = title_of(webui, "sd1-teacher")
    refresh_picker(page, "bksdm_distill_teacher")  # the list as the WebUI has it now
    pick(page, "bksdm_distill_teacher", teacher)
    assert page.locator("#bksdm_distill_teacher input").first.input_value() == teacher
    assert "4 images with captions" in check_data(page, "distill", write_tiny_dataset(tmp_path / "dataset"), "webui")
    # the output folder is the WebUI's, so the checkpoint list shows the student
    assert page.locator("#bksdm_distill_output_dir textarea, #bksdm_distill_output_dir input").first.input_value() \
        == str(WORK / "data-browser" / "models" / "Stable-diffusion" / "BK-SDM")
    open_accordions(page, "distill")
    cut = {"max_steps": 2, "resolution": 64, "train_batch_size": 1, "layout": "tiny", "checkpoint_every": 0,
           "sample_every": 0, "mixed_precision": "no", "use_ema": False, "num_workers": 0,
           "output_name": "browser-student"}
    for field, value in cut.items():
        fill(page, "distill", field, value)
    shot(page, "distill-filled")
    job_id = launch_from(page, "distill")

    follow_to_done(page, job_id, 2)
    shot(page, "jobs-done")

    # "Use in txt2img" selects the student in the WebUI's dropdown; the page's generation runs it
    page.locator("#bksdm_use").click()
    student = "BK-SDM/browser-student.safetensors"  # its title, and " [hash]" once the WebUI has hashed it
    wait(lambda: f"Selected {student}" in page.locator("#bksdm_action_result").first.inner_text(), 60, "the selection", page)
    wait(lambda: student in ((webui.get("/bksdm/v1/model").get("loaded") or {}).get("checkpoint") or ""), 600,
         "the WebUI to load the student", page)
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"].startswith(student)
    wait(lambda: page.locator("#setting_sd_model_checkpoint input").first.input_value().startswith(student), 60,
         "the WebUI's dropdown to show the student", page)
    infotext = generate(page, "a photo of square number 1", steps=2)
    assert "Model: browser-student," in infotext and "BK-SDM: tiny (v1)" in infotext, infotext
    shot(page, "txt2img-student")

    # the Models view lists the student: its layout and parameters, and the speed just measured
    page.locator("#tabs > .tab-nav button", has_text="BK-SDM").first.click()
    page.locator("#bksdm_tabs > .tab-nav button", has_text="Models").first.click()
    page.locator("#bksdm_models_refresh").click()
    table = page.locator("#bksdm_models_table").first
    wait(lambda: "browser-student" in table.inner_text(), 60, "the student in the Models view", page)
    row = next(r for r in table.locator("tr").all_inner_texts() if "browser-student" in r)
    assert "BK-SDM-Tiny" in row and "323 M" in row and "38%" in row, row
    assert "not measured" not in row and "64x64" in row, row  # the page's generation was timed
    shot(page, "models")


def test_a_few_step_lora_goes_to_the_lora_folder_and_sets_txt2img(browser, webui, tmp_path):
    page = browser.new_page(viewport=VIEWPORT)
    open_tab(page, webui.base)
    form(page, "lcm")
    output = page.locator("#bksdm_lcm_output_dir textarea, #bksdm_lcm_output_dir input").first
    assert page.locator("#bksdm_lcm_mode input").first.input_value() == "lora"
    assert output.input_value() == str(LORAS)  # where the WebUI's Lora extension looks (--lora-dir)
    refresh_picker(page, "bksdm_lcm_model")
    pick(page, "bksdm_lcm_model", title_of(webui, "tiny-v1"))
    fill(page, "lcm", "data", str(write_tiny_dataset(tmp_path / "dataset")))
    open_accordions(page, "lcm")
    cut = {"max_steps": 1, "resolution": 64, "train_batch_size": 1, "lora_rank": 4, "lora_alpha": 4.0,
           "checkpoint_every": 0, "sample_every": 0, "mixed_precision": "no", "num_workers": 0,
           "output_name": "browser-lcm"}
    for field, value in cut.items():
        fill(page, "lcm", field, value)
    job_id = launch_from(page, "lcm")
    follow_to_done(page, job_id, 1)
    assert (LORAS / "browser-lcm.safetensors").is_file()
    assert "LCM sampler, 4 steps" in page.locator("#bksdm_status").first.inner_text()

    # a LoRA selects no checkpoint; txt2img gets the recommended sampler, steps and CFG
    selected = webui.get("/sdapi/v1/options")["sd_model_checkpoint"]
    page.locator("#bksdm_use").click()
    wait(lambda: "<lora:browser-lcm:1>" in page.locator("#bksdm_action_result").first.inner_text(), 60, "the plan", page)
    wait(lambda: txt2img_controls(page) == {"sampler": "LCM", "steps": "4", "cfg_scale": "1.5"}, 30,
         "txt2img's controls", page)
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == selected
    # the page's generation uses them, and the Lora extension finds the LoRA where the job put it
    infotext = generate(page, "a photo of square number 1 <lora:browser-lcm:1>")
    assert "Sampler: LCM" in infotext and "Steps: 4," in infotext and "CFG scale: 1.5" in infotext, infotext
    assert "browser-lcm" in infotext, infotext  # its "Lora hashes"
    shot(page, "txt2img-lcm")
