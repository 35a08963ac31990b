"""The BK-SDM tab: launch, watch, stop and resume jobs. The same Blocks serve the WebUI tab and `bksdm app`.

Forms are generated from the kinds' settings (`JobConfig.settings`: defaults, help, labels,
choices), the same descriptions the CLI's flags come from, so the tab never re-states a setting.
The job views refresh when `javascript/bksdm.js` clicks the hidden refresh button, only while the
tab is visible.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..errors import BKSDMError
from ..job_config import GROUPS, Setting
from ..kinds import Kind
from ..job import JobFolder, Outputs
from ..job_config import read_toml
from ..jobs.api import job_view
from ..jobs.store import ACTIVE_STATES
from ..jobs.guard import AccessGuard
from ..jobs.origin import OriginPolicy, request_parts
from ..jobs.runner import Runner
from .data_check import data_setting

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
    # The Output folder of a job while it makes a LoRA file (`lora_switch`), in place of form_defaults'
    # output_dir: in the WebUI its models/Lora, where its Lora extension finds the file ("" = no such folder).
    lora_output_dir: str = ""
    # Which pages may press the buttons: the server's own (its Host and Origin; see jobs/origin.py).
    origin: OriginPolicy = dataclasses.field(default_factory=OriginPolicy)

    def check(self, request: gr.Request | None, action: str) -> None:
        """Refuse `action` on a server others can reach, or for a page this server did not serve.

        Every state-changing handler calls this first: through gradio's queue the events arrive over a
        WebSocket that gradio accepts from any page, and `request` holds that socket's own headers.
        """
        self.guard.check(action)
        self.check_origin(request, action)

    def check_origin(self, request: gr.Request | None, action: str) -> None:
        self.origin.check(*request_parts(request), action)

    def check_read(self, request: gr.Request | None) -> None:
        """Reads need no access guard, but only our own page may see them: a foreign page reads every
        answer it gets over gradio's WebSocket (no CORS there). Refused: an error, not the data."""
        try:
            self.check_origin(request, "Showing the jobs")
        except BKSDMError as error:
            raise gr.Error(str(error)) from None

    # The checkpoints the model pickers offer, title -> file (the WebUI's list; in `bksdm app`, the models
    # folders it knows); `refresh=True` re-reads them.
    checkpoints: Callable[..., dict[str, str]] | None = None
    # "Use in txt2img": the WebUI title of a job's checkpoint file, which the page then selects; None where
    # there is no txt2img (`bksdm app`).
    use_checkpoint: Callable[[Path], str] | None = None
    # The checkpoint file selected in the WebUI's dropdown (None when none is); None in `bksdm app`. A kind
    # whose config names a `current_checkpoint_setting` gets a button that launches it on that file.
    current_checkpoint: Callable[[], str | None] | None = None
    # The Models view's rows (webui.models_view.ModelRow.as_dict()), None to leave the view out.
    models_rows: Callable[[], list[dict]] | None = None
    # The names of the WebUI's samplers (`modules.sd_samplers.all_samplers`), to say when a few-step model's
    # sampler is missing (LCM: WebUI 1.8+); None where there is no txt2img (`bksdm app`).
    samplers: Callable[[], list[str]] | None = None

    def model_sources(self, refresh: bool = False) -> dict[str, str]:
        if self.checkpoints is None:
            return {}
        try:
            return dict(self.checkpoints(refresh=refresh))
        except BKSDMError:
            return {}

    def launch_sources(self, refresh: bool = False) -> dict[str, str]:
        """What a launched form's model titles stand for: the checkpoint list and the training jobs (`job_models`)."""
        return {**self.model_sources(refresh), **job_models(self.runner)}

    def timings_path(self) -> Path:
        return self.timings_store() if self.timings_store else self.runner.data_dir / "timings.sqlite3"


# --- forms from config dataclasses -------------------------------------------------------------

def form_fields(cls: type) -> list[Setting]:
    """The settings of a config class as a form shows them: its own settings first, then the shared ones.

    The same descriptions the CLI's flags come from (`JobConfig.settings`)."""
    return cls.settings()


def form_groups(fields: list[Setting]) -> list[tuple[str, list[Setting], list[Setting]]]:
    """(group, its everyday settings, its advanced ones) in GROUPS order, empty groups left out."""
    out = []
    for group in GROUPS:
        members = [f for f in fields if f.group == group]
        if members:
            out.append((group, [f for f in members if not f.advanced], [f for f in members if f.advanced]))
    return out


def _component(field: Setting, kind: str, context: "TabContext") -> gr.components.Component:
    label, elem_id = field.label, f"bksdm_{kind}_{field.name}"
    if field.kind == "model" and field.type in ("list", "tuple"):  # several models, in order: `_models_picker`
        return gr.Textbox(value="\n".join(map(str, field.default or [])), label=label, lines=3, max_lines=10,
                          info=f"{field.help} One a line, the first line is the teacher. Add them from the list "
                               "below, or type paths on the server.", elem_id=elem_id)
    if field.kind == "model":
        choices = list(context.model_sources())
        return gr.Dropdown(choices, value=field.default or None, label=label, allow_custom_value=True,
                           info=f"{field.help} Pick one from the list, or type a path on the server.",
                           elem_id=elem_id)
    if field.choices:
        return gr.Dropdown(list(field.choices), value=field.default, label=label, info=field.help, elem_id=elem_id,
                           allow_custom_value=field.custom)
    if field.type == "bool":
        return gr.Checkbox(value=bool(field.default), label=label, info=field.help, elem_id=elem_id)
    if field.type in ("int", "float") and field.default is None:  # empty means the default: a Number shows 0
        return gr.Textbox(value="", label=label, info=field.help, elem_id=elem_id, placeholder="empty = automatic")
    if field.type in ("int", "float"):
        return gr.Number(value=field.default, label=label, info=field.help, elem_id=elem_id,
                         precision=0 if field.type == "int" else None)
    if field.type in ("list", "tuple"):
        return gr.Textbox(value="\n".join(map(str, field.default or [])), label=label, lines=2, max_lines=3,
                          info=f"{field.help} One per line.", elem_id=elem_id)
    return gr.Textbox(value="" if field.default is None else str(field.default), label=label, info=field.help,
                      elem_id=elem_id)


def as_form_value(field: Setting, value: Any) -> Any:
    """A config value as its form component holds it (lists one item a line)."""
    if field.type in ("list", "tuple"):
        return "\n".join(map(str, value or []))
    return "" if value is None and field.type == "str" else value


def list_folders(path: str) -> tuple[str, list[str]]:
    """The folder a picker shows for `path` (itself if a folder, else its nearest existing parent, else the
    home folder) and its sub-folders, hidden ones left out."""
    here = Path(path).expanduser() if path else Path.home()
    while not here.is_dir() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        here = Path.home()
    here = here.resolve()
    try:
        subs = sorted(p.name for p in here.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise BKSDMError(f"Cannot list {here}: {error.strerror}.") from None
    return str(here), ([UP] if here != here.parent else []) + subs[:500]


UP = ".. (up one folder)"


def _folder_picker(context: "TabContext", box: gr.Textbox, field: Setting, kind: str) -> None:
    """A Browse button under a folder setting: lists the server's folders (guarded as a launch is)."""
    browse = gr.Button("Browse server folders", size="sm", elem_id=f"bksdm_{kind}_{field.name}_browse")
    listing = gr.Dropdown([], label=f"Folders in", visible=False, elem_id=f"bksdm_{kind}_{field.name}_folders")
    note = gr.HTML(visible=False)

    def show(path, request: gr.Request):
        try:
            context.check(request, "Listing server folders")
            here, subs = list_folders(path)
        except BKSDMError as error:
            return gr.update(), gr.update(visible=False), gr.update(visible=True, value=_message(str(error), False))
        return (here, gr.update(visible=True, choices=subs, value=None, label=f"Folders in {here}"),
                gr.update(visible=False))

    def enter(path, name, request: gr.Request):
        if not name:
            return gr.update(), gr.update(), gr.update()
        target = str(Path(path).parent if name == UP else Path(path) / name)
        return show(target, request)

    browse.click(show, inputs=[box], outputs=[box, listing, note])
    listing.input(enter, inputs=[box, listing], outputs=[box, listing, note])


def form_values(fields: list[Setting], raw: list[Any], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The form's values as a config dict: empty numbers keep their default, lists are one item a line, a
    model picked from the list is its file."""
    values: dict[str, Any] = {}
    for field, value in zip(fields, raw):
        if field.type in ("int", "float"):
            if value is None or str(value).strip() == "":
                continue
            if isinstance(value, str):  # an optional number's text box; from_dict says if it is no number
                value = value.strip()
            elif field.type == "int" and float(value).is_integer():
                value = int(value)
        elif field.type in ("list", "tuple"):
            value = [line.strip() for line in str(value or "").splitlines() if line.strip()]
            if field.kind == "model":
                value = [(sources or {}).get(line, line) for line in value]
        elif field.kind == "model":
            value = (sources or {}).get(value, value) or ""
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


@dataclass
class Form:
    """What build_tab wires after the forms: the launch event and the id of the job it made."""
    launched: Any
    job_id: gr.Textbox


def _presets(context: TabContext, kind: Kind, cls: type, fields: list[Setting], components: list) -> None:
    """The preset row: a choice sets the recipe; the current recipe can be saved under a name."""
    from . import presets

    titles = [p.title for p in presets.builtin(kind.name)]
    with gr.Row(equal_height=True):
        choice = gr.Dropdown(titles + presets.user_presets(context.runner.data_dir, kind.name), value=None,
                             label="Preset", info="Sets the recipe in one choice; the other settings stay.",
                             elem_id=f"bksdm_{kind.name}_preset", scale=2)
        name = gr.Textbox(label="Save the recipe as", placeholder="my recipe", elem_id=f"bksdm_{kind.name}_preset_name",
                          scale=2)
        save = gr.Button("Save preset", elem_id=f"bksdm_{kind.name}_preset_save", scale=1, size="sm")
    about = gr.HTML(elem_id=f"bksdm_{kind.name}_preset_help")
    by_name = {f.name: i for i, f in enumerate(fields)}

    def apply(title):
        keep = [gr.update()] * len(fields)
        try:
            preset = presets.find(kind.name, title, context.runner.data_dir)
            if preset is None:
                return [_message(f"No preset {title!r}.", False), *keep]
            values, notes = presets.preset_values(cls, preset)
        except BKSDMError as error:
            return [_message(str(error), False), *keep]
        out = list(keep)
        for setting_name, value in values.items():
            out[by_name[setting_name]] = as_form_value(fields[by_name[setting_name]], value)
        shown = {fields[by_name[n]].label: v for n, v in values.items()}
        text = f"{preset.title}: {preset.help} " + " ".join(notes) + " Set: " + ", ".join(
            f"{label} {value}" for label, value in shown.items() if not isinstance(value, list)) + "."
        return [_message(text, True), *out]

    choice.input(apply, inputs=[choice], outputs=[about, *components])

    def store(preset_name, request: gr.Request, *raw):
        def act():
            context.check(request, "Saving a preset")
            path = presets.save_user(context.runner.data_dir, cls, preset_name,
                                     form_values(fields, list(raw), context.launch_sources()))
            return f"Saved the recipe as {presets.check_name(preset_name)!r} ({path})."
        message = _guarded(act)
        return message, gr.update(choices=titles + presets.user_presets(context.runner.data_dir, kind.name))

    save.click(store, inputs=[name, *components], outputs=[about, choice])


def _form(context: TabContext, kind: Kind) -> Form | None:
    try:
        cls = kind.config_class()
        fields = form_fields(cls)
    except BKSDMError as error:
        gr.Markdown(str(error))
        return None
    overrides = dict(context.form_defaults.get(kind.name, {}))
    switch = lora_switch(fields)
    checkpoint_folder = overrides.get("output_dir", "")
    if switch is not None and context.lora_output_dir and switch.default == "lora":
        overrides["output_dir"] = context.lora_output_dir
    fields = [dataclasses.replace(f, default=overrides[f.name]) if f.name in overrides else f for f in fields]
    components: dict[str, Any] = {}
    preset_row = gr.Column() if any(f.name == "max_steps" for f in fields) else None  # training kinds
    data_name = data_setting(fields)
    check_out: list = []
    for group, everyday, advanced in form_groups(fields):
        with gr.Group(elem_id=f"bksdm_{kind.name}_group_{group.split()[0].lower()}"):
            if everyday:  # a group of advanced settings only is its accordion alone
                gr.HTML(f"<div class='bksdm-group' style='padding: 4px 10px; font-weight: 600'>{html.escape(group)}</div>")
            _rows(context, everyday, components, kind.name)
            if data_name and group == "Data":
                with gr.Row():
                    check = gr.Button("Check data", elem_id=f"bksdm_{kind.name}_check", size="sm", scale=0,
                                      min_width=140)
                    report = gr.HTML(elem_id=f"bksdm_{kind.name}_check_result")
                thumbs = gr.Gallery(visible=False, columns=4, height=160, object_fit="cover", show_label=False,
                                    elem_id=f"bksdm_{kind.name}_thumbnails")
                check_out = [check, report, thumbs]
            if advanced:
                with gr.Accordion(f"More {group.lower()} settings" if everyday else group, open=False,
                                  elem_id=f"bksdm_{kind.name}_more_{group.split()[0].lower()}"):
                    _rows(context, advanced, components, kind.name)
    ordered = [components[f.name] for f in fields]
    if switch is not None and context.lora_output_dir and "output_dir" in components:
        _output_follows_mode(components[switch.name], components["output_dir"], checkpoint_folder,
                             context.lora_output_dir)
    if preset_row is not None:
        with preset_row:
            _presets(context, kind, cls, fields, ordered)
    current_setting = getattr(cls, "current_checkpoint_setting", None)
    with gr.Row():
        launch = gr.Button(f"Launch {kind.title.lower()} job", variant="primary", elem_id=f"bksdm_launch_{kind.name}")
        on_current = None
        if current_setting and context.current_checkpoint is not None:
            on_current = gr.Button(f"{kind.title} the checkpoint selected in the WebUI",
                                   elem_id=f"bksdm_{kind.name}_current")
    result = gr.HTML(elem_id=f"bksdm_launch_result_{kind.name}")
    job_id = gr.Textbox(visible=False, elem_id=f"bksdm_launched_{kind.name}")

    def data_report(values: dict) -> tuple[str, list]:
        from .data_check import check_data

        report = check_data(fields, values)
        return report.text, report.thumbnails

    if check_out:
        check, report, thumbs = check_out

        def check_click(request: gr.Request, *raw):
            try:
                context.check(request, "Reading a server folder")
                text, images = data_report(form_values(fields, list(raw), context.launch_sources()))
            except BKSDMError as error:
                return _message(str(error), False), gr.update(visible=False, value=None)
            return _message(text, True), gr.update(visible=bool(images), value=images)

        check.click(check_click, inputs=ordered, outputs=[report, thumbs])

    def launch_job(values: dict, made: list) -> str:
        data = data_report(values)[0] + " " if data_name else ""
        asked = time.time()
        job = context.runner.submit(kind.name, values)
        made[0] = job.id
        if job.created < asked - 1:
            return f"Job {job.id} was already launched with these settings ({job.state}); see the Jobs tab."
        return f"{data}Job {job.id} is {job.state}; follow it in the Jobs tab."

    def submit(request: gr.Request, *raw):
        made = [""]

        def act():
            context.check(request, "Launching a job")
            return launch_job(form_values(fields, list(raw), context.launch_sources()), made)
        message = _guarded(act)
        return message, made[0]

    launched = launch.click(submit, inputs=ordered, outputs=[result, job_id])
    if on_current is not None:
        source_box = components[current_setting]

        def submit_current(request: gr.Request, *raw):
            made, shown = [""], [gr.update()]

            def act():
                context.check(request, "Launching a job")
                current = context.current_checkpoint()
                if not current:
                    raise BKSDMError("No checkpoint is selected in the WebUI: pick one in its checkpoint list "
                                     "first, or choose the model in this form and launch.")
                sources = context.model_sources()
                values = form_values(fields, list(raw), context.launch_sources())
                values[current_setting] = str(current)
                # the form then names what was launched: the list's title for that file
                shown[0] = next((t for t, f in sources.items() if Path(f) == Path(current)), str(current))
                return launch_job(values, made)
            message = _guarded(act)
            return message, made[0], shown[0]

        on_current.click(submit_current, inputs=ordered, outputs=[result, job_id, source_box])
    return Form(launched, job_id)


def lora_switch(fields: list[Setting]) -> Setting | None:
    """The setting whose value "lora" makes a kind's finished model a LoRA file (DreamBooth's and lcm's
    `mode`), None for kinds that always make checkpoints."""
    return next((f for f in fields if f.name == "mode" and "lora" in (f.choices or ())), None)


def _output_follows_mode(mode, folder, checkpoint_folder: str, lora_folder: str) -> None:
    """A LoRA goes to the LoRA folder, a checkpoint to the checkpoint folder: switching the mode moves the
    Output folder between the two defaults; a folder the user typed stays."""
    def follow(chosen, current):
        if (current or "") not in (checkpoint_folder, lora_folder):
            return gr.update()
        return lora_folder if chosen == "lora" else checkpoint_folder

    mode.change(follow, inputs=[mode, folder], outputs=[folder])


def _rows(context: TabContext, fields: list[Setting], components: dict, kind: str, per_row: int = 4) -> None:
    """Fields four to a row: with its accordions closed a form stays within two screens."""
    for start in range(0, len(fields), per_row):
        with gr.Row(equal_height=False):
            for field in fields[start:start + per_row]:
                if field.kind in ("model", "folder"):
                    with gr.Column(min_width=200):
                        components[field.name] = box = _component(field, kind, context)
                        if field.kind == "folder":
                            _folder_picker(context, box, field, kind)
                        elif field.type in ("list", "tuple"):
                            _models_picker(context, box, kind, field)
                        else:
                            _model_refresh(context, box, kind, field)
                else:
                    components[field.name] = _component(field, kind, context)


def _model_refresh(context: TabContext, box, kind: str, field: Setting) -> None:
    refresh = gr.Button("Refresh the list", size="sm", elem_id=f"bksdm_{kind}_{field.name}_refresh")

    def again(request: gr.Request):
        context.check_read(request)
        return gr.update(choices=list(context.model_sources(refresh=True)))

    refresh.click(again, outputs=[box])


def job_models(runner: Runner) -> dict[str, str]:
    """The training jobs a model picker of several models offers, title -> path: a job with complete
    checkpoints (its folder: each of them; and each one alone) and a job's finished diffusers model."""
    from ..evaluate.sources import model_setting

    out: dict[str, str] = {}
    for job in runner.list():
        if not model_setting(job.kind):
            continue
        folder = JobFolder(job.folder)
        checkpoints = folder.complete_checkpoints()
        if checkpoints:
            out[f"job {job.id}: each checkpoint"] = str(folder.root)
            out.update((f"job {job.id}: {c.name}", str(c)) for c in checkpoints)
        if job.state == "done" and folder.output.is_dir():
            out.update((f"job {job.id}: output {p.parent.parent.name}", str(p.parent.parent))
                       for p in sorted(folder.output.glob("*/unet/config.json")))
    return out


def pick_models(text: str, picked: list[str], before: list[str]) -> str:
    """The models box after the picker changed from `before` to `picked`: titles picked now are added as lines
    (in the order picked), titles unpicked are removed, typed lines stay where they are."""
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    removed = set(before or []) - set(picked or [])
    lines = [line for line in lines if line.strip() not in removed]
    lines += [title for title in picked or [] if title not in {line.strip() for line in lines}]
    return "\n".join(lines)


def _models_picker(context: TabContext, box: gr.Textbox, kind: str, field: Setting) -> None:
    """Under a box of several models: the checkpoint list (and the training jobs) to add from, several at once,
    with its refresh; the box keeps their order and any typed path."""
    picker = gr.Dropdown(list(context.launch_sources()), value=[], multiselect=True, label="Add from the checkpoint list and the jobs",
                         info="A training job stands for each of its checkpoints, or pick one checkpoint.",
                         elem_id=f"bksdm_{kind}_{field.name}_pick")
    before = gr.State([])
    refresh = gr.Button("Refresh the list", size="sm", elem_id=f"bksdm_{kind}_{field.name}_refresh")

    def picked(text, chosen, previous):
        return pick_models(text, chosen, previous), list(chosen or [])

    def again(request: gr.Request):
        context.check_read(request)
        return gr.update(choices=list(context.launch_sources(refresh=True)))

    picker.input(picked, inputs=[box, picker, before], outputs=[box, before])
    refresh.click(again, outputs=[picker])


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


def sample_gallery(paths: list[Path], prompts: list[str], shown: int = SAMPLES_SHOWN) -> list[tuple[str, str]]:
    """The gallery's images with captions: the newest step's samples first, each beside the teacher's image
    of the same prompt (`teacher-i.png`, rendered once per job), then earlier steps; `step-NNNNNN-i.png`."""
    teacher: dict[int, Path] = {}
    steps: dict[int, dict[int, Path]] = {}
    for path in paths:
        match = re.fullmatch(r"(?:teacher|step-(\d+))-(\d+)", path.stem)
        if not match:
            continue
        index = int(match.group(2))
        if match.group(1) is None:
            teacher[index] = path
        else:
            steps.setdefault(int(match.group(1)), {})[index] = path
    prompt = lambda i: prompts[i] if i < len(prompts) else f"prompt {i + 1}"  # noqa: E731
    out: list[tuple[str, str]] = []
    for step in sorted(steps, reverse=True):
        for index in sorted(steps[step]):
            if index in teacher:
                out.append((str(teacher[index]), f"teacher: {prompt(index)}"))
            out.append((str(steps[step][index]), f"step {step}: {prompt(index)}"))
        if len(out) >= shown:
            break
    if not steps:  # only the teacher's images so far
        out = [(str(teacher[i]), f"teacher: {prompt(i)}") for i in sorted(teacher)]
    return out[:shown]


def _prompts(runner: Runner, job_id: str) -> list[str]:
    try:
        return [str(p) for p in read_toml(JobFolder(runner.get(job_id).folder).config).get("sample_prompts", [])]
    except BKSDMError:
        return []


def job_checkpoint(runner: Runner, job_id: str) -> Path | None:
    """The single-file checkpoint a finished job wrote (from its outputs.json), if it is still there."""
    job = runner.get(job_id)
    if job.state != "done":
        return None
    files = sorted(Path(p) for p in Outputs(job.folder).owned() if p.endswith(".safetensors"))
    return next((p for p in files if p.is_file()), None)


def _html_table(header: list[str], rows: list[list[str]], elem_id: str = "") -> str:
    cells = lambda tag, row: "".join(f"<{tag} style='padding: 2px 8px; text-align: left'>{html.escape(str(c))}</{tag}>"  # noqa: E731
                                     for c in row)
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return (f"<table{f' id={elem_id!r}' if elem_id else ''} style='border-collapse: collapse; margin: 4px 0'>"
            f"<thead><tr>{cells('th', header)}</tr></thead><tbody>{body}</tbody></table>")


@dataclass
class EvaluationView:
    """What the Jobs view shows of a finished evaluation, all from its results.json (`evaluate.results`)."""
    table: str  # HTML: N and the protocol, model x metric, the paper's numbers labelled as the paper's
    grid: str | None  # grid.png: the same prompts, teacher | students
    csv: str | None  # results.csv
    history: str  # HTML: every evaluated model of every evaluation in the runner's jobs folder


def evaluation_view(folder: str | os.PathLike, history_roots: list) -> EvaluationView | None:
    """The results of the evaluate job in `folder`; None before it has any."""
    from ..evaluate import results

    table = results.load(folder)
    if table is None:
        return None
    header, rows = results.model_table(table)
    note, paper_header, paper = results.paper_table()
    lines = "".join(f"<div>{html.escape(line)}</div>" for line in results.protocol_lines(table))
    shown = (f"<div class='bksdm-evaluation'>{lines}{_html_table(header, rows, 'bksdm_evaluation_models')}"
             f"<div style='opacity: .75; margin-top: 8px'>{html.escape(note)}</div>"
             f"{_html_table(paper_header, paper, 'bksdm_evaluation_paper')}</div>")
    history = results.history(history_roots)
    history_header, history_rows = results.history_table(history)
    past = (f"<div><b>History of evaluations</b> ({len(history)} models; <code>bksdm evaluations</code> prints the "
            f"same)</div>{_html_table(history_header, history_rows, 'bksdm_evaluation_history_table')}")
    grid, csv_file = Path(folder) / "grid.png", Path(folder) / "results.csv"
    return EvaluationView(shown, str(grid) if grid.is_file() else None, str(csv_file) if csv_file.is_file() else None,
                          past)


def buttons_for(view: dict | None, can_use: bool) -> dict[str, bool]:
    """Which job buttons are active for the selected job's state."""
    state = view["state"] if view else None
    return {"stop": state in ("queued", "running"),
            "resume": bool(view) and state in ("cancelled", "failed", "interrupted") and bool(view["resumable"]),
            "relaunch": bool(view), "delete": bool(view) and state not in ACTIVE_STATES,
            "open": bool(view), "use": can_use and state == "done"}


def _jobs(context: TabContext):
    runner = context.runner
    handoff = gr.HTML(elem_id="bksdm_handoff")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[[""] * len(TABLE_HEADERS)], interactive=False,
                         wrap=True, elem_id="bksdm_jobs_table")
    selected = gr.Dropdown([], label="Job", elem_id="bksdm_job_select")
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="bksdm_refresh")
        cancel = gr.Button("Cancel", elem_id="bksdm_cancel", interactive=False)
        resume = gr.Button("Resume", elem_id="bksdm_resume", interactive=False)
        relaunch = gr.Button("Re-launch", elem_id="bksdm_relaunch", interactive=False)
        delete = gr.Button("Delete", elem_id="bksdm_delete", variant="stop", interactive=False)
        open_output = gr.Button("Open output folder", elem_id="bksdm_open_output", interactive=False)
        use = gr.Button("Use in txt2img", elem_id="bksdm_use", variant="primary", interactive=False,
                        visible=context.use_checkpoint is not None)
    with gr.Row(visible=False) as confirm_row:  # deleting loses the job's folder: ask once more
        confirm_text = gr.Markdown()
        confirm = gr.Button("Delete it", elem_id="bksdm_delete_confirm", variant="stop", scale=0, min_width=140)
        keep = gr.Button("Keep it", elem_id="bksdm_delete_keep", scale=0, min_width=140)
    action_result = gr.HTML(elem_id="bksdm_action_result")
    use_title = gr.Textbox(visible=False, elem_id="bksdm_use_title")
    status = gr.HTML(_status(None), elem_id="bksdm_status")
    with gr.Row():
        with gr.Column(scale=1):
            plot = gr.LinePlot(x="step", y="value", color="term", title="Losses", tooltip=["step", "term", "value"],
                               elem_id="bksdm_loss_plot", height=260, width=420)
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Validation samples: the teacher's image, then the student's", columns=4,
                                 object_fit="contain", elem_id="bksdm_samples")
    with gr.Column(visible=False, elem_id="bksdm_evaluation") as evaluation_box:  # a finished evaluate job
        evaluation_table = gr.HTML(elem_id="bksdm_evaluation_table")
        with gr.Row():
            evaluation_grid = gr.Image(label="The same prompts: teacher | students", type="filepath",
                                       interactive=False, height=360, elem_id="bksdm_evaluation_grid")
            with gr.Column():
                evaluation_csv = gr.File(label="Download results.csv", interactive=False,
                                         elem_id="bksdm_evaluation_csv")
                evaluation_history = gr.HTML(elem_id="bksdm_evaluation_history")
    log_tail = gr.Textbox(label="Log", lines=14, max_lines=14, interactive=False, elem_id="bksdm_log",
                          show_copy_button=True)
    done_marker = gr.Textbox(visible=False, elem_id="bksdm_done_marker")
    seen = gr.State({})  # what this browser already shows, so unchanged parts are not re-sent
    buttons = {"stop": cancel, "resume": resume, "relaunch": relaunch, "delete": delete, "open": open_output,
               "use": use}

    def update(job_id, shown, request: gr.Request = None):
        context.check_read(request)
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
            _status(view) + _recommended_note(context, view),
            runner.log_tail(job_id) if job_id else "",
        ]
        samples = sample_gallery(runner.samples(job_id), _prompts(runner, job_id)) if job_id else []
        losses = runner.losses(job_id) if job_id else []
        outputs.append(_loss_frame(losses) if (job_id, len(losses)) != shown.get("plot") else gr.update())
        outputs.append(samples if (job_id, samples) != shown.get("samples") else gr.update())
        outputs.append(" ".join(v["id"] for v in views if v["state"] == "done"))
        active = buttons_for(view, context.use_checkpoint is not None)
        outputs += [gr.update(interactive=active[name]) for name in buttons]
        evaluation = _evaluation_key(view)
        if evaluation == shown.get("evaluation"):
            outputs += [gr.update()] * 5
        else:
            result = evaluation_view(view["folder"], [runner.jobs_dir]) if evaluation else None
            outputs += [gr.update(visible=True), result.table, result.grid, result.csv, result.history] if result \
                else [gr.update(visible=False), "", None, None, ""]
        shown.update(ids=ids, job=job_id, plot=(job_id, len(losses)), samples=(job_id, samples), evaluation=evaluation)
        return [*outputs, shown]

    views_out = [handoff, table, selected, status, log_tail, plot, gallery, done_marker, *buttons.values(),
                 evaluation_box, evaluation_table, evaluation_grid, evaluation_csv, evaluation_history, seen]
    refresh.click(update, inputs=[selected, seen], outputs=views_out)
    selected.input(update, inputs=[selected, seen], outputs=views_out)

    def pick(evt: gr.SelectData, shown, request: gr.Request):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        jobs = runner.list()
        return update(jobs[row].id if 0 <= row < len(jobs) else None, shown, request)

    table.select(pick, inputs=[seen], outputs=views_out)

    def act(action: Callable[[str], str], what: str):
        def run(job_id, request: gr.Request):
            def inner():
                context.check(request, what)
                if not job_id:
                    raise BKSDMError("Select a job first.")
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

    def use_click(job_id, request: gr.Request):
        plan = [""]

        def inner():
            context.check(request, "Selecting a checkpoint")
            use = txt2img_use(context, job_id)
            plan[0] = json.dumps(use)
            return use["message"]
        return _guarded(inner), plan[0]

    # the page selects the checkpoint as the user's own pick, through the WebUI's selectCheckpoint
    # (javascript/ui.js), and sets txt2img's sampler, steps and CFG (bksdmUseInTxt2img, javascript/bksdm.js)
    use.click(use_click, inputs=[selected], outputs=[action_result, use_title]).then(
        None, inputs=[use_title], outputs=None,
        _js="(t) => { if (t && typeof bksdmUseInTxt2img === 'function') { bksdmUseInTxt2img(t); } return []; }")

    def ask(job_id):
        if not job_id:
            return gr.update(visible=False), "", _message("Select a job first.", False)
        return gr.update(visible=True), f"Delete **{job_id}** and everything in its folder?", ""

    delete.click(ask, inputs=[selected], outputs=[confirm_row, confirm_text, action_result])
    for button in (confirm, keep):
        button.click(lambda: gr.update(visible=False), outputs=[confirm_row])
    return selected, seen, update, views_out


def _evaluation_key(view: dict | None):
    """What the shown results depend on: a finished evaluation's results.json (and the history's), None else."""
    if not view or view["state"] != "done":  # an evaluation's results.json: other kinds have none
        return None
    try:
        return view["id"], (Path(view["folder"]) / "results.json").stat().st_mtime_ns, time.time() // 30
    except OSError:
        return None


def use_in_txt2img(context: TabContext, job_id: str) -> str:
    """The WebUI title of a finished job's checkpoint, for the page to select; a BKSDMError says why not."""
    if not job_id:
        raise BKSDMError("Select a job first.")
    if context.use_checkpoint is None:
        raise BKSDMError("There is no txt2img here: load the job's checkpoint in the WebUI (or in diffusers).")
    path = job_checkpoint(context.runner, job_id)
    if path is None:
        raise BKSDMError(f"Job {job_id} has no finished checkpoint to use: only a done job's model can be selected.")
    return context.use_checkpoint(path)


def recommended_settings(path: Path) -> dict | None:
    """A few-step model's recommended sampling (`bksdm.recommended` in its safetensors header: sampler, steps,
    steps_range, cfg_scale, cfg_range), None when it records none or not in that form. Reads the header only."""
    from ..io import read_metadata

    try:
        raw = read_metadata(path).get("bksdm.recommended")
        rec = json.loads(raw) if raw else None
        if not (isinstance(rec, dict) and isinstance(rec.get("sampler"), str) and rec["sampler"]
                and all(isinstance(rec.get(k), (int, float)) for k in ("steps", "cfg_scale"))):
            return None
        for key in ("steps_range", "cfg_range"):
            value = rec.get(key)
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
                rec[key] = None
        return rec
    except (BKSDMError, ValueError):
        return None


def describe_recommended(rec: dict) -> str:
    """E.g. "Few-step model: LCM sampler, 4 steps (2-8), CFG 1-2"."""
    steps = f"{int(rec['steps'])} steps" + (f" ({rec['steps_range'][0]:g}-{rec['steps_range'][1]:g})"
                                             if rec.get("steps_range") else "")
    cfg = (f"CFG {rec['cfg_range'][0]:g}-{rec['cfg_range'][1]:g}" if rec.get("cfg_range")
           else f"CFG {rec['cfg_scale']:g}")
    return f"Few-step model: {rec['sampler']} sampler, {steps}, {cfg}"


def missing_sampler(context: TabContext, rec: dict) -> str:
    """What to say when the WebUI has no sampler of that name (LCM before WebUI 1.8); "" otherwise."""
    if context.samplers is None:
        return ""
    try:
        names = set(context.samplers())
    except Exception:  # noqa: BLE001 - the WebUI's internals: no list, nothing to say
        return ""
    if rec["sampler"] in names:
        return ""
    return (f"This WebUI has no {rec['sampler']} sampler (it came with WebUI 1.8): update the WebUI to sample "
            f"this model in {int(rec['steps'])} steps.")


def is_lora_file(path: Path) -> bool:
    """A LoRA file (kohya's `ss_network_module` in its header, as our LoRA outputs write it), not a checkpoint."""
    from ..io import read_metadata

    try:
        return bool(read_metadata(path).get("ss_network_module"))
    except BKSDMError:
        return False


def _recommended_note(context: TabContext, view: dict | None) -> str:
    """The Jobs view's line about a finished few-step model: its sampler, steps and CFG."""
    if not view or view["state"] != "done":
        return ""
    path = job_checkpoint(context.runner, view["id"])
    rec = recommended_settings(path) if path is not None else None
    if rec is None:
        return ""
    text = describe_recommended(rec) + "."
    if is_lora_file(path):
        text += f" A LoRA: put <lora:{path.stem}:1> in the prompt."
    missing = missing_sampler(context, rec)
    return _message(f"{text} {missing}".strip(), not missing)


def txt2img_use(context: TabContext, job_id: str) -> dict:
    """What "Use in txt2img" does for a finished job, for the page: the checkpoint title to select (None for
    a LoRA, whose `<lora:NAME:1>` goes in the prompt), the recommended sampler, steps and CFG to set (None
    when the model records none, or the WebUI lacks the sampler), and the message. A BKSDMError says why not."""
    if not job_id:
        raise BKSDMError("Select a job first.")
    path = job_checkpoint(context.runner, job_id)
    rec = recommended_settings(path) if path is not None else None
    use = {"checkpoint": None, "lora": None, "sampler": None, "steps": None, "cfg_scale": None}
    if path is not None and is_lora_file(path):
        if context.use_checkpoint is None:
            raise BKSDMError("There is no txt2img here: apply the job's LoRA in the WebUI (or in diffusers).")
        use["lora"] = f"<lora:{path.stem}:1>"
        parts = [f"{path.name} is a LoRA, not a checkpoint: put {use['lora']} in the prompt, with the model it "
                 "was trained on selected (the LoRA file belongs in the WebUI's models/Lora folder)."]
    else:
        use["checkpoint"] = use_in_txt2img(context, job_id)
        parts = [f"Selected {use['checkpoint']} in the checkpoint list; txt2img now generates with it."]
    if rec is not None:
        missing = missing_sampler(context, rec)
        if missing:
            parts.append(f"{describe_recommended(rec)}. {missing}")
        else:
            use.update(sampler=rec["sampler"], steps=int(rec["steps"]), cfg_scale=float(rec["cfg_scale"]))
            parts.append(f"Set txt2img to the {rec['sampler']} sampler, {int(rec['steps'])} steps and CFG "
                         f"{rec['cfg_scale']:g} ({describe_recommended(rec)}).")
    use["message"] = " ".join(parts)
    return use


MODEL_HEADERS = ["Checkpoint", "Layout", "Version", "U-Net parameters", "vs SD", "U-Net MACs", "vs SD",
                 "Seconds per image", "Measured with", "Speed-up vs SD", "Problem"]


def model_table(rows: list[dict]) -> list[list]:
    """The Models view's rows as text: parameters in millions, MACs in G (per U-Net forward, batch 1)."""
    out = []
    for r in rows:
        out.append([r["checkpoint"], r["layout_title"], r["version"], f"{r['unet_parameters'] / 1e6:.0f} M",
                    f"{r['parameter_ratio']:.0%}", f"{r['unet_macs'] / 1e9:.0f} G", f"{r['macs_ratio']:.0%}",
                    f"{r['s_per_image']:.2f}" if r.get("s_per_image") is not None else "not measured",
                    r.get("measured") or "", f"{r['speedup']:.2f}x" if r.get("speedup") else "",
                    r.get("problem") or ""])
    return out or [["No BK-SDM checkpoint in the list yet."] + [""] * (len(MODEL_HEADERS) - 1)]


def _models(context: TabContext) -> None:
    gr.Markdown("Each BK-SDM checkpoint in the checkpoint list: its U-Net against SD's of the same version "
                "(parameters; MACs per U-Net step at the version's native size), and its measured speed from the "
                "Timings view, when it has been timed.")
    refresh = gr.Button("Refresh", elem_id="bksdm_models_refresh", size="sm")
    table = gr.Dataframe(headers=MODEL_HEADERS, value=[[""] * len(MODEL_HEADERS)], interactive=False, wrap=True,
                         elem_id="bksdm_models_table")
    result = gr.HTML()

    def load(request: gr.Request):
        context.check_read(request)
        try:
            return model_table(context.models_rows()), ""
        except BKSDMError as error:
            return gr.update(), _message(str(error), False)

    refresh.click(load, outputs=[table, result])


def build_tab(context: TabContext) -> gr.Blocks:
    """The BK-SDM tab's Blocks: a form per job kind, Jobs, Models and Timings."""
    with gr.Blocks(analytics_enabled=False, title="BK-SDM") as tab:
        if not context.guard.allowed:
            gr.HTML(_message(f"Jobs are disabled on this server: {context.guard.exposure}. Start it on "
                             "127.0.0.1, or with --enable-insecure-extension-access.", False))
        forms = []
        with gr.Tabs(elem_id="bksdm_tabs"):
            for kind in context.runner.kinds.values():
                with gr.Tab(kind.title, elem_id=f"bksdm_tab_{kind.name}"):
                    forms.append(_form(context, kind))
            with gr.Tab("Jobs", elem_id="bksdm_tab_jobs"):
                selected, seen, update, views_out = _jobs(context)
            if context.models_rows is not None:
                with gr.Tab("Models", elem_id="bksdm_tab_models"):
                    _models(context)
            try:
                from .timings_view import build_timings_view
            except ImportError:
                build_timings_view = None
            if build_timings_view is not None:
                with gr.Tab("Timings", elem_id="bksdm_tab_timings"):
                    build_timings_view(context.timings_path, context.benchmark, context.checkpoint_choices,
                                       check=context.check_origin, check_read=context.check_read)

        def follow(job_id, shown, request: gr.Request):
            """After a launch: the Jobs view shows the job just made (nothing changes when none was made)."""
            return update(job_id, {}, request) if job_id else [gr.update()] * len(views_out)

        for form in filter(None, forms):  # the Jobs view follows the job just launched
            form.launched.then(follow, inputs=[form.job_id, seen], outputs=views_out)
    _own_values(tab)
    return tab


def _own_values(tab: gr.Blocks) -> None:
    """Keep every form's own defaults in the WebUI. It keeps a tab's values in ui-config.json by the tab's
    name and each field's label alone (modules/ui_loadsave.py, 1.6-1.10), so the kinds' same-labelled
    fields (Mode, Learning rate, Output folder...) would all show the first form's values. The tab's
    saved recipes are its presets. Elsewhere gradio ignores the attribute."""
    for block in tab.blocks.values():
        block.do_not_save_to_config = True
