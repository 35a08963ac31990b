"""`bksdm app`: the BK-SDM tab and the jobs API as a standalone server, without the WebUI."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from ..jobs.api import jobs_router
from ..jobs.guard import AccessGuard
from ..jobs.runner import Runner
from .tab import JAVASCRIPT, TabContext, build_tab


def default_data_dir() -> Path:
    """$BKSDM_DATA_DIR, else ~/.bksdm: where the command line keeps its timings too."""
    return Path(os.environ.get("BKSDM_DATA_DIR") or Path.home() / ".bksdm")


def create_app(runner: Runner, guard: AccessGuard) -> FastAPI:
    """FastAPI app serving the jobs API at /bksdm/v1 and the tab at /."""
    tab = build_tab(TabContext(runner, guard))  # built outside `page`, as the WebUI builds its tabs
    with gr.Blocks(analytics_enabled=False, title="BK-SDM") as page:
        gr.Markdown("## BK-SDM")
        tab.render()
        # The WebUI injects javascript/*.js itself; here the same file runs from a load event.
        page.load(None, None, None, _js=f"() => {{ {JAVASCRIPT.read_text(encoding='utf-8')} }}")
    app = FastAPI(title="BK-SDM")
    app.include_router(jobs_router(runner, guard))
    return gr.mount_gradio_app(app, page, path="/")
