"""The evaluate form's models picker and the Jobs view's results of an evaluation, on stand-ins (no WebUI)."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
import pytest
from jobs_helpers import make_runner, tiny_distill_values, write_tiny_dataset
from PIL import Image
from test_tab_forms import OWN, by_id, handler

from bksdm_ext import kinds
from bksdm_ext.evaluate import results
from bksdm_ext.evaluate.config import EvaluateConfig
from bksdm_ext.job import JobFolder
from bksdm_ext.jobs.guard import AccessGuard
from bksdm_ext.ui.app import known_checkpoints
from bksdm_ext.ui.tab import TabContext, build_tab, evaluation_view, job_models, pick_models


@pytest.fixture
def held(tmp_path):
    """A runner whose GPU queue holds every job (no GPU slot): jobs stay queued, their folders written."""
    r = make_runner(tmp_path / "data", kinds=kinds.all(), max_gpu_jobs=0)
    yield r
    r.close()


def distill_job_with_checkpoints(runner, teacher, tmp_path, steps=(2, 4)):
    """A (held) distill job of the runner whose folder has complete checkpoints, and a half-written one."""
    job = runner.submit("distill", tiny_distill_values(teacher, write_tiny_dataset(tmp_path / "dataset")))
    folder = JobFolder(job.folder)
    for step in steps:
        folder.checkpoint_dir(step).mkdir(parents=True)
        (folder.checkpoint_dir(step) / "state.json").write_text("{}")
    folder.partial_checkpoint_dir(6).mkdir()
    return job, folder


def test_the_models_picker_adds_checkpoints_and_jobs_in_order_and_launches_their_paths(held, tiny_pipeline_v1,
                                                                                      tmp_path):
    runner = held
    models = runner.data_dir / "models"
    models.mkdir()
    (models / "teacher").symlink_to(tiny_pipeline_v1, target_is_directory=True)
    job, folder = distill_job_with_checkpoints(runner, tiny_pipeline_v1, tmp_path)
    assert job_models(runner) == {f"job {job.id}: each checkpoint": str(folder.root),
                                  f"job {job.id}: step-2": str(folder.checkpoint_dir(2)),
                                  f"job {job.id}: step-4": str(folder.checkpoint_dir(4))}  # never .tmp-step-6
    context = TabContext(runner, AccessGuard(), checkpoints=lambda refresh=False: known_checkpoints(runner))
    tab = build_tab(context)
    box, picker = by_id(tab, "bksdm_evaluate_models"), by_id(tab, "bksdm_evaluate_models_pick")
    assert isinstance(box, gr.Textbox) and "first line is the teacher" in box.info and "teacher" in box.label
    assert picker.multiselect and picker.choices[0] == "models/teacher"
    assert f"job {job.id}: each checkpoint" in picker.choices
    # picking adds titles in the order picked; unpicking removes them; a typed path stays where it is
    pick = handler(tab, "bksdm_evaluate_models_pick", "input")
    text, before = pick("", ["models/teacher"], [])
    text, before = pick(text + "\n/typed/student", [*before, f"job {job.id}: each checkpoint"], before)
    text, before = pick(text, [*before, f"job {job.id}: step-2"], before)
    assert text.splitlines() == ["models/teacher", "/typed/student", f"job {job.id}: each checkpoint",
                                 f"job {job.id}: step-2"]
    text, before = pick(text, ["models/teacher", f"job {job.id}: each checkpoint"], before)
    assert text.splitlines() == ["models/teacher", "/typed/student", f"job {job.id}: each checkpoint"]
    assert pick_models("a\nb", ["b"], []) == "a\nb"  # a title picked again is not repeated
    # launched: the titles become their paths, in order, the teacher first
    fields = EvaluateConfig.settings()
    raw = [s.default if s.type not in ("list", "tuple") else "\n".join(s.default) for s in fields]
    raw[[s.name for s in fields].index("models")] = text.replace("/typed/student\n", "")
    message, launched = handler(tab, "bksdm_launch_evaluate")(OWN, *raw)
    assert launched, message
    config = EvaluateConfig.load(JobFolder(runner.get(launched).folder).config)
    assert config.models == [str(models / "teacher"), str(folder.root)]
    assert config.model_count() == 3 and config.metric_names() == ("teacher-distance",)
    # a typed path that is no model is refused in one line, naming what it can be
    raw[[s.name for s in fields].index("models")] = f"models/teacher\n{tmp_path}"
    message, launched = handler(tab, "bksdm_launch_evaluate")(OWN, *raw)
    assert not launched and "neither a diffusers pipeline folder" in message and "checkpoints/step-N" in message
    assert handler(tab, "bksdm_evaluate_models_refresh")(OWN)["choices"] == [*known_checkpoints(runner),
                                                                             *job_models(runner)]


def finished_evaluation(runner, teacher, name_suffix=""):
    """A done evaluate job of the runner, its results written by `evaluate.results` (its images stand in)."""
    values = {"models": [str(teacher), str(teacher)], "metrics": "teacher-distance", "eval_size": 16,
              "grid_prompts": 2, "seed": len(name_suffix)}
    job = runner.submit("evaluate", values)
    folder, config = JobFolder(job.folder), EvaluateConfig.from_dict(values)
    for k in range(2):
        for i in range(2):
            path = folder.root / "images" / f"m{k}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 40 * k + 10 * i, np.uint8)).save(path)
        (folder.root / "images" / f"m{k}" / "model.json").write_text(json.dumps(
            {"name": ("sd", "distill-x step-200" + name_suffix)[k], "layout": ("sd", "small")[k]}))
    scores = {"models": [{"images": 2, "pixel_mse": 0.0}, {"images": 2, "pixel_mse": 0.0123}], "reference": None}
    table = results.write_results(config, folder, ["a cat", "a dog"], scores)
    runner.store.update(job.id, state="done", message="Done.")
    return job, folder, table


def test_a_finished_evaluation_shows_its_table_grid_csv_and_the_history(held, tiny_pipeline_v1, tmp_path):
    runner = held
    job, folder, table = finished_evaluation(runner, tiny_pipeline_v1)
    view = evaluation_view(folder.root, [runner.jobs_dir])
    assert "N = 2 images per model" in view.table and "PNDM, 25 steps, CFG 7.5" in view.table
    assert "distill-x step-200 (student)" in view.table and "0.01230" in view.table
    assert "For reference only (published in the BK-SDM paper" in view.table and "paper: SD-v1.4" in view.table
    assert view.grid == str(folder.root / "grid.png") and view.csv == str(folder.root / "results.csv")
    assert "History of evaluations" in view.history and "distill-x step-200" in view.history
    # one source: the tab's tables are the CLI's (`bksdm evaluate` and `bksdm evaluations` print them)
    header, rows = results.model_table(table)
    assert all(cell in view.table for cell in header + rows[1])
    history_header, history_rows = results.history_table(results.history([runner.jobs_dir]))
    assert len(history_rows) == 2 and all(cell in view.history for cell in history_header + history_rows[1])

    # the Jobs view shows them for the selected finished evaluation, and hides them for any other job
    other = runner.submit("evaluate", {"models": [str(tiny_pipeline_v1)] * 2, "seed": 7})
    tab = build_tab(TabContext(runner, AccessGuard()))
    follow = next(fn.fn for fn in tab.fns if getattr(fn.fn, "__name__", "") == "follow")
    out = follow(job.id, {}, OWN)
    box, shown_table, grid, csv_file, history, seen = out[-6:]
    assert box["visible"] is True and shown_table == view.table and grid == view.grid and csv_file == view.csv
    assert history == view.history
    update = next(fn.fn for fn in tab.fns if getattr(fn.fn, "__name__", "") == "update")
    again = update(job.id, seen, OWN)
    assert again[-6:-1] == [gr.update()] * 5  # unchanged: not sent again
    out = update(other.id, seen, OWN)  # another job selected: the results go
    assert out[-6]["visible"] is False and out[-5] == "" and out[-4] is None
    # a second evaluation joins the history
    finished_evaluation(runner, tiny_pipeline_v1, name_suffix=" (again)")
    assert "step-200 (again)" in evaluation_view(folder.root, [runner.jobs_dir]).history
    assert evaluation_view(tmp_path, [runner.jobs_dir]) is None  # no results.json: nothing to show
