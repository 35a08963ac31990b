"""`bksdm bench-generate` and `bksdm timings export|import|show` on tiny pipelines."""

import pytest
import torch

from bksdm_ext.cli import main
from bksdm_ext.timings.store import TimingStore

TINY = ["--width", "64", "--height", "64", "--steps", "3", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    from tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("bk-small") / "bk-small", "small", "v1")


@pytest.mark.slow
def test_bench_generate_records_measured_images_of_each_model(tiny_pipeline_v1, small_pipeline, tmp_path, capsys):
    db = tmp_path / "t.sqlite3"
    assert main(["bench-generate", str(tiny_pipeline_v1), str(small_pipeline), "--images", "2", "--warmup", "1",
                 "--db", str(db), *TINY]) == 0
    out = capsys.readouterr().out
    with TimingStore(db) as store:
        records = store.records()
    assert len(records) == 4  # 2 measured per model; warm-up not recorded
    assert [r.layout for r in records] == ["sd", "sd", "small", "small"]
    assert {r.checkpoint for r in records} == {tiny_pipeline_v1.name, small_pipeline.name}
    assert len({r.run_id for r in records}) == 1
    assert [r.seed for r in records[:2]] == [1235, 1236]
    for r in records:
        assert (r.source, r.sampler, r.schedule, r.steps, r.width, r.height, r.cfg_scale) == (
            "bench", "DPM++ 2M", "karras", 3, 64, 64, 7.0)
        assert r.unet_calls == 3
        assert r.sampling_s + r.vae_decode_s <= r.total_s
        assert r.device.startswith("CPU") and r.precision == "float32" and r.attention and r.version == "v1"
        assert len(r.checkpoint_hash) == 10
    assert "speed-up" in out and small_pipeline.name in out and "1.000" in out  # the reference against itself


def test_diffusers_backend_runs_the_same_protocol(tiny_pipeline_v1, tmp_path):
    db = tmp_path / "t.sqlite3"
    assert main(["bench-generate", str(tiny_pipeline_v1), "--images", "1", "--warmup", "0", "--backend", "diffusers",
                 "--db", str(db), *TINY]) == 0
    with TimingStore(db) as store:
        (record,) = store.records()
    assert (record.sampler, record.schedule, record.unet_calls) == ("DPM++ 2M", "karras", 3)


def test_both_backends_compute_the_same_dpmpp_2m_karras(tiny_pipeline_v1):
    from bksdm_ext.timings.bench import encode_prompts, load_pipeline, sample_diffusers, sample_k_diffusion
    from bksdm_ext.timings.protocol import Protocol

    pipe = load_pipeline(tiny_pipeline_v1)
    protocol = Protocol(width=64, height=64, steps=8)
    cond, uncond = encode_prompts(pipe, protocol.prompt, "", 1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    k = sample_k_diffusion(pipe, protocol, cond, uncond, noise)
    d = sample_diffusers(pipe, protocol, cond, uncond, noise)
    # same method: 0.99995 here; another sampler (Euler) or schedule (normal) gives about 0.995
    assert torch.nn.functional.cosine_similarity(k.flatten(), d.flatten(), dim=0) > 0.9995


def test_bench_generate_refuses_a_unet_folder_with_a_clear_message(tiny_pipeline_v1, tmp_path, capsys):
    assert main(["bench-generate", str(tiny_pipeline_v1 / "unet"), "--db", str(tmp_path / "t.sqlite3"), *TINY]) == 2
    assert "needs a whole pipeline folder" in capsys.readouterr().err


def test_timings_export_import_show(tmp_path, capsys):
    from test_timings_store import make_record

    source = tmp_path / "a.sqlite3"
    with TimingStore(source) as store:
        store.add_many([make_record(i, checkpoint="sd-v1-5", total_s=4.9) for i in range(3)]
                       + [make_record(i, checkpoint="bk-sdm-base-2m", layout="base", total_s=3.4) for i in range(3)])
    csv_file = tmp_path / "runs.csv"
    target = tmp_path / "b.sqlite3"
    assert main(["timings", "export", str(csv_file), "--db", str(source)]) == 0
    assert main(["timings", "import", str(csv_file), "--db", str(target)]) == 0
    assert main(["timings", "import", str(csv_file), "--db", str(target)]) == 0
    out = capsys.readouterr().out
    assert "Exported 6 records" in out and "Imported 6 new records" in out and "Imported 0 new records" in out
    plot = tmp_path / "plots.png"
    assert main(["timings", "show", "--reference", "sd-v1-5", "--db", str(target), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("CPU: test") and "bk-sdm-base-2m" in line)
    assert "3.400" in line and f"{4.9 / 3.4:.3f}" in line
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["timings", "show", "--checkpoint", "nothing", "--db", str(target)]) == 0
    assert "No records" in capsys.readouterr().out


def test_webui_sampler_names_of_every_version_group_together():
    from bksdm_ext.timings.protocol import sampler_and_schedule

    assert sampler_and_schedule("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")  # WebUI 1.6-1.8
    assert sampler_and_schedule("DPM++ 2M", "Karras") == ("DPM++ 2M", "Karras")  # 1.9+
    assert sampler_and_schedule("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert sampler_and_schedule("Euler a") == ("Euler a", "")
    assert sampler_and_schedule("Euler", "Automatic") == ("Euler", "Automatic")


def test_the_schedule_recorded_is_the_one_the_infotext_shows():
    from bksdm_ext.timings.protocol import schedule_as_run

    # 1.9+: the UI asks for "Automatic"; DPM++ 2M then runs Karras and the WebUI writes that down
    assert schedule_as_run("DPM++ 2M", "Automatic", {"Schedule type": "Karras"}) == ("DPM++ 2M", "Karras")
    assert schedule_as_run("Euler", "Automatic", {}) == ("Euler", "Automatic")  # no schedule of its own
    assert schedule_as_run("DPM++ 2M", "Exponential", {"Schedule type": "Exponential"}) == ("DPM++ 2M", "Exponential")
    # 1.6-1.8: folded into the sampler's name, unless the k_sched_type setting overrides it
    assert schedule_as_run("DPM++ 2M Karras", None, {}) == ("DPM++ 2M", "Karras")
    assert schedule_as_run("DPM++ 2M Karras", None, {"Schedule type": "exponential"}) == ("DPM++ 2M", "Exponential")
    assert schedule_as_run("Euler a", None, {}) == ("Euler a", "")
