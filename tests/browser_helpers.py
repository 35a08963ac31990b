"""A real browser for the tests: headless Debian chromium driven by Playwright's driver (no browser download).

`from browser_helpers import browser` makes the `browser` fixture available in a test module; it skips,
saying what to install, without chromium or the playwright package. Screenshots go to ARTIFACTS.
"""

from __future__ import annotations

import os
import shutil
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
