"""The runner with the real distillation job (bksdm_ext.train) on the tiny teacher: every state it can reach."""

import os
import signal
from pathlib import Path

import psutil
import pytest
from jobs_helpers import make_runner, tiny_distill_values, wait_for, wait_until, write_tiny_dataset

from bksdm_ext import kinds
from bksdm_ext.jobs.runner import LaunchSettings

pytestmark = pytest.mark.slow


@pytest.fixture
def runner(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all(), cancel_grace_s=60)
    yield runner
    for job in runner.list():
        if job.state in ("running", "cancelling") and job.pid:
            os.killpg(job.pid, signal.SIGKILL)
    runner.close()


def test_distill_killed_resumed_cancelled_resumed_done(runner, tiny_pipeline_v1, tmp_path):
    data = write_tiny_dataset(tmp_path / "dataset")
    job = runner.submit("distill", tiny_distill_values(tiny_pipeline_v1, data, steps=12))
    assert job.state == "running"
    folder = Path(job.folder)

    # SIGKILL once a checkpoint exists: interrupted, resumable
    wait_until(lambda: runner.progress(job.id).get("last_checkpoint"), 180, "the first checkpoint")
    os.kill(runner.get(job.id).pid, signal.SIGKILL)
    job = wait_for(runner, job.id, ("interrupted", "failed"))
    assert (job.state, job.resumable) == ("interrupted", 1), job.message

    # resume; cancel: the job checkpoints at its next step and says cancelled
    runner.resume(job.id)
    start = runner.get(job.id).started
    wait_until(lambda: runner.progress(job.id).get("updated", 0) > start
               and runner.progress(job.id).get("step", 0) >= 3, 180, "progress after resuming")
    runner.cancel(job.id)
    job = wait_for(runner, job.id, "cancelled", timeout=120)
    assert job.resumable == 1 and job.terminate_sent is None
    stopped = runner.progress(job.id)
    assert stopped["state"] == "cancelled" and stopped["step"] < 12
    assert (folder / "checkpoints" / Path(stopped["last_checkpoint"]).name / "state.json").is_file()

    # resume to the end
    runner.resume(job.id)
    job = wait_for(runner, job.id, "done", timeout=240)
    assert job.attempts == 3
    progress = runner.progress(job.id)
    assert (progress["step"], progress["total_steps"]) == (12, 12)
    log = runner.log_tail(job.id, 1 << 20)
    assert log.count("=== attempt") == 3 and "--resume latest" in log.split("=== attempt 3")[1].splitlines()[0]
    steps = sorted({step for step, _, _ in runner.losses(job.id)})
    assert steps == list(range(1, 13))  # one row per step across the three attempts, none repeated
    assert {term for _, term, _ in runner.losses(job.id)} >= {"task", "out_kd", "feat_kd"}
    assert runner.samples(job.id) and any((folder / "output").iterdir())


def test_two_rank_accelerate_job_cancels_as_one_tree(tiny_pipeline_v1, tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all(), launch=LaunchSettings(num_processes=2))
    try:
        data = write_tiny_dataset(tmp_path / "dataset")
        job = runner.submit("distill", tiny_distill_values(tiny_pipeline_v1, data, steps=200))
        wait_until(lambda: runner.progress(job.id).get("step", 0) >= 1, 180, "the first step")
        tree = psutil.Process(runner.get(job.id).pid).children(recursive=True)
        ranks = [p for p in tree if "bksdm_ext.job" in " ".join(p.cmdline())]
        assert len(ranks) == 2 and "on 2 process(es)" in runner.log_tail(job.id)
        runner.cancel(job.id)  # both ranks see the cancel file, checkpoint together and exit
        job = wait_for(runner, job.id, "cancelled", timeout=120)
        assert job.resumable == 1 and runner.progress(job.id)["state"] == "cancelled"
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), 30,
                   "both ranks to exit")
    finally:
        runner.close()


def test_dreambooth_cancelled_resumed_done(runner, tmp_path):
    from tiny import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "bk-small", "small", "v1")
    photos = write_tiny_dataset(tmp_path / "photos", count=2)
    (photos / "metadata.jsonl").unlink()  # DreamBooth takes a plain folder of the subject's photos
    values = {"base_model": str(base), "instance_data": str(photos), "output_name": "dog", "resolution": 64,
              "max_steps": 8, "checkpoint_every": 2, "sample_every": 0, "num_class_images": 2, "class_steps": 2,
              "mixed_precision": "no", "num_workers": 0, "log_every": 1, "channels_last": False,
              "sample_prompts": []}
    job = runner.submit("dreambooth", values)
    wait_until(lambda: runner.progress(job.id).get("last_checkpoint"), 180, "the first checkpoint")
    runner.cancel(job.id)
    job = wait_for(runner, job.id, "cancelled", timeout=120)
    stopped = runner.progress(job.id)["step"]
    assert job.resumable == 1 and 2 <= stopped < 8

    runner.resume(job.id)
    job = wait_for(runner, job.id, "done", timeout=300)
    assert job.attempts == 2 and runner.progress(job.id)["step"] == 8
    assert f"at step {stopped}" in runner.log_tail(job.id).split("=== attempt 2")[1]
    assert (Path(job.folder) / "output" / "dog.safetensors").is_file()
    assert {"instance", "prior"} <= {term for _, term, _ in runner.losses(job.id)}
