"""The job store and the config TOML writer."""

import math
import sqlite3
import time

import pytest

from bksdm_ext.errors import BKSDMError
from bksdm_ext import job_config as toml
from bksdm_ext.jobs.store import JobStore


def test_store_is_wal_and_survives_reopening(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, created = store.create("a", "count", str(tmp_path / "a"), {"steps": 1})
    assert created and job.state == "queued" and job.attempts == 0
    assert store.update("a", expect=("queued",), state="running", pid=123)
    assert not store.update("a", expect=("queued",), state="failed")  # only from the expected state
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite3")
    assert (again.get("a").state, again.get("a").pid) == ("running", 123)
    mode = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_same_config_within_the_window_is_the_same_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    first, _ = store.create("a", "count", "a", {"steps": 1, "x": [1, 2]})
    same, created = store.create("b", "count", "b", {"x": [1, 2], "steps": 1})  # key order does not matter
    assert (same.id, created) == ("a", False)
    other, created = store.create("c", "count", "c", {"steps": 2})
    assert created
    later, created = store.create("d", "count", "d", {"steps": 1, "x": [1, 2]}, dedupe_window_s=0.0)
    assert created  # outside the window a launch is a new job
    rid, _ = store.create("e", "count", "e", {"steps": 1, "x": [1, 2]}, request_id="r1")
    assert rid.id == "e" and store.create("f", "count", "f", {}, request_id="r1")[0].id == "e"


def test_a_corrupt_store_is_a_readable_error(tmp_path):
    (tmp_path / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(BKSDMError, match="cannot be opened.*Move it aside"):
        JobStore(tmp_path / "jobs.sqlite3")


def test_toml_round_trip(tmp_path):
    data = {
        "teacher": 'C:\\models\\sd "v1".safetensors', "steps": 3, "lr": 5e-05, "on": True, "off": False,
        "prompts": ["a cat", "ünïcode\ttab"], "nested": {"a": 1, "deep": {"b": [1.5, 2]}}, "empty": None,
        "big": math.inf, "key with space": "x",
    }
    toml.write_toml(tmp_path / "c.toml", data)
    back = toml.read_toml(tmp_path / "c.toml")
    expected = {k: v for k, v in data.items() if v is not None}
    assert back == expected
    with pytest.raises(BKSDMError, match="Cannot write when"):
        toml.dumps({"when": time})
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(BKSDMError, match="not valid TOML"):
        toml.read_toml(tmp_path / "bad.toml")


def test_a_lost_or_damaged_store_is_rebuilt_from_the_job_folders(tmp_path):
    from jobs_helpers import make_runner, wait_for, wait_until

    runner = make_runner(tmp_path / "data")
    done = wait_for(runner, runner.submit("count", {"steps": 2, "step_s": 0.01}).id, "done")
    stopped = runner.submit("count", {"steps": 500, "step_s": 0.05, "checkpoint_every": 1})
    wait_until(lambda: runner.progress(stopped.id).get("step", 0) >= 2, what="two steps")
    runner.cancel(stopped.id)
    wait_for(runner, stopped.id, "cancelled")
    runner.close()

    store = tmp_path / "data" / "jobs.sqlite3"
    store.write_bytes(b"garbage" * 1000)  # damaged: moved aside, never deleted
    for path in store.parent.glob("jobs.sqlite3-*"):
        path.unlink()
    again = make_runner(tmp_path / "data")
    try:
        assert list(store.parent.glob("jobs.sqlite3.damaged-*"))
        jobs = {job.id: job for job in again.list()}
        assert (jobs[done.id].state, jobs[done.id].resumable) == ("done", 0)
        assert (jobs[stopped.id].state, jobs[stopped.id].resumable) == ("cancelled", 1)
        assert again.resume(stopped.id).state in ("queued", "running")  # usable as before
        again.cancel(stopped.id)
        wait_for(again, stopped.id, "cancelled")
    finally:
        again.close()


def test_two_connections_creating_the_same_job_at_once_make_one(tmp_path):
    """Two processes (the WebUI and `bksdm app`) on one data folder: BEGIN IMMEDIATE serialises them."""
    import threading

    stores = [JobStore(tmp_path / "jobs.sqlite3") for _ in range(4)]
    barrier, results = threading.Barrier(len(stores)), []

    def create(i, store):
        barrier.wait()
        results.append(store.create(f"job-{i}", "count", f"f{i}", {"steps": 9})[1])

    threads = [threading.Thread(target=create, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True] and len(stores[0].list()) == 1
