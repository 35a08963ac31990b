"""`bksdm app`: the BK-SDM tab and the jobs API as a standalone server, without the WebUI."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from ..jobs.api import jobs_router
from ..jobs.guard import AccessGuard
from ..jobs.origin import OriginPolicy, install_same_origin
from ..jobs.runner import Runner
from .tab import JAVASCRIPT, TabContext, build_tab

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def default_data_dir() -> Path:
    """$BKSDM_DATA_DIR, else ~/.bksdm: where the command line keeps its timings too."""
    return Path(os.environ.get("BKSDM_DATA_DIR") or Path.home() / ".bksdm")


def shown_images(page: gr.Blocks):
    """gradio's /file= rule for this app: only the copies of images the page showed (the gallery's samples).

    gradio itself would serve any file under the working directory, so job configs, logs and the
    job store too.
    """
    def allowed(path: str) -> bool:
        wanted = os.path.realpath(path)
        return wanted.lower().endswith(IMAGE_SUFFIXES) and any(
            wanted == os.path.realpath(shown) for shown in set().union(*page.temp_file_sets))
    return allowed


def create_app(runner: Runner, guard: AccessGuard, origin: OriginPolicy | None = None) -> FastAPI:
    """FastAPI app serving the jobs API at /bksdm/v1 and the tab at /, to its own pages only."""
    origin = origin or OriginPolicy(bound_host=guard.bound_host)
    tab = build_tab(TabContext(runner, guard, origin=origin))  # built outside `page`, as the WebUI builds its tabs
    with gr.Blocks(analytics_enabled=False, title="BK-SDM") as page:
        gr.Markdown("## BK-SDM")
        tab.render()
        # The WebUI injects javascript/*.js itself; here the same file runs from a load event.
        page.load(None, None, None, _js=f"() => {{ {JAVASCRIPT.read_text(encoding='utf-8')} }}")
    page.queue(64)  # as the WebUI runs it: events arrive over the WebSocket /queue/join
    app = FastAPI(title="BK-SDM")
    app.include_router(jobs_router(runner, guard, origin))
    app = gr.mount_gradio_app(app, page, path="/")
    for route in app.routes:  # gradio answers every origin with `access-control-allow-origin: *`
        if isinstance(route, Mount):
            route.app.user_middleware = [m for m in route.app.user_middleware if m.cls is not CORSMiddleware]
    install_same_origin(app, origin, file_allowed=shown_images(page))
    return app
