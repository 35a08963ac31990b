"""The job runner with real subprocesses running the tiny `count` job kind (tests/count_job.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from jobs_helpers import TESTS_DIR, make_runner, wait_for, wait_until

from bksdm_ext.errors import BKSDMError
from bksdm_ext import job_config as toml
from bksdm_ext.jobs import process
from bksdm_ext.kinds import Kind
from bksdm_ext.jobs.runner import LaunchSettings, job_command, job_marker
from bksdm_ext.jobs.store import JobStore

pytestmark = pytest.mark.slow


@pytest.fixture
def runner(tmp_path):
    runner = make_runner(tmp_path / "data")
    yield runner
    for job in runner.list():
        if job.state in ("running", "cancelling") and job.pid:
            os.killpg(job.pid, signal.SIGKILL)
    runner.close()


def test_queued_running_done_one_gpu_job_at_a_time(runner):
    first = runner.submit("count", {"steps": 4, "step_s": 0.1})
    second = runner.submit("count", {"steps": 3, "step_s": 0.1, "label": "second"})
    assert runner.get(first.id).state == "running"
    assert runner.get(second.id).state == "queued"  # the default policy: one GPU job at a time
    assert runner.get(second.id).message == "Waiting: 1 GPU job(s) running, 1 at a time."
    wait_for(runner, first.id, "done")
    wait_for(runner, second.id, "running")
    done = wait_for(runner, second.id, "done")
    folder = Path(done.folder)
    assert toml.read_toml(folder / "config.toml") == {"kind": "count", "steps": 3, "step_s": 0.1, "checkpoint_every": 2,
                                                 "label": "second", "ignore_cancel": False, "spawn_child": False}
    progress = runner.progress(second.id)
    assert (progress["state"], progress["step"], progress["total_steps"]) == ("done", 3, 3)
    assert (folder / "output" / "result.txt").read_text() == "3"
    assert "count: step 3" in runner.log_tail(second.id)
    assert [s.name for s in runner.samples(second.id)] == ["step-000001.png", "step-000002.png", "step-000003.png"]
    # the loss terms are those progress.json names: `lr` in losses.csv is not one
    assert sorted({term for _, term, _ in runner.losses(second.id)}) == ["kd_out", "task"]
    assert (3, "task", 0.25) in runner.losses(second.id)
    assert done.attempts == 1 and done.resumable == 0 and done.finished >= done.started


def test_cancel_keeps_a_checkpoint_and_resume_finishes(runner):
    job = runner.submit("count", {"steps": 40, "step_s": 0.1, "checkpoint_every": 100})
    wait_until(lambda: runner.progress(job.id).get("step", 0) >= 3, what="3 steps")
    assert runner.cancel(job.id).state == "cancelling"
    cancelled = wait_for(runner, job.id, "cancelled")
    assert cancelled.resumable == 1 and cancelled.terminate_sent is None  # it stopped by itself
    stopped_at = runner.progress(job.id)["step"]
    assert (Path(job.folder) / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    assert not (Path(job.folder) / "cancel").exists()

    runner.resume(job.id)
    runner.resume(job.id)  # a second click changes nothing
    done = wait_for(runner, job.id, "done")
    assert done.attempts == 2
    assert f"count: starting at step {stopped_at} of 40" in runner.log_tail(job.id)
    assert runner.progress(job.id)["step"] == 40


def test_sigkilled_job_is_interrupted_and_resumable(runner):
    job = runner.submit("count", {"steps": 30, "step_s": 0.1, "checkpoint_every": 2})
    wait_until(lambda: runner.progress(job.id).get("last_checkpoint"), what="a checkpoint")
    os.kill(runner.get(job.id).pid, signal.SIGKILL)
    interrupted = wait_for(runner, job.id, ("interrupted", "failed"))
    assert interrupted.state == "interrupted" and interrupted.resumable == 1
    assert "SIGKILL" in interrupted.message
    runner.resume(job.id)
    assert wait_for(runner, job.id, "done").attempts == 2
    assert "count: starting at step 0" not in runner.log_tail(job.id).split("=== attempt 2")[1]


def test_killed_before_any_checkpoint_is_failed(runner):
    job = runner.submit("count", {"steps": 30, "step_s": 0.5, "checkpoint_every": 100})
    wait_until(lambda: runner.progress(job.id).get("state") == "running", what="the job to start")
    os.kill(runner.get(job.id).pid, signal.SIGKILL)
    failed = wait_for(runner, job.id, ("interrupted", "failed"))
    assert failed.state == "failed" and failed.resumable == 0 and "see log.txt" in failed.message
    assert runner.resume(job.id).attempts == 2  # started over, without --resume
    assert "--resume" not in runner.log_tail(job.id).split("=== attempt 2")[1].splitlines()[0]


def test_a_job_that_ignores_cancel_is_killed_with_its_whole_tree(runner):
    job = runner.submit("count", {"steps": 1000, "step_s": 0.1, "ignore_cancel": True, "spawn_child": True})
    child_file = Path(job.folder) / "child.pid"
    wait_until(child_file.exists, what="the grandchild")
    child = psutil.Process(int(child_file.read_text()))
    t0 = time.time()
    runner.cancel(job.id)
    cancelled = wait_for(runner, job.id, "cancelled")
    # grace (2 s), SIGTERM ignored, kill after 1 s more
    assert cancelled.terminate_sent is not None and time.time() - t0 >= 3.0
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10, "the grandchild to die")


def _start_job_with_worker(runner):
    """A job whose launcher started a worker in a session of its own; (job, launcher pid, worker)."""
    job = runner.submit("count", {"steps": 1000, "step_s": 0.1, "spawn_child": True})
    child_file = Path(job.folder) / "child.pid"
    wait_until(child_file.exists, what="the grandchild")
    return job, runner.get(job.id).pid, psutil.Process(int(child_file.read_text()))


def _gone(proc):
    return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def _kill_if_left(proc):
    try:
        if proc.is_running():
            proc.kill()
    except psutil.Error:
        pass


def test_workers_outliving_a_killed_job_are_killed(runner):
    job, launcher, child = _start_job_with_worker(runner)
    try:
        runner.poll()  # the runner sees the job's tree while it runs
        os.kill(launcher, signal.SIGKILL)  # the launcher dies; its worker, in its own session, not
        wait_for(runner, job.id, ("interrupted", "failed"))
        wait_until(lambda: _gone(child), 10, "the orphan to die")
    finally:
        _kill_if_left(child)


def test_a_poll_between_the_launchers_death_and_its_reaping_keeps_the_tree(runner):
    # The kernel hands a dying process's children to init before waitpid reports it: a poll in that
    # window sees the launcher alive with no descendants. Made certain here by holding the reaping back.
    job, launcher, child = _start_job_with_worker(runner)
    try:
        runner.poll()
        proc = runner._procs[job.id]
        real_poll, held = proc.poll, [True]

        def poll_once_too_early():
            if held:
                held.pop()
                return None  # what waitpid answers while the kernel is still tearing the launcher down
            return real_poll()

        proc.poll = poll_once_too_early
        os.kill(launcher, signal.SIGKILL)
        wait_until(lambda: psutil.Process(launcher).status() == psutil.STATUS_ZOMBIE, 10, "the launcher to exit")
        assert child.ppid() != launcher  # already handed over to init (or a subreaper)
        runner.poll()  # "alive", no descendants
        assert runner.get(job.id).state == "running"
        wait_for(runner, job.id, ("interrupted", "failed"))
        wait_until(lambda: _gone(child), 10, "the orphan to die")
    finally:
        _kill_if_left(child)


def test_the_background_thread_kills_workers_outliving_a_killed_job(runner):
    runner.start()  # no poll from the test: the runner's own thread captures the tree and notices the death
    job, launcher, child = _start_job_with_worker(runner)
    try:
        wait_until(lambda: child in runner._trees.get(job.id, []), 10, "the runner to see the worker")
        os.kill(launcher, signal.SIGKILL)
        wait_for(runner, job.id, ("interrupted", "failed"), poll=False)
        wait_until(lambda: _gone(child), 10, "the orphan to die")
    finally:
        _kill_if_left(child)


def _exited(pid):
    """The process is a zombie or gone: its children already belong to init."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleeper(**env):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={**os.environ, **env})


def test_a_worker_whose_launcher_dies_before_any_poll_is_killed(runner):
    # submit's poll started the job; no poll has run since, so the runner never saw the worker
    job, launcher, child = _start_job_with_worker(runner)
    try:
        assert child.environ()[process.MARKER_ENV] == job_marker(job.id, 1, runner.get(job.id).started)
        assert process.MARKER_ENV not in os.environ  # the runner's own process never carries it
        os.kill(launcher, signal.SIGKILL)
        wait_until(lambda: _exited(launcher), 10, "the launcher to exit")  # the worker is init's now
        assert runner._trees.get(job.id) is None
        wait_for(runner, job.id, ("interrupted", "failed"))
        wait_until(lambda: _gone(child), 10, "the orphan to die")
    finally:
        _kill_if_left(child)


def test_a_finished_job_stops_only_what_carries_its_own_marker(runner):
    job = runner.submit("count", {"steps": 3, "step_s": 0.2, "spawn_child": True})
    launcher, child_file = runner.get(job.id).pid, Path(job.folder) / "child.pid"
    wait_until(child_file.exists, what="the grandchild")
    child, others = psutil.Process(int(child_file.read_text())), []
    try:
        marker = child.environ()[process.MARKER_ENV]
        job_id, attempt, started = marker.split(":")
        for value in (f"{job_id}:{int(attempt) + 1}:{started}",  # the next launch of the same job (a resume)
                      f"count-20200101-000000-abcd:{attempt}:{started}",  # another job
                      marker + "0", marker[:-1]):  # a longer and a shorter value
            others.append(_sleeper(**{process.MARKER_ENV: value}))
        others.append(_sleeper(OTHER_VARIABLE=marker))
        wait_until(lambda: _exited(launcher), 30, "the job to finish")  # before the runner polls again
        assert wait_for(runner, job.id, ("done", "failed", "interrupted")).state == "done"
        wait_until(lambda: _gone(child), 10, "the worker it left to die")
        assert [other.poll() for other in others] == [None] * 5
    finally:
        _kill_if_left(child)
        for other in others:
            other.kill()
            other.wait()


PARENT = """
import sys, time
sys.path.insert(0, {tests!r})
from jobs_helpers import make_runner
runner = make_runner({data!r})
job = runner.submit("count", {values!r})
print(job.id, flush=True)
runner.start()
time.sleep(600)
"""


def _start_parent(data, **values):
    values = {"step_s": 0.1, "checkpoint_every": 2, **values}
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(tests=TESTS_DIR, data=str(data), values=values)],
                              stdout=subprocess.PIPE, text=True)
    return parent, parent.stdout.readline().strip()


def test_restarted_parent_reattaches_to_a_running_job(tmp_path):
    parent, job_id = _start_parent(tmp_path / "data", steps=25)
    store = JobStore(tmp_path / "data" / "jobs.sqlite3")
    wait_until(lambda: store.get(job_id).pid, what="the job to start")
    parent.kill()  # the WebUI dies; the job, in its own session, goes on
    parent.wait()
    pid = store.get(job_id).pid
    assert psutil.pid_exists(pid)

    runner = make_runner(tmp_path / "data")
    try:
        runner.poll()
        assert runner.get(job_id).state == "running"  # same pid, same start time: re-attached
        done = wait_for(runner, job_id, "done")
        assert done.attempts == 1 and runner.progress(job_id)["step"] == 25
    finally:
        runner.close()


def test_restarted_parent_marks_a_vanished_job_interrupted(tmp_path):
    parent, job_id = _start_parent(tmp_path / "data", steps=200)
    store = JobStore(tmp_path / "data" / "jobs.sqlite3")
    folder = Path(tmp_path / "data" / "jobs" / job_id)
    wait_until(lambda: (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()), what="checkpoint")
    parent.kill()
    parent.wait()
    os.killpg(store.get(job_id).pid, signal.SIGKILL)  # the job dies while no one watches
    wait_until(lambda: not psutil.pid_exists(store.get(job_id).pid)
               or psutil.Process(store.get(job_id).pid).status() == psutil.STATUS_ZOMBIE, what="the job to die")

    runner = make_runner(tmp_path / "data")
    try:
        runner.poll()
        job = runner.get(job_id)
        assert (job.state, job.resumable) == ("interrupted", 1)
        assert "while no runner was watching" in job.message
        runner.resume(job_id)
        wait_until(lambda: runner.progress(job_id).get("step", 0) > 4, what="progress after resume")
        runner.cancel(job_id)
        assert wait_for(runner, job_id, "cancelled").attempts == 2
    finally:
        runner.close()


def test_a_restarted_runner_kills_the_orphan_of_a_launcher_that_dies_before_its_first_poll(tmp_path):
    parent, job_id = _start_parent(tmp_path / "data", steps=1000, spawn_child=True)
    store = JobStore(tmp_path / "data" / "jobs.sqlite3")
    child_file = tmp_path / "data" / "jobs" / job_id / "child.pid"
    child = runner = None
    try:
        wait_until(child_file.exists, what="the grandchild")
        child = psutil.Process(int(child_file.read_text()))
        parent.kill()  # the WebUI dies, and with it the tree its runner had captured
        parent.wait()
        runner = make_runner(tmp_path / "data")
        assert runner.get(job_id).state == "running"
        os.kill(store.get(job_id).pid, signal.SIGKILL)  # the launcher dies before the new runner's first poll
        wait_until(lambda: _exited(store.get(job_id).pid), 10, "the launcher to exit")
        runner.poll()
        assert runner.get(job_id).state in ("interrupted", "failed")
        wait_until(lambda: _gone(child), 10, "the orphan to die")
    finally:
        parent.kill()
        parent.wait()
        if child is not None:
            _kill_if_left(child)
        pid = store.get(job_id).pid
        if pid and not _exited(pid):
            os.killpg(pid, signal.SIGKILL)
        store.close()
        if runner is not None:
            runner.close()


def test_two_launches_of_the_same_form_make_one_job(runner):
    values = {"steps": 2, "step_s": 0.05}
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(runner.submit("count", values).id)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(runner.list()) == 1
    # a client's request id makes retries safe beyond the window; different ids are different jobs
    a = runner.submit("count", {"steps": 3}, request_id="req-a")
    assert runner.submit("count", {"steps": 3}, request_id="req-a").id == a.id
    assert runner.submit("count", {"steps": 3}, request_id="req-b").id != a.id
    assert len(runner.list()) == 3


def test_invalid_config_is_refused_before_any_job_exists(runner):
    with pytest.raises(BKSDMError, match="steps must be at least 1"):
        runner.submit("count", {"steps": 0})
    with pytest.raises(BKSDMError, match="Unknown count settings: bogus"):
        runner.submit("count", {"bogus": 1})
    with pytest.raises(BKSDMError, match="Unknown job kind 'nope'"):
        runner.submit("nope", {})
    assert runner.list() == []


def test_delete_refuses_running_jobs_and_removes_finished_ones(runner):
    job = runner.submit("count", {"steps": 100, "step_s": 0.1})
    with pytest.raises(BKSDMError, match="cancel it"):
        runner.delete(job.id)
    runner.cancel(job.id)
    wait_for(runner, job.id, "cancelled")
    runner.delete(job.id)
    assert not Path(job.folder).exists() and runner.list() == []
    with pytest.raises(BKSDMError, match="no job"):
        runner.get(job.id)


def test_relaunch_runs_the_edited_config_toml(runner):
    job = runner.submit("count", {"steps": 2, "step_s": 0.05})
    wait_for(runner, job.id, "done")
    config = toml.read_toml(Path(job.folder) / "config.toml")
    toml.write_toml(Path(job.folder) / "config.toml", {**config, "steps": 3})
    again = wait_for(runner, runner.relaunch(job.id).id, "done")
    assert again.id != job.id and runner.progress(again.id)["step"] == 3


def test_vram_handoff_hooks_run_around_the_gpu_queue(tmp_path):
    events = []

    def before():
        events.append(("before", [j.state for j in runner.list()], any(
            (Path(j.folder) / "progress.json").exists() for j in runner.list())))

    def after():
        events.append(("after", sorted(j.state for j in runner.list()), None))

    ticks = []  # while unloaded, each tick may take back what a generation brought to the GPU

    runner = make_runner(tmp_path / "data", vram_handoff=True, before_gpu_job=before, after_queue_empty=after,
                         during_handoff=lambda: ticks.append(runner.handoff_active))
    try:
        a = runner.submit("count", {"steps": 3, "step_s": 0.1})
        assert runner.handoff_active
        b = runner.submit("count", {"steps": 2, "step_s": 0.1})
        wait_for(runner, a.id, "done")
        wait_for(runner, b.id, "done")
        runner.poll()
        # unloaded once before the first job's process started, reloaded once when both had finished
        assert events == [("before", ["queued"], False), ("after", ["done", "done"], None)]
        assert not runner.handoff_active
        assert ticks and all(ticks)  # called on the ticks between, never after the reload
        count = len(ticks)
        runner.poll()
        assert len(ticks) == count
    finally:
        runner.close()

    nothing = []  # a hook with nothing to unload (no CUDA) says so: no reload, no "unloaded" banner
    cpu = make_runner(tmp_path / "cpu", vram_handoff=True, before_gpu_job=lambda: nothing.append(1) or False,
                      after_queue_empty=lambda: nothing.append(2))
    try:
        job = cpu.submit("count", {"steps": 1, "step_s": 0.05})
        assert not cpu.handoff_active
        wait_for(cpu, job.id, "done")
        cpu.poll()
        assert nothing == [1]
    finally:
        cpu.close()

    calls = []
    off = make_runner(tmp_path / "off", before_gpu_job=lambda: calls.append(1), after_queue_empty=lambda: calls.append(2))
    try:
        wait_for(off, off.submit("count", {"steps": 1, "step_s": 0.05}).id, "done")
        off.poll()
        assert calls == []  # the setting is off
    finally:
        off.close()


def test_a_failing_unload_fails_the_job_with_a_message(tmp_path):
    def refuse():
        raise RuntimeError("model is busy")

    runner = make_runner(tmp_path / "data", vram_handoff=True, before_gpu_job=refuse)
    try:
        job = runner.submit("count", {"steps": 1})
        assert (job.state, job.message) == ("failed", "Could not free the GPU for this job (model is busy).")
    finally:
        runner.close()


def test_background_thread_drives_the_queue(tmp_path):
    runner = make_runner(tmp_path / "data").start()
    try:
        job = runner.submit("count", {"steps": 2, "step_s": 0.05})
        assert wait_for(runner, job.id, "done", poll=False).state == "done"
    finally:
        runner.close()


def test_accelerate_command_for_several_processes_parses():
    from accelerate.commands.launch import launch_command_parser

    kind = Kind("distill", "Distillation", "x:Y", "x:run")
    single = job_command(kind, Path("/jobs/a"), False, LaunchSettings())
    assert single == [sys.executable, "-m", "bksdm_ext.job", "distill", "--job-dir", "/jobs/a"]
    launch = LaunchSettings(num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                            extra_args=("--mixed_precision", "fp16"))
    command = job_command(kind, Path("/jobs/a"), True, launch)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])
    assert (args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip) == (4, 2, 1, "10.0.0.1")
    assert args.multi_gpu and args.module and args.mixed_precision == "fp16"
    assert (args.training_script, args.training_script_args) == (
        "bksdm_ext.job", ["distill", "--job-dir", "/jobs/a", "--resume", "latest"])
    # a job kind that needs no GPU never goes through accelerate
    convert = Kind("convert", "Convert", "x:Y", "x:run", gpu=False)
    assert job_command(convert, Path("/j"), False, launch)[1:3] == ["-m", "bksdm_ext.job"]


def test_progress_of_an_earlier_attempt_is_not_trusted(runner):
    job = runner.submit("count", {"steps": 50, "step_s": 0.1, "checkpoint_every": 1})
    wait_until(lambda: runner.progress(job.id).get("step", 0) >= 2, what="2 steps")
    runner.cancel(job.id)
    wait_for(runner, job.id, "cancelled")
    runner.resume(job.id)
    resumed = wait_for(runner, job.id, "running")
    wait_until(lambda: runner.get(job.id).pid, what="the new pid")
    os.kill(runner.get(job.id).pid, signal.SIGKILL)
    # progress.json may still say "cancelled" (first attempt) if the kill came early: not this attempt's end
    assert wait_for(runner, job.id, ("interrupted", "failed", "cancelled")).state == "interrupted"
    assert resumed.attempts == 2
