"""The evaluate job end to end: a tiny teacher and a Small student built from it, through the runner and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jobs_helpers import make_runner, wait_for
from PIL import Image
from tiny_metrics import write_tiny_clip, write_tiny_inception
from train_helpers import one_thread  # noqa: F401 - a fixture

from bksdm_ext import kinds
from bksdm_ext.cli import main
from bksdm_ext.errors import BKSDMError
from bksdm_ext.evaluate.config import EvaluateConfig
from bksdm_ext.job import JobFolder

pytestmark = pytest.mark.slow

TINY = {"resolution": 64, "eval_size": 64, "steps": 2, "grid_prompts": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def models(tiny_pipeline_v1, tmp_path_factory):
    """(teacher, small student) pipeline folders: the student built from the teacher, as distillation starts."""
    from bksdm_ext.pipeline_folder import load_unet, write_student_folder
    from bksdm_ext.student import build_student

    teacher_unet, root = load_unet(tiny_pipeline_v1)
    student, _ = build_student(teacher_unet, "small")
    return tiny_pipeline_v1, write_student_folder(student, tmp_path_factory.mktemp("student") / "bk-small", root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    clip_config, clip_weights = write_tiny_clip(root / "clip")
    return {"inception": str(write_tiny_inception(root / "inception")), "clip_weights": str(clip_weights),
            "clip_model": str(clip_config), "reference": str(reference)}


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(f"a photo of thing number {i}\n" for i in range(count)))
    return path


def test_a_teacher_and_its_student_evaluated_through_the_runner(models, weights, tmp_path):
    runner = make_runner(tmp_path / "data", kinds={"evaluate": kinds.get("evaluate")})
    try:
        values = {"models": [str(m) for m in models], "prompts": str(write_prompts(tmp_path / "p.txt", 4)),
                  "metrics": "fid,is,clip,teacher-distance", **weights, **TINY}
        job = wait_for(runner, runner.submit("evaluate", values).id, ("done", "failed"), timeout=300)
        assert job.state == "done", runner.log_tail(job.id)
    finally:
        runner.close()
    folder = Path(job.folder)
    results = json.loads((folder / "results.json").read_text())
    teacher, student = results["models"]
    assert (teacher["role"], student["role"], student["layout"]) == ("teacher", "student", "small")
    assert results["images"] == 4 and results["fid_variant"] == "clean-fid clean"
    assert results["reference"]["images"] == 5 and results["protocol"]["sampler"] == "PNDM"
    for model in (teacher, student):
        assert model["fid"] > 0 and model["is"] >= 1 and -1 <= model["clip"] <= 1 and model["seconds_per_image"] > 0
    assert teacher["pixel_mse"] == 0 and teacher["clip_image_similarity"] == pytest.approx(1, abs=1e-6)
    assert student["pixel_mse"] > 0 and student["clip_image_similarity"] < 1
    assert teacher["fid"] != student["fid"]
    assert [p["model"] for p in results["paper"]["rows"]][0] == "SD-v1.4"
    assert results["weights"]["inception"]["sha256"] and results["weights"]["clip"]["sha256"]
    # the same prompt and seed give each model's image i; the grid shows them side by side
    assert sorted(p.name for p in (folder / "images" / "m1").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == (2 * 64, 20 + 3 * 64)
        cell = np.asarray(grid.convert("RGB"))[20:84, 64:128]
    assert np.array_equal(cell, np.asarray(Image.open(folder / "images" / "m1" / "00000.png").convert("RGB")))
    csv_rows = (folder / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and "fid_variant" in csv_rows[0] and "clean-fid clean" in csv_rows[2]
    log = (folder / "log.txt").read_text()
    assert "Teacher distance of model 2/2" in log and "For reference only" in log  # the table, printed


def test_images_match_the_benchmark_engine_and_resume_after_cancel_regenerates_none(models, tmp_path, monkeypatch):
    """Cancelled after 3 images, the job resumes with them untouched (mtimes, and a count of generated images)."""
    from bksdm_ext.evaluate import run as evaluate_run
    from bksdm_ext.evaluate.config import EvaluateConfig
    from bksdm_ext.job import JobFolder
    from bksdm_ext.timings import bench

    config = EvaluateConfig(models=[str(m) for m in models], prompts=str(write_prompts(tmp_path / "p.txt", 3)),
                            metrics="teacher-distance", **TINY)
    config.validate()
    folder = JobFolder(tmp_path / "job")
    made = []
    real_call = bench.Generator.__call__

    def counting(self, protocol, seed, init_image=None, prompts=None):
        out = real_call(self, protocol, seed, init_image, prompts)
        made.extend(seed)
        if len(made) == 3 and not resumed:
            folder.request_cancel()
        return out

    resumed = False
    monkeypatch.setattr(bench.Generator, "__call__", counting)
    assert evaluate_run.run(config, folder.root) == "cancelled"
    assert folder.read_progress().state == "cancelled" and folder.has_checkpoint()
    done = sorted((folder.root / "images").rglob("*.png"))
    assert len(done) == 3 and made == [1234, 1235, 1236]
    stamps = {p: p.stat().st_mtime_ns for p in done}
    folder.clear_cancel()
    resumed = True
    assert evaluate_run.run(config, folder.root, "latest") == "done"
    assert len(made) == 6 and made[3:] == [1234, 1235, 1236]  # only the student's images were generated
    assert {p: p.stat().st_mtime_ns for p in done} == stamps
    results = json.loads((folder.root / "results.json").read_text())
    assert results["models"][0]["pixel_mse"] == 0 and results["models"][1]["pixel_mse"] > 0

    # image 1 of the student is what the benchmark's engine makes at its seed and prompt
    pipe = bench.load_pipeline(models[1])
    protocol = config.protocol()
    images, _ = bench.Generator(pipe)(protocol, [1235], prompts=["a photo of thing number 1"])
    expected = np.asarray(Image.fromarray(images[0].permute(1, 2, 0).numpy()))
    assert np.array_equal(np.asarray(Image.open(folder.root / "images" / "m1" / "00001.png")), expected)

    # a changed protocol is not mixed with old images: a resume regenerates them
    before = len(made)
    changed = EvaluateConfig.from_dict({**config.to_dict(), "steps": 3})
    evaluate_run.run(changed, folder.root, "latest")
    assert len(made) == before + 6


def test_cli_prints_the_table_and_the_history_lists_every_evaluation(models, weights, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.txt", 2)
    base = [str(models[0]), str(models[1]), "--prompts", str(prompts), "--resolution", "64", "--eval-size", "64",
            "--steps", "2", "--device", "cpu", "--grid-prompts", "0"]
    for name in ("first", "second"):
        assert main(["evaluate", *base, "--metrics", "is,teacher-distance", "--inception", weights["inception"],
                     "--job-dir", str(tmp_path / "jobs" / name)]) == 0
    out = capsys.readouterr().out
    assert "N = 2 images per model" in out and "pixel MSE vs teacher" in out
    assert "For reference only (published in the BK-SDM paper" in out and "paper: BK-SDM-Small" in out
    assert main(["evaluations", str(tmp_path / "jobs"), "--csv", str(tmp_path / "history.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("bk-small") == 2 and out.count("first") == 2 and out.count("second") == 2
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 5

    assert main(["fid-stats", weights["reference"], str(tmp_path / "ref.npz"), "--inception",
                 weights["inception"]]) == 0
    assert "statistics of 5 images" in capsys.readouterr().out

    # missing weights: one message naming the file, before any image is generated
    assert main(["evaluate", *base, "--metrics", "is", "--inception", str(tmp_path / "none"),
                 "--job-dir", str(tmp_path / "jobs" / "third")]) == 2
    err = capsys.readouterr().err
    assert "inception-2015-12-05.pt are missing: download https://" in err and err.count("\n") == 1
    assert not (tmp_path / "jobs" / "third").exists()


def test_bad_settings_are_refused_before_a_job_exists(models, tmp_path):
    evaluate = kinds.get("evaluate")
    teacher = str(models[0])
    for values, message in (
            ({"models": []}, "at least one model"),
            ({"models": [str(tmp_path / "nowhere")]}, "does not exist"),
            ({"models": [teacher]}, "No metric to compute"),
            ({"models": [teacher], "metrics": "fid,lpips"}, "Unknown metric"),
            ({"models": [teacher], "metrics": "teacher-distance"}, "give two models"),
            ({"models": [teacher], "metrics": "clip"}, "CLIP score needs open_clip weights"),
            ({"models": [teacher], "metrics": "fid", "inception": str(tmp_path)}, "are missing"),
            ({"models": [teacher, teacher], "sampler": "LMS"}, "sampler must be one of")):
        with pytest.raises(BKSDMError, match=message):
            evaluate.build_config(values)


def test_the_tab_form_and_the_cli_come_from_the_same_settings():
    from bksdm_ext import cli, job_config
    from bksdm_ext.evaluate.config import EvaluateConfig
    from bksdm_ext.ui.tab import form_fields

    fields = [f.name for f in form_fields(EvaluateConfig)]
    assert fields[0] == "models" and set(fields) == {s.name for s in EvaluateConfig.settings()}
    for s in EvaluateConfig.settings():
        assert s.labelled and s.group in job_config.GROUPS, s.name
    args = cli.build_parser().parse_args(["evaluate", "teacher", "student", "--limit", "5", "--metrics", "fid,is"])
    assert (args.setting_models, args.setting_limit, args.setting_metrics) == (["teacher", "student"], 5, "fid,is")


# --- a training job's checkpoints, evaluated directly ---------------------------------------------


@pytest.fixture(scope="module")
def distilled(tiny_pipeline_v1, tmp_path_factory):
    """A tiny distill job run to the end through the runner: checkpoints step-2 and step-4, and its output."""
    from jobs_helpers import tiny_distill_values, write_tiny_dataset

    root = tmp_path_factory.mktemp("distilled")
    runner = make_runner(root / "data", kinds={"distill": kinds.get("distill"), "evaluate": kinds.get("evaluate")})
    values = {**tiny_distill_values(tiny_pipeline_v1, write_tiny_dataset(root / "dataset"), steps=4),
              "sample_every": 0, "ema_decay": 0.5}
    try:
        job = wait_for(runner, runner.submit("distill", values).id, ("done", "failed"), timeout=300)
        assert job.state == "done", runner.log_tail(job.id)
        yield runner, Path(job.folder)
    finally:
        runner.close()


def test_a_distill_jobs_checkpoints_are_evaluated_one_by_one_beside_its_teacher(distilled, tiny_pipeline_v1,
                                                                                 weights, tmp_path):
    runner, job_dir = distilled
    assert [p.name for p in JobFolder(job_dir).complete_checkpoints()] == ["step-2", "step-4"]
    output = next(p for p in (job_dir / "output").iterdir() if p.is_dir())  # the exported (EMA) student
    values = {"models": [str(tiny_pipeline_v1), str(job_dir), str(output)],
              "prompts": str(write_prompts(tmp_path / "p.txt", 3)), "metrics": "is,teacher-distance",
              "inception": weights["inception"], **TINY}
    evaluation = wait_for(runner, runner.submit("evaluate", values).id, ("done", "failed"), timeout=300)
    assert evaluation.state == "done", runner.log_tail(evaluation.id)
    folder = Path(evaluation.folder)
    results = json.loads((folder / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == [tiny_pipeline_v1.name, f"{job_dir.name} step-2", f"{job_dir.name} step-4", output.name]
    teacher, step2, step4, exported = results["models"]
    assert teacher["role"] == "teacher" and teacher["pixel_mse"] == 0
    assert {step2["layout"], step4["layout"]} == {"tiny"} and step2["source"] == str(job_dir / "checkpoints/step-2")
    assert step2["pixel_mse"] > 0 and step4["pixel_mse"] > 0 and step2["pixel_mse"] != step4["pixel_mse"]
    assert step2["hash"] != step4["hash"] and all(m["is"] >= 1 for m in results["models"])
    # the last checkpoint is the model the job exported: its EMA weights in the teacher's pipeline
    assert step4["pixel_mse"] == pytest.approx(exported["pixel_mse"], abs=0)
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(folder / "images" / "m2" / f"{i:05d}.png")),
                              np.asarray(Image.open(folder / "images" / "m3" / f"{i:05d}.png")))
    assert "with the EMA weights of" in runner.log_tail(evaluation.id, 1 << 20)

    # one checkpoint named directly; the history names each checkpoint of each evaluation
    values = {**values, "models": [str(tiny_pipeline_v1), str(job_dir / "checkpoints" / "step-2")]}
    second = wait_for(runner, runner.submit("evaluate", values).id, ("done", "failed"), timeout=300)
    assert second.state == "done", runner.log_tail(second.id)
    again = json.loads((Path(second.folder) / "results.json").read_text())["models"][1]
    assert again["name"] == f"{job_dir.name} step-2" and again["pixel_mse"] == step2["pixel_mse"]
    assert main(["evaluations", str(runner.data_dir / "jobs")]) == 0
    from bksdm_ext.evaluate import results as results_module

    rows = results_module.history([runner.data_dir / "jobs"])
    assert [r["model"] for r in rows if r["role"] == "student"] == [
        f"{job_dir.name} step-2", f"{job_dir.name} step-4", output.name, f"{job_dir.name} step-2"]


def test_a_folder_that_is_no_model_nor_a_complete_checkpoint_is_refused_in_one_line(distilled, tiny_pipeline_v1,
                                                                                     tmp_path):
    import shutil

    _, job_dir = distilled
    evaluate = kinds.get("evaluate")
    teacher = str(tiny_pipeline_v1)
    partial = job_dir / "checkpoints" / ".tmp-step-6"
    shutil.copytree(job_dir / "checkpoints" / "step-4", partial)
    (partial / "state.json").unlink()
    unfinished = tmp_path / "other" / "checkpoints" / "step-9"
    shutil.copytree(job_dir / "checkpoints" / "step-2", unfinished)
    shutil.copy(job_dir / "config.toml", tmp_path / "other" / "config.toml")
    (unfinished / "state.json").unlink()
    empty = tmp_path / "empty-job"
    empty.mkdir()
    shutil.copy(job_dir / "config.toml", empty / "config.toml")
    convert = tmp_path / "convert-job"
    convert.mkdir()
    (convert / "config.toml").write_text('kind = "convert"\n')
    plain = tmp_path / "plain"
    plain.mkdir()
    try:
        for model, message in ((partial, "not completely written"), (unfinished, "not completely written"),
                               (empty, "has no complete checkpoint yet"), (convert, "is a convert job folder"),
                               (plain, "neither a diffusers pipeline folder")):
            with pytest.raises(BKSDMError, match=message) as caught:
                evaluate.build_config({"models": [teacher, str(model)], "metrics": "teacher-distance"})
            assert "\n" not in str(caught.value)
        # the job's folder expands to complete checkpoints only, and its checkpoints/ folder means the same
        config = evaluate.build_config({"models": [teacher, str(job_dir / "checkpoints")]})
        assert config.model_count() == 3 and config.metric_names() == ("teacher-distance",)
        from bksdm_ext.evaluate.sources import expand

        assert expand([teacher, str(job_dir)]) == [teacher, *(str(job_dir / "checkpoints" / s)
                                                              for s in ("step-2", "step-4"))]
        # a checkpoint removed after the list was made (a running job keeps its newest few): said so
        from bksdm_ext.evaluate.sources import load

        with pytest.raises(BKSDMError, match="is gone"):
            load(str(job_dir / "checkpoints" / "step-99"), "cpu")
    finally:
        shutil.rmtree(partial)


def _diffusers_weights(component: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(component.glob("*.safetensors"))))


@pytest.mark.parametrize("kind", ["dreambooth-full", "dreambooth-lora", "lcm-lora"])
def test_dreambooth_and_lcm_checkpoints_load_as_the_model_their_job_exports(kind, tiny_pipeline_v1, tmp_path,
                                                                           one_thread):
    """The pipeline of a job's last checkpoint holds what the job exported: the fine-tuned U-Net and text encoder,
    or the base model with the job's LoRA adapters (the same numbers as its diffusers LoRA file)."""
    import torch
    from train_helpers import small_settings, write_images

    from bksdm_ext.evaluate import sources
    from bksdm_ext.timings import bench
    from bksdm_ext.train import dreambooth, lcm_distill
    from bksdm_ext.train.config import DreamBoothConfig
    from bksdm_ext.train.lcm_distill import LcmConfig

    job = tmp_path / "job"
    common = small_settings(max_steps=2, checkpoint_every=2, learning_rate=1e-2, sample_prompts=[], lora_rank=4,
                            lora_alpha=4.0, train_batch_size=1)
    if kind.startswith("dreambooth"):
        mode = kind.split("-")[1]
        config = DreamBoothConfig(base_model=str(tiny_pipeline_v1), mode=mode, output_name="dog",
                                  prior_preservation=False, text_lora_rank=4, text_lora_alpha=4.0,
                                  instance_data=str(write_images(tmp_path / "photos", 2, metadata=False)), **common)
        train = dreambooth.train
    else:
        config = LcmConfig(model=str(tiny_pipeline_v1), data=str(write_images(tmp_path / "data", 2)),
                           output_name="dog", **common)
        train = lcm_distill.train
    config.validate()
    assert train(config, job) == "done"
    config.save(JobFolder(job).config)  # as the runner and the CLI write it

    pipe = sources.load(str(job / "checkpoints" / "step-2"), "cpu")
    assert pipe.name == "job step-2" and pipe.layout == "sd"
    base = bench.load_pipeline(tiny_pipeline_v1, "cpu")
    if kind == "dreambooth-full":
        for part in ("unet", "text_encoder"):
            exported = _diffusers_weights(job / "output" / "dog" / part)
            loaded = getattr(pipe, part).state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in exported.items()), part
            assert any(not torch.equal(getattr(base, part).state_dict()[k], v) for k, v in exported.items()), part
    else:
        exported = _diffusers_weights(job / "output" / "dog-diffusers")
        loaded = {f"{part}.{k.replace('.default', '')}": v for part in ("unet", "text_encoder")
                  for k, v in getattr(pipe, part).state_dict().items() if "lora_" in k}
        assert set(exported) == set(loaded) and all(torch.equal(loaded[k], v) for k, v in exported.items())
        assert any(k.startswith("text_encoder.") for k in exported) == (kind == "dreambooth-lora")
    # and it generates through the benchmark's engine, unlike the base model
    protocol = EvaluateConfig(models=["x"], **{**TINY, "steps": 1}).protocol()
    image = bench.Generator(pipe)(protocol, [1], prompts=["a dog"])[0]
    assert not torch.equal(image, bench.Generator(base)(protocol, [1], prompts=["a dog"])[0])
