"""The Timings view: what it shows for a store, and that the gradio 3.41 Blocks build and run."""

import gradio as gr
import pytest
from test_timings_store import make_record

from bksdm_ext.timings.store import TimingStore
from bksdm_ext.ui.timings_view import ALL, build_timings_view, view_data


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "timings.sqlite3"
    with TimingStore(path) as store:
        store.add_many([make_record(i, checkpoint="sd-v1-5", total_s=4.9, unet_median_ms=200.0) for i in range(4)]
                       + [make_record(i, checkpoint="bk-sdm-base-2m", layout="base", total_s=3.4, unet_median_ms=130.0)
                          for i in range(4)]
                       + [make_record(0, checkpoint="sd-v1-5", total_s=9.0, width=768, height=768, source="bench")])
    return path


def test_view_data_groups_filters_and_computes_speedups(store_path):
    data = view_data(store_path, reference="sd-v1-5")
    assert data.checkpoints == ["bk-sdm-base-2m", "sd-v1-5"] and data.sizes == ["512x512", "768x768"]
    table = data.table.set_index(["checkpoint", "size"])
    assert table.loc[("bk-sdm-base-2m", "512x512"), "speed-up"] == round(4.9 / 3.4, 3)  # shown to 3 decimals
    assert table.loc[("sd-v1-5", "512x512"), "speed-up"] == pytest.approx(1.0)
    assert table.loc[("sd-v1-5", "512x512"), "runs"] == 4
    assert len(data.per_step) == 9 and set(data.per_step["checkpoint"]) == {"sd-v1-5", "bk-sdm-base-2m"}

    only = view_data(store_path, size="768x768", source=ALL)
    assert list(only.table["checkpoint"]) == ["sd-v1-5"] and only.summary.startswith("1 of 9 generations")
    assert len(view_data(store_path, source="webui").table) == 2
    assert len(view_data(store_path, checkpoints=["bk-sdm-base-2m"]).seconds_per_image) == 1


def test_blocks_build_and_the_refresh_handler_fills_every_output(store_path):
    ran = []

    def benchmark(names, protocol):
        ran.append((names, protocol.steps))
        return []

    with gr.Blocks() as demo:
        build_timings_view(lambda: store_path, benchmark, lambda: ["sd-v1-5", "bk-sdm-base-2m"])
    show = next(f for f in demo.fns if f.name == "show")
    outputs = show.fn(ALL, [], ALL, 0, ALL, ALL, "sd-v1-5", None)
    assert len(outputs) == len(show.outputs) == 9
    assert outputs[-1].startswith("9 of 9 generations")
    run = next(f for f in demo.fns if f.name == "run_benchmark")
    message, _ = run.fn(["sd-v1-5"], 2, 1, 64, 64, 3, "Euler", None)
    assert ran == [(["sd-v1-5"], 3)] and "Recorded 0 images" in message


def test_a_foreign_page_runs_no_benchmark_and_reads_no_timings(tmp_path):
    from bksdm_ext.jobs.origin import CrossOrigin

    ran = []

    def refuse(request, action="Showing the timings"):
        raise CrossOrigin(f"{action} is refused: Origin 'http://evil.example' is another site.")

    def refuse_read(request):
        try:
            refuse(request)
        except CrossOrigin as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks() as demo:
        build_timings_view(lambda: tmp_path / "t.sqlite3", lambda names, protocol: ran.append(names) or [],
                           lambda: ["sd-v1-5"], check=refuse, check_read=refuse_read)
    fns = {f.name: f.fn for f in demo.fns}
    message, _ = fns["run_benchmark"](["sd-v1-5"], 2, 1, 64, 64, 3, "Euler", None)
    assert "Running a benchmark is refused" in message and ran == []
    for name, args in (("show", (ALL, [], ALL, 0, ALL, ALL, None)), ("export_csv", ())):
        with pytest.raises(gr.Error, match="refused"):
            fns[name](*args, None)
    assert "Importing timings is refused" in fns["import_csv"](str(tmp_path / "x.csv"), None)


def test_an_empty_store_builds_typed_plots_without_warnings(tmp_path, recwarn):
    with gr.Blocks():
        build_timings_view(lambda: tmp_path / "none.sqlite3", lambda names, protocol: [], lambda: [])
    data = view_data(tmp_path / "none.sqlite3")
    for plot, frame in ((gr.BarPlot(x="checkpoint", y="s/image", color="condition"), data.seconds_per_image),
                        (gr.LinePlot(x="generation", y="U-Net ms/step", color="checkpoint"), data.per_step)):
        assert frame.empty and "object" not in {str(dtype) for dtype in frame.dtypes}
        assert plot.postprocess(frame) is not None
    assert not [w for w in recwarn if "infer vegalite type" in str(w.message)]
