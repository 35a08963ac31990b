"""Bad input never costs a run or a file: each case is a one-line error (400 in the API, exit 2 and one
line in the CLI) before any model loads, or a skip that is counted; nothing is written or removed."""

from __future__ import annotations

import csv
import json
import logging
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from jobs_helpers import make_runner, serve
from train_helpers import one_thread, small_settings, write_images  # noqa: F401 (a fixture)

from bksdm_ext import cli, kinds
from bksdm_ext.errors import BKSDMError
from bksdm_ext.jobs.api import jobs_router
from bksdm_ext.jobs.guard import AccessGuard

UNWRITABLE = "/proc/bksdm-no-such-folder"  # /proc takes no new files, not even from root (CI and here)
MAX_STEPS = kinds.get("distill").config_class().setting("max_steps").max  # the contract's one bound


def one_line_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr and no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def api(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all())
    app = FastAPI()
    app.include_router(jobs_router(runner, AccessGuard()))
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client, runner
    finally:
        runner.close()


def test_api_answers_bad_configs_with_400_naming_the_field(api, tmp_path, tiny_pipeline_v1):
    client, runner = api
    data = write_images(tmp_path / "images", 2)
    numeric = write_images(tmp_path / "numeric", 1)
    (numeric / "metadata.jsonl").write_text('{"file_name": 5, "text": "five"}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    base = {"teacher": str(tiny_pipeline_v1), "data": str(data), **small_settings()}
    cases = [
        ("distill", {**base, "data": str(numeric)}, "1 file name not text"),
        ("distill", {**base, "layout": None}, "Set layout"),
        ("convert", {"source": 5}, "source 5 does not exist"),
        ("distill", {**base, "max_steps": 2**63}, f"max_steps must be at most {MAX_STEPS}"),
        ("distill", {**base, "max_steps": 1e30}, f"max_steps must be at most {MAX_STEPS}"),
        ("distill", {**base, "resolution": 100}, "resolution must be a multiple of 8"),
        ("distill", {**base, "resolution": 4096}, "resolution must be at most 2048"),
        ("distill", {**base, "resolution": 32}, "resolution must be at least 64"),
        ("distill", {**base, "max_steps": "many"}, "max_steps must be a int"),
        ("distill", {**base, "output_name": str(outside)}, "output_name must be a plain file name"),
        ("distill", {**base, "output_name": "../../x"}, "output_name must be a plain file name"),
        ("distill", {**base, "output_name": "a/b"}, "output_name must be a plain file name"),
        ("distill", {**base, "output_dir": UNWRITABLE}, "output_dir /proc/bksdm-no-such-folder is not writable"),
        ("convert", {"source": str(tiny_pipeline_v1), "name": "../escape"}, "name must be a plain file name"),
        ("convert", {"source": str(tiny_pipeline_v1), "output_dir": UNWRITABLE}, "is not writable"),
    ]
    for kind, config, message in cases:
        answer = client.post("/bksdm/v1/jobs", json={"kind": kind, "config": config})
        assert answer.status_code == 400, (config, answer.text)
        assert message in answer.json()["detail"], (message, answer.json())
    jobs = runner.data_dir / "jobs"
    assert runner.list() == [] and (not jobs.exists() or not any(jobs.iterdir()))
    assert list(outside.iterdir()) == []
    from bksdm_ext.train.config import DistillConfig

    DistillConfig.from_dict({**base, "max_steps": 1e1}).validate()  # the same config, its values fixed: accepted


def test_cli_refuses_bad_folders_in_one_line_before_any_model_loads(capsys, tmp_path, tiny_pipeline_v1, monkeypatch):
    from bksdm_ext.train import models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_parts", never)
    data = write_images(tmp_path / "images", 2)
    flags = ["distill", "--teacher", str(tiny_pipeline_v1), "--data", str(data), "--resolution", "64",
             "--max-steps", "2", "--mixed-precision", "no", "--num-workers", "0"]
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert "is a file" in one_line_error(capsys, [*flags, "--job-dir", str(a_file)])
    assert a_file.read_text() == "mine"
    assert "is not writable" in one_line_error(capsys, [*flags, "--job-dir", UNWRITABLE + "/job"])
    job = tmp_path / "job"
    assert "output_dir" in one_line_error(capsys, [*flags, "--job-dir", str(job), "--output-dir", UNWRITABLE])
    assert not job.exists()  # refused at validation: not even the job folder was made
    numeric = write_images(tmp_path / "numeric", 1)
    (numeric / "metadata.jsonl").write_text('{"file_name": 12, "text": "twelve"}\n')
    assert "file name not text" in one_line_error(capsys, [*flags, "--data", str(numeric), "--job-dir", str(job)])
    assert "output_name must be a plain file name" in one_line_error(
        capsys, [*flags, "--job-dir", str(job), "--output-name", str(tmp_path)])
    assert f"max_steps must be at most {MAX_STEPS}" in one_line_error(capsys, [*flags, "--job-dir", str(job), "--max-steps",
                                                                  str(2**63)])


def test_inspect_says_a_missing_path_does_not_exist(capsys, tmp_path):
    assert f"{tmp_path / 'nothing.safetensors'} does not exist" in one_line_error(
        capsys, ["inspect", str(tmp_path / "nothing.safetensors")])
    assert "/nonexistent does not exist" in one_line_error(capsys, ["inspect", "/nonexistent"])


def test_convert_replaces_a_checkpoint_only_with_overwrite(capsys, tmp_path, tiny_pipeline_v1):
    target = tmp_path / "model.safetensors"
    assert cli.main(["convert", str(tiny_pipeline_v1), str(target)]) == 0
    yaml = target.with_suffix(".yaml")
    before = (target.read_bytes(), yaml.read_bytes())
    target.write_bytes(b"the user's own file")
    capsys.readouterr()
    assert "pass --overwrite" in one_line_error(capsys, ["convert", str(tiny_pipeline_v1), str(target)])
    assert target.read_bytes() == b"the user's own file"
    target.unlink()
    assert "model.yaml already exist" in one_line_error(capsys, ["convert", str(tiny_pipeline_v1), str(target)])
    assert not target.exists()
    assert cli.main(["convert", str(tiny_pipeline_v1), str(target), "--overwrite"]) == 0
    from bksdm_ext.io import read_metadata

    assert read_metadata(target)["bksdm.layout"] == "teacher" and yaml.read_bytes() == before[1]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    assert "not an empty folder" in one_line_error(capsys, ["convert", str(target), str(folder), "--overwrite"])
    assert (folder / "keep.txt").read_text() == "keep"


def test_bitsandbytes_import_warning_stays_out_of_the_cli(caplog, monkeypatch):
    from bksdm_ext.commands import model

    def noisy(args):  # what importing bitsandbytes 0.50 does on a CPU with AVX512-BF16
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real warning")
        return 0

    monkeypatch.setattr(model, "inspect_command", noisy)
    with caplog.at_level("WARNING"):
        assert cli.main(["inspect", "x"]) == 0
    assert "gemm_4bit_forward" not in caplog.text and "a real warning" in caplog.text


# --- data ---------------------------------------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR says width x height and whose image data is cut off (a truncated download)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 50)[:20]))
    return path


def test_bad_items_are_skipped_counted_and_reported(tmp_path, tiny_pipeline_v1, one_thread, recwarn):
    from PIL import Image

    from bksdm_ext.train import distill
    from bksdm_ext.train.config import DistillConfig
    from bksdm_ext.train.data import read_metadata, reject_reason

    data = write_images(tmp_path / "data", 3)
    png_header_only(data / "truncated.png", 80, 80)
    Image.new("1", (12000, 12000)).save(data / "bomb.png")  # 144 megapixels in a small file
    (tmp_path / "secret.png").write_bytes((data / "0.png").read_bytes())
    rows = [{"file_name": 7, "text": "a number"}, {"file_name": ["0.png"], "text": "a list"},
            {"file_name": "../secret.png", "text": "outside"}, {"file_name": "0.png", "text": 3},
            {"file_name": "truncated.png", "text": "cut off"}, {"file_name": "bomb.png", "text": "huge"}]
    with open(data / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    meta = read_metadata(str(data))
    assert meta.skipped == {"file name not text": 2, "file outside the data folder": 1, "missing caption": 1}
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
        assert reject_reason(data / "bomb.png", 32) == "too many pixels"
    assert decoded == []  # refused from its header: never decoded
    assert reject_reason(data / "truncated.png", 32) == "broken image"

    job = tmp_path / "job"
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data),
                           **small_settings(train_batch_size=5, max_steps=1, checkpoint_every=1))
    assert distill.train(config, job) == "done"
    state = json.loads((job / "progress.json").read_text())
    assert state["skipped"] == {"broken image": 1, "too many pixels": 1}
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]  # no noise in the log


def test_pillow_refusing_at_open_is_a_counted_skip_too(tmp_path, monkeypatch):
    from PIL import Image

    from bksdm_ext.train.data import reject_reason

    Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit
    assert reject_reason(tmp_path / "x.png", 1) == "too many pixels"


def test_losses_csv_has_no_duplicate_steps_after_a_rerun_without_checkpoint(tmp_path, tiny_pipeline_v1, one_thread):
    from bksdm_ext.train import distill
    from bksdm_ext.train.config import DistillConfig

    data = write_images(tmp_path / "data", 2)
    job = tmp_path / "job"
    config = DistillConfig(teacher=str(tiny_pipeline_v1), data=str(data), **small_settings(max_steps=3))
    assert distill.train(config, job) == "done"  # checkpoint_every 0: as if killed before its first checkpoint
    with open(job / "losses.csv", "a") as f:
        f.write("4,0.1")  # and the kill cut a row short
    assert distill.train(config, job, resume="latest") == "done"
    with open(job / "losses.csv", newline="") as f:
        steps = [row["step"] for row in csv.DictReader(f)]
    assert steps == ["1", "2", "3"]


# --- outputs ------------------------------------------------------------------------------------


def test_a_finished_job_continued_replaces_its_own_output_and_never_a_foreign_one(tmp_path, tiny_pipeline_v1,
                                                                                 one_thread):
    from bksdm_ext.train import distill
    from bksdm_ext.train.config import DistillConfig
    from bksdm_ext.job import JobFolder

    data = write_images(tmp_path / "data", 2)
    models = tmp_path / "models"
    settings = dict(teacher=str(tiny_pipeline_v1), data=str(data), output_dir=str(models), output_name="mine")
    job = tmp_path / "job"
    assert distill.train(DistillConfig(**settings, **small_settings(max_steps=2, checkpoint_every=2)), job) == "done"
    first = (models / "mine.safetensors").stat().st_mtime_ns
    more = DistillConfig(**settings, **small_settings(max_steps=4, checkpoint_every=2))
    assert distill.train(more, job, resume="latest") == "done"
    assert JobFolder(job).read_progress().step == 4 and (models / "mine.safetensors").stat().st_mtime_ns != first

    # another job naming the same output is refused before it trains, and the model stays
    before = (models / "mine.safetensors").read_bytes()
    with pytest.raises(BKSDMError, match="mine.* already exists"):
        distill.train(more, tmp_path / "other-job")
    assert (models / "mine.safetensors").read_bytes() == before
    assert not (tmp_path / "other-job" / "checkpoints").exists() or not any((tmp_path / "other-job" / "checkpoints").iterdir())
