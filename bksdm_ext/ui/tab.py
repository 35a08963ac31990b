"""The BK-SDM tab: launch, watch, stop and resume jobs. The same Blocks serve the WebUI tab and `bksdm app`.

Forms are generated from the kinds' settings (`JobConfig.settings`: defaults, help, labels,
choices), the same descriptions the CLI's flags come from, so the tab never re-states a setting.
The job views refresh when `javascript/bksdm.js` clicks the hidden refresh button, only while the
tab is visible.
"""

from __future__ import annotations

import dataclasses
import html
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..errors import BKSDMError
from ..job_config import Setting
from ..kinds import Kind
from ..jobs.api import job_view
from ..jobs.guard import AccessGuard
from ..jobs.runner import Runner

JAVASCRIPT = Path(__file__).resolve().parents[2] / "javascript" / "bksdm.js"
TABLE_HEADERS = ["Job", "Kind", "State", "Progress", "Step", "ETA", "Samples/s", "Message"]
SAMPLES_SHOWN = 12


@dataclass
class TabContext:
    runner: Runner
    guard: AccessGuard
    # The WebUI adapter's words about its model while our jobs hold the GPU (VRAM hand-off).
    handoff_note: str = ("The WebUI's model is unloaded while BK-SDM jobs use the GPU; a generation brings it back for "
                         "its own duration (sharing the GPU with the job), and it is reloaded when the queue is empty.")
    # The Timings view: its store (default: timings.sqlite3 in the runner's data folder, as the WebUI
    # keeps it) and, in the WebUI, the benchmark action and the checkpoints it can run.
    timings_store: Callable[[], Path] | None = None
    benchmark: Callable | None = None
    checkpoint_choices: Callable[[], list[str]] | None = None
    # Form defaults that differ where the tab runs, by kind: e.g. in the WebUI, output_dir = its
    # models/Stable-diffusion folder, so a finished model appears in the checkpoint list.
    form_defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def timings_path(self) -> Path:
        return self.timings_store() if self.timings_store else self.runner.data_dir / "timings.sqlite3"


# --- forms from config dataclasses -------------------------------------------------------------

def form_fields(cls: type) -> list[Setting]:
    """The settings of a config class as a form shows them: its own settings first, then the shared ones.

    The same descriptions the CLI's flags come from (`JobConfig.settings`)."""
    return cls.settings()


def _component(field: Setting, kind: str) -> gr.components.Component:
    label, elem_id = field.label, f"bksdm_{kind}_{field.name}"
    if field.choices:
        return gr.Dropdown(list(field.choices), value=field.default, label=label, info=field.help, elem_id=elem_id)
    if field.type == "bool":
        return gr.Checkbox(value=bool(field.default), label=label, info=field.help, elem_id=elem_id)
    if field.type in ("int", "float"):
        return gr.Number(value=field.default, label=label, info=field.help, elem_id=elem_id,
                         precision=0 if field.type == "int" else None)
    if field.type in ("list", "tuple"):
        return gr.Textbox(value="\n".join(map(str, field.default or [])), label=label, lines=3,
                          info=f"{field.help} One per line.", elem_id=elem_id)
    return gr.Textbox(value="" if field.default is None else str(field.default), label=label, info=field.help,
                      elem_id=elem_id)


def _field_rows(fields: list[Setting], components: list, kind: str, per_row: int = 3) -> None:
    """Fields three to a row: the form stays short enough to see the launch button."""
    for start in range(0, len(fields), per_row):
        with gr.Row(equal_height=True):
            for field in fields[start:start + per_row]:
                components.append(_component(field, kind))


def form_values(fields: list[Setting], raw: list[Any]) -> dict[str, Any]:
    """The form's values as a config dict: empty numbers keep their default, lists are one item a line."""
    values: dict[str, Any] = {}
    for field, value in zip(fields, raw):
        if field.type in ("int", "float"):
            if value is None or value == "":
                continue
            value = int(value) if field.type == "int" and float(value).is_integer() else value
        elif field.type in ("list", "tuple"):
            value = [line.strip() for line in str(value or "").splitlines() if line.strip()]
        values[field.name] = value
    return values


def _message(text: str, ok: bool) -> str:
    colour = "var(--color-accent)" if ok else "#d9534f"
    return f'<div class="bksdm-message" style="border-left: 4px solid {colour}; padding: 6px 10px">{html.escape(text)}</div>'


def _guarded(action: Callable[[], str]) -> str:
    """Run a user action; any error is a message in the page, never a stack trace."""
    try:
        return _message(action(), True)
    except BKSDMError as error:
        return _message(str(error), False)
    except Exception as error:  # a bug, not a user mistake: still readable, details in the console log
        print(f"BK-SDM: unexpected error: {error!r}", file=sys.stderr)
        return _message(f"Unexpected error: {error}. The server's console has the details.", False)


def _form(context: TabContext, kind: Kind) -> None:
    try:
        fields = form_fields(kind.config_class())
    except BKSDMError as error:
        gr.Markdown(str(error))
        return
    overrides = context.form_defaults.get(kind.name, {})
    fields = [dataclasses.replace(f, default=overrides[f.name]) if f.name in overrides else f for f in fields]
    components = []
    own = [f for f in fields if f.own]
    rest = [f for f in fields if not f.own]
    _field_rows(own, components, kind.name)
    if rest:
        with gr.Accordion("Training recipe (the paper's defaults)" if kind.gpu else "More settings", open=False,
                          elem_id=f"bksdm_{kind.name}_more"):
            _field_rows(rest, components, kind.name)
    launch = gr.Button(f"Launch {kind.title.lower()} job", variant="primary", elem_id=f"bksdm_launch_{kind.name}")
    result = gr.HTML(elem_id=f"bksdm_launch_result_{kind.name}")

    def submit(*raw):
        def act():
            context.guard.check("Launching a job")
            asked = time.time()
            job = context.runner.submit(kind.name, form_values(fields, list(raw)))
            if job.created < asked - 1:
                return f"Job {job.id} was already launched with these settings ({job.state}); see the Jobs tab."
            return f"Job {job.id} is {job.state}; follow it in the Jobs tab."
        return _guarded(act)

    launch.click(submit, inputs=components, outputs=[result])


# --- the job views -----------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _fraction(view: dict) -> float:
    p = view["progress"]
    if view["state"] == "done":
        return 1.0
    return min(1.0, (p.get("step") or 0) / p["total_steps"]) if p.get("total_steps") else 0.0


def _table(views: list[dict]) -> list[list]:
    rows = []
    for v in views:
        p = v["progress"]
        rate = p.get("samples_per_s")
        rows.append([v["id"], v["kind"], v["state"], f"{_fraction(v):.0%}",
                     f"{p.get('step') or 0}/{p.get('total_steps') or '?'}",
                     _duration(p.get("eta_s")) if v["state"] == "running" else "",
                     f"{rate:.2f}" if isinstance(rate, (int, float)) else "", v["message"]])
    return rows or [[""] * len(TABLE_HEADERS)]


def _status(view: dict | None) -> str:
    if view is None:
        return '<div class="bksdm-status">Select a job in the list.</div>'
    p = view["progress"]
    fraction = _fraction(view)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in (p.get("losses") or {}).items() if isinstance(v, (int, float)))
    facts = [f"<b>{html.escape(view['id'])}</b>", f"state <b id='bksdm_state'>{view['state']}</b>",
             f"step {p.get('step') or 0} / {p.get('total_steps') or '?'}"]
    if view["state"] == "running" and p.get("eta_s") is not None:
        facts.append(f"ETA {_duration(p['eta_s'])}")
    if isinstance(p.get("samples_per_s"), (int, float)):
        facts.append(f"{p['samples_per_s']:.2f} samples/s")
    if losses:
        facts.append(f"losses: {html.escape(losses)}")
    return f"""<div class="bksdm-status">
<div>{' &middot; '.join(facts)}</div>
<div class="bksdm-progress" style="background: var(--neutral-200, #e5e7eb); border-radius: 4px; height: 14px; margin: 6px 0">
<div id="bksdm_progress_fill" data-fraction="{fraction:.4f}" style="width: {fraction * 100:.1f}%; height: 100%;
background: var(--color-accent, #f97316); border-radius: 4px"></div></div>
<div>{html.escape(view['message'])}</div>
<div style="opacity: .7">Folder: {html.escape(view['folder'])}</div></div>"""


def _loss_frame(rows: list[tuple[int, str, float]], max_points: int = 1000):
    """The chart's data: every k-th logged step, so a 50K-step run stays a light refresh."""
    import pandas as pd

    if not rows:
        return None  # the empty plot
    steps = sorted({step for step, _, _ in rows})
    kept = set(steps[::-(-len(steps) // max_points)]) | {steps[-1]}
    return pd.DataFrame([r for r in rows if r[0] in kept], columns=["step", "term", "value"])


def _open_folder(path: str) -> str:
    if not Path(path).is_dir():
        raise BKSDMError(f"{path} does not exist (yet).")
    if sys.platform == "win32":
        os.startfile(path)  # noqa: S606 - the user's own folder, in their file manager
    elif sys.platform == "darwin":
        subprocess.Popen(["open", path])
    elif os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        subprocess.Popen(["xdg-open", path])
    else:
        return f"No desktop here to open it in; the output is in {path}"
    return f"Opened {path}"


def _jobs(context: TabContext) -> None:
    runner = context.runner
    handoff = gr.HTML(elem_id="bksdm_handoff")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[[""] * len(TABLE_HEADERS)], interactive=False,
                         wrap=True, elem_id="bksdm_jobs_table")
    selected = gr.Dropdown([], label="Job", elem_id="bksdm_job_select")
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="bksdm_refresh")
        cancel = gr.Button("Cancel", elem_id="bksdm_cancel")
        resume = gr.Button("Resume", elem_id="bksdm_resume")
        relaunch = gr.Button("Re-launch", elem_id="bksdm_relaunch")
        delete = gr.Button("Delete", elem_id="bksdm_delete", variant="stop")
        open_output = gr.Button("Open output folder", elem_id="bksdm_open_output")
    with gr.Row(visible=False) as confirm_row:  # deleting loses the job's folder: ask once more
        confirm_text = gr.Markdown()
        confirm = gr.Button("Delete it", elem_id="bksdm_delete_confirm", variant="stop", scale=0, min_width=140)
        keep = gr.Button("Keep it", elem_id="bksdm_delete_keep", scale=0, min_width=140)
    action_result = gr.HTML(elem_id="bksdm_action_result")
    status = gr.HTML(_status(None), elem_id="bksdm_status")
    with gr.Row():
        with gr.Column(scale=1):
            plot = gr.LinePlot(x="step", y="value", color="term", title="Losses", tooltip=["step", "term", "value"],
                               elem_id="bksdm_loss_plot", height=260, width=420)
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Validation samples", columns=4, height=260, elem_id="bksdm_samples")
    log_tail = gr.Textbox(label="Log", lines=14, max_lines=14, interactive=False, elem_id="bksdm_log",
                          show_copy_button=True)
    done_marker = gr.Textbox(visible=False, elem_id="bksdm_done_marker")
    seen = gr.State({})  # what this browser already shows, so unchanged parts are not re-sent

    def update(job_id, shown):
        views = [job_view(runner, job) for job in runner.list()]
        ids = [v["id"] for v in views]
        if job_id not in ids:  # nothing chosen yet: the job that is running, else the newest
            active = [v["id"] for v in views if v["state"] in ("running", "cancelling")]
            job_id = (active or ids or [None])[0]
        view = next((v for v in views if v["id"] == job_id), None)
        shown = dict(shown or {})
        outputs = [
            _message(context.handoff_note, True) if runner.handoff_active else "",
            _table(views),
            gr.update(choices=ids, value=job_id) if (ids, job_id) != (shown.get("ids"), shown.get("job")) else gr.update(),
            _status(view),
            runner.log_tail(job_id) if job_id else "",
        ]
        samples = [str(p) for p in runner.samples(job_id)[-SAMPLES_SHOWN:]] if job_id else []
        losses = runner.losses(job_id) if job_id else []
        outputs.append(_loss_frame(losses) if (job_id, len(losses)) != shown.get("plot") else gr.update())
        outputs.append(samples if (job_id, samples) != shown.get("samples") else gr.update())
        outputs.append(" ".join(v["id"] for v in views if v["state"] == "done"))
        shown.update(ids=ids, job=job_id, plot=(job_id, len(losses)), samples=(job_id, samples))
        return [*outputs, shown]

    views_out = [handoff, table, selected, status, log_tail, plot, gallery, done_marker, seen]
    refresh.click(update, inputs=[selected, seen], outputs=views_out)
    selected.input(update, inputs=[selected, seen], outputs=views_out)

    def pick(evt: gr.SelectData, shown):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        jobs = runner.list()
        return update(jobs[row].id if 0 <= row < len(jobs) else None, shown)

    table.select(pick, inputs=[seen], outputs=views_out)

    def act(action: Callable[[str], str], what: str):
        def run(job_id):
            def inner():
                if not job_id:
                    raise BKSDMError("Select a job first.")
                context.guard.check(what)
                return action(job_id)
            return _guarded(inner)
        return run

    for button, action, what in (
        (cancel, lambda j: f"{j}: {runner.cancel(j).message}", "Cancelling a job"),
        (resume, lambda j: f"{j}: {runner.resume(j).message}", "Resuming a job"),
        (relaunch, lambda j: f"New job {runner.relaunch(j).id} from {j}'s config.toml.", "Launching a job"),
        (confirm, lambda j: (runner.delete(j), f"Deleted {j} and its folder.")[1], "Deleting a job"),
        (open_output, lambda j: _open_folder(str(Path(runner.get(j).folder) / "output")), "Opening a server folder"),
    ):
        button.click(act(action, what), inputs=[selected], outputs=[action_result]).then(
            update, inputs=[selected, seen], outputs=views_out)

    def ask(job_id):
        if not job_id:
            return gr.update(visible=False), "", _message("Select a job first.", False)
        return gr.update(visible=True), f"Delete **{job_id}** and everything in its folder?", ""

    delete.click(ask, inputs=[selected], outputs=[confirm_row, confirm_text, action_result])
    for button in (confirm, keep):
        button.click(lambda: gr.update(visible=False), outputs=[confirm_row])


def build_tab(context: TabContext) -> gr.Blocks:
    """The BK-SDM tab's Blocks: Distill, DreamBooth, Import/Convert, Jobs and Timings."""
    with gr.Blocks(analytics_enabled=False, title="BK-SDM") as tab:
        if not context.guard.allowed:
            gr.HTML(_message(f"Jobs are disabled on this server: {context.guard.exposure}. Start it on "
                             "127.0.0.1, or with --enable-insecure-extension-access.", False))
        with gr.Tabs(elem_id="bksdm_tabs"):
            for kind in context.runner.kinds.values():
                with gr.Tab(kind.title, elem_id=f"bksdm_tab_{kind.name}"):
                    _form(context, kind)
            with gr.Tab("Jobs", elem_id="bksdm_tab_jobs"):
                _jobs(context)
            try:
                from .timings_view import build_timings_view
            except ImportError:
                build_timings_view = None
            if build_timings_view is not None:
                with gr.Tab("Timings", elem_id="bksdm_tab_timings"):
                    build_timings_view(context.timings_path, context.benchmark, context.checkpoint_choices)
    return tab
