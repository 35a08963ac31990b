"""The Timings view of the BK-SDM tab (gradio 3.41): filters, the grouped table, speed-ups, plots,
CSV export/import and the benchmark action. `view_data` computes everything shown; the Blocks only wire it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gradio as gr

from ..errors import BKSDMError
from ..timings import stats
from ..timings.protocol import SAMPLERS, Protocol
from ..timings.store import TimingStore

ALL = "(all)"


@dataclass
class ViewData:
    devices: list[str]
    checkpoints: list[str]
    samplers: list[str]
    sizes: list[str]
    table: object  # pandas DataFrames
    seconds_per_image: object
    per_step: object
    summary: str


def view_data(store_path: str | os.PathLike, device: str = ALL, checkpoints: list[str] | None = None,
              sampler: str = ALL, steps: float | None = None, size: str = ALL, source: str = ALL,
              reference: str | None = None) -> ViewData:
    with TimingStore(store_path) as store:
        records = store.records()
    chosen = stats.filter_records(records, None if device == ALL else device, checkpoints,
                                  None if sampler == ALL else sampler, int(steps) if steps else None,
                                  None if size == ALL else size, None if source == ALL else source)
    rows = stats.group(chosen, reference or None)
    return ViewData(
        devices=sorted({r.device for r in records}), checkpoints=sorted({r.checkpoint for r in records}),
        samplers=sorted({r.sampler for r in records}), sizes=sorted({stats.size_of(r) for r in records}),
        table=stats.rows_frame(rows), seconds_per_image=stats.seconds_per_image_frame(rows),
        per_step=stats.per_step_frame(chosen),
        summary=f"{len(chosen)} of {len(records)} generations, {len(rows)} groups"
                + (f"; speed-up against {reference}" if reference else ""))


def build_timings_view(store_path_getter: Callable[[], str | os.PathLike],
                       benchmark: Callable[[list[str], Protocol], list] | None = None,
                       checkpoint_choices: Callable[[], list[str]] | None = None,
                       check: Callable[[gr.Request | None, str], None] = lambda request, action: None,
                       check_read: Callable[[gr.Request | None], None] = lambda request: None) -> None:
    """Create the view inside the current gr.Blocks.

    benchmark(checkpoints, protocol) runs and records the protocol (the WebUI's own processing in the
    WebUI); checkpoint_choices() lists what can be benchmarked. Without them the action is hidden.
    `check(request, action)` (raising BKSDMError) and `check_read(request)` refuse events from pages
    the server did not serve (the tab passes its own; see ui/tab.py).
    """
    initial = view_data(store_path_getter())  # what is recorded so far; Refresh or a filter updates it
    with gr.Row():
        device = gr.Dropdown([ALL] + initial.devices, value=ALL, label="Device")
        checkpoints = gr.Dropdown(initial.checkpoints, value=[], multiselect=True, label="Checkpoints (none: all)")
        sampler = gr.Dropdown([ALL] + initial.samplers, value=ALL, label="Sampler")
        steps = gr.Number(value=0, precision=0, label="Steps (0: all)")
        size = gr.Dropdown([ALL] + initial.sizes, value=ALL, label="Size")
        source = gr.Dropdown([ALL, "webui", "webui-bench", "bench"], value=ALL, label="Source")
        reference = gr.Dropdown(initial.checkpoints, value=None, label="Speed-up against")
    with gr.Row():
        refresh = gr.Button("Refresh", variant="secondary")
        summary = gr.Markdown(initial.summary)
    table = gr.Dataframe(initial.table, interactive=False, wrap=True,
                         label="Seconds per image, by device x checkpoint x sampler x steps x size")
    with gr.Row():
        bars = gr.BarPlot(initial.seconds_per_image, x="checkpoint", y="s/image", color="condition",
                          title="Seconds per image (median)", tooltip=["checkpoint", "s/image", "condition"],
                          x_label_angle=-30, width=380, height=300)
        lines = gr.LinePlot(initial.per_step, x="generation", y="U-Net ms/step", color="checkpoint",
                            title="Per-step U-Net time", tooltip=["checkpoint", "U-Net ms/step"], width=380, height=300)
    with gr.Accordion("CSV: compare machines", open=False):
        with gr.Row():
            export_button = gr.Button("Export CSV")
            export_file = gr.File(label="Exported records", interactive=False)
            import_file = gr.File(label="Import a timings CSV", file_types=[".csv"], type="file")
        import_message = gr.Markdown()

    filters = [device, checkpoints, sampler, steps, size, source, reference]

    def show(device_value, checkpoint_values, sampler_value, steps_value, size_value, source_value, reference_value,
             request: gr.Request):
        check_read(request)
        data = view_data(store_path_getter(), device_value, checkpoint_values, sampler_value, steps_value,
                         size_value, source_value, reference_value)
        return (gr.update(choices=[ALL] + data.devices), gr.update(choices=data.checkpoints),
                gr.update(choices=[ALL] + data.samplers), gr.update(choices=[ALL] + data.sizes),
                gr.update(choices=data.checkpoints), data.table, data.seconds_per_image, data.per_step, data.summary)

    outputs = [device, checkpoints, sampler, size, reference, table, bars, lines, summary]
    refresh.click(show, filters, outputs)
    for control in filters:
        control.change(show, filters, outputs)

    def export_csv(request: gr.Request):
        check_read(request)
        path = Path(tempfile.mkdtemp(prefix="bksdm-timings-")) / "bksdm-timings.csv"
        with TimingStore(store_path_getter()) as store:
            store.export_csv(path)
        return str(path)

    export_button.click(export_csv, [], [export_file])

    def import_csv(upload, request: gr.Request):
        if upload is None:
            return ""
        try:
            check(request, "Importing timings")
            with TimingStore(store_path_getter()) as store:
                added = store.import_csv(getattr(upload, "name", upload))
        except BKSDMError as error:
            return f"**Not imported:** {error}"
        return f"Imported {added} new records."

    import_file.upload(import_csv, [import_file], [import_message]).then(show, filters, outputs)

    if benchmark is not None:
        _benchmark_controls(benchmark, checkpoint_choices, show, filters, outputs, check)


def _benchmark_controls(benchmark, checkpoint_choices, show, filters, outputs, check) -> None:
    default = Protocol()
    with gr.Accordion("Benchmark: the paper's protocol (512x512, 20 steps, DPM++ 2M Karras, CFG 7, seed 1234)",
                      open=False):
        with gr.Row():
            chosen = gr.Dropdown(checkpoint_choices() if checkpoint_choices else [], value=[], multiselect=True,
                                 label="Checkpoints to compare (e.g. an SD and a BK-SDM)")
            images = gr.Number(value=default.images, precision=0, label="Measured images")
            warmup = gr.Number(value=default.warmup, precision=0, label="Warm-up images (not recorded)")
        with gr.Row():
            width = gr.Number(value=default.width, precision=0, label="Width")
            height = gr.Number(value=default.height, precision=0, label="Height")
            steps = gr.Number(value=default.steps, precision=0, label="Steps")
            sampler = gr.Dropdown(list(SAMPLERS), value=default.sampler, label="Sampler")
            run = gr.Button("Run benchmark", variant="primary")
        message = gr.Markdown()

    def run_benchmark(names, images_value, warmup_value, width_value, height_value, steps_value, sampler_value,
                      request: gr.Request):
        try:
            check(request, "Running a benchmark")
        except BKSDMError as error:
            return f"**Refused:** {error}", gr.update()
        if not names:
            return "Choose at least one checkpoint.", gr.update()
        protocol = Protocol(images=int(images_value), warmup=int(warmup_value), width=int(width_value),
                            height=int(height_value), steps=int(steps_value), sampler=sampler_value)
        try:
            records = benchmark(list(names), protocol)
        except BKSDMError as error:
            return f"**Benchmark stopped:** {error}", gr.update()
        return f"Recorded {len(records)} images for {len(names)} checkpoints.", gr.update(value=names[0])

    reference = filters[-1]
    run.click(run_benchmark, [chosen, images, warmup, width, height, steps, sampler], [message, reference]) \
        .then(show, filters, outputs)
