"""A real browser for the tests: headless Debian chromium driven by Playwright's driver (no browser download).

`from browser_helpers import browser` makes the `browser` fixture available in a test module; it skips,
saying what to install, without chromium or the playwright package. Screenshots go to ARTIFACTS. The
page helpers below drive the BK-SDM tab the way a user does, in `bksdm app` and in the WebUI alike.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BKSDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


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


def tab_kinds() -> list[str]:
    """The kinds whose forms the tab shows: the built-in ones (tests register more in this process only)."""
    from bksdm_ext import kinds

    return [name for name in kinds.all() if kinds.is_builtin(name)]


def raw_names() -> set[str]:
    """Every config field's raw name, as written and with spaces: no label a person sees may be one."""
    from bksdm_ext import kinds

    return {n for kind in kinds.all().values() for s in kind.config_class().settings()
            for n in (s.name, s.name.replace("_", " "))}


def visible_labels(page, scope: str = "body") -> set[str]:
    """The labels, headings and button texts a person sees inside `scope` (a CSS selector)."""
    texts = page.locator(scope).locator("[data-testid=block-info], .bksdm-group, button, label span").all_inner_texts()
    return {t.strip() for t in texts if t.strip()}


def check_form_height(page, kind: str, viewport_height: int, artifacts: Path, prefix: str = "bksdm") -> float:
    """With every accordion closed, the form is at most two viewports high; a screenshot of it is kept."""
    page.locator(f"#bksdm_tab_{kind}").wait_for()
    box = page.locator(f"#bksdm_tab_{kind}").bounding_box()
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / f"{prefix}-form-{kind}.png"), full_page=True)
    assert box["height"] <= 2 * viewport_height, f"the {kind} form is {box['height']:.0f} px high"
    return box["height"]


def pick(page, elem_id: str, value: str) -> None:
    """Choose `value` in a gradio dropdown, the way a user does."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"ul.options li[data-value='{value}']").first.click()


def fill(page, kind: str, field: str, value) -> None:
    """Set one field of a kind's form the way a user does (a dropdown for a setting with choices)."""
    from bksdm_ext import kinds

    root = page.locator(f"#bksdm_{kind}_{field}")
    if isinstance(value, bool):
        box = root.locator("input[type=checkbox]")
        if box.is_checked() != value:
            box.click()
    elif kinds.get(kind).config_class().setting(field).choices:
        pick(page, f"bksdm_{kind}_{field}", value)
    else:
        root.locator("textarea, input").first.fill("\n".join(value) if isinstance(value, list) else str(value))


def check_data(page, kind: str, dataset, prefix: str = "bksdm-app") -> str:
    """Type the data folder, press Check data, see its report and the 4 thumbnails of the tiny dataset."""
    fill(page, kind, "data", str(dataset))
    page.locator(f"#bksdm_{kind}_check").click()
    report = page.locator(f"#bksdm_{kind}_check_result").first
    wait_page(lambda: "4 images with captions" in report.inner_text(), 60, "the data check", page, prefix)
    wait_page(lambda: page.locator(f"#bksdm_{kind}_thumbnails img").count() == 4, 60, "the thumbnails", page,
              prefix)
    return report.inner_text()


def open_accordions(page, kind: str) -> None:
    """Open the form's closed accordions (its advanced settings)."""
    for accordion in page.locator(f"#bksdm_tab_{kind} .label-wrap").all():
        accordion.click()


def state_of(page) -> str:
    """The state the Jobs view shows for its job."""
    try:  # the status is redrawn every 2 s: an element seen may be gone when read
        return page.locator("#bksdm_state").first.inner_text(timeout=2000)
    except Exception:
        return ""


def fraction(page) -> float:
    """The Jobs view's progress bar, 0 to 1."""
    try:
        return float(page.locator("#bksdm_progress_fill").first.get_attribute("data-fraction", timeout=2000))
    except Exception:
        return 0.0


def wait_page(predicate, timeout: float, what: str, page, prefix: str = "bksdm-app") -> None:
    """Wait for `predicate`; on a timeout keep a screenshot and say what the Jobs view showed."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{prefix}-timeout.png"), full_page=True)
            log = page.locator("#bksdm_log textarea")
            raise AssertionError(f"timed out waiting for {what}; state {state_of(page)!r}, "
                                 f"log:\n{log.input_value()[-2000:] if log.count() else ''}")
        page.wait_for_timeout(300)
