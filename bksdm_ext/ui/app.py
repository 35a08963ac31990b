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


def models_folder(runner: Runner) -> Path:
    """Where `bksdm app` looks for checkpoints besides the finished jobs: <data folder>/models."""
    return runner.data_dir / "models"


def known_checkpoints(runner: Runner, refresh: bool = False) -> dict[str, str]:
    """The models the app's pickers offer, title -> path: single files and diffusers folders in
    <data folder>/models, then each finished job's output/ (its single file and diffusers copy)."""
    found: dict[str, str] = {}

    def add(prefix: str, folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for p in entries:
            if (p.is_file() and p.suffix == ".safetensors") or (p.is_dir() and (p / "model_index.json").is_file()):
                found[f"{prefix}{p.name}"] = str(p)

    add("models/", models_folder(runner))
    for job in runner.list():
        if job.state == "done":
            add(f"{job.id}/", Path(job.folder) / "output")
    return found


def model_rows(runner: Runner) -> list[dict]:
    """The Models view in the app: the BK single files among the known checkpoints, with their timings."""
    from ..timings.store import TimingStore
    from ..webui.models_view import models_view

    listed = [(title, path) for title, path in known_checkpoints(runner).items() if path.endswith(".safetensors")]
    store_path = runner.data_dir / "timings.sqlite3"
    records = []
    if store_path.is_file():
        store = TimingStore(store_path)
        try:
            records = store.records()
        finally:
            store.close()
    return [row.as_dict() for row in models_view(listed, records)]


def create_app(runner: Runner, guard: AccessGuard, origin: OriginPolicy | None = None) -> FastAPI:
    """FastAPI app serving the jobs API at /bksdm/v1 and the tab at /, to its own pages only."""
    origin = origin or OriginPolicy(bound_host=guard.bound_host)
    context = TabContext(runner, guard, origin=origin,
                         checkpoints=lambda refresh=False: known_checkpoints(runner, refresh),
                         models_rows=lambda: model_rows(runner))
    tab = build_tab(context)  # built outside `page`, as the WebUI builds its tabs
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
