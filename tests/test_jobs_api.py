"""The REST API /bksdm/v1/jobs over a real runner and the count job, served by uvicorn on loopback."""

import contextlib

import pytest
from fastapi import FastAPI
import httpx
from jobs_helpers import make_runner, serve, wait_for

from bksdm_ext.jobs.api import jobs_router
from bksdm_ext.jobs.guard import AccessGuard

pytestmark = pytest.mark.slow


@pytest.fixture
def runner(tmp_path):
    runner = make_runner(tmp_path / "data")
    yield runner
    runner.close()


@pytest.fixture
def client_for():
    """A real HTTP client of a FastAPI app (0.94, as the WebUI's) with the jobs router mounted."""
    with contextlib.ExitStack() as stack:
        def make(runner, guard):
            app = FastAPI()
            app.include_router(jobs_router(runner, guard))
            return stack.enter_context(httpx.Client(base_url=stack.enter_context(serve(app)), timeout=30))
        yield make


def test_create_get_cancel_resume_delete(runner, client_for):
    api = client_for(runner, AccessGuard())
    created = api.post("/bksdm/v1/jobs", json={"kind": "count", "config": {"steps": 60, "step_s": 0.05},
                                               "request_id": "form-1"})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["kind"] == "count" and job["state"] == "running"
    retry = api.post("/bksdm/v1/jobs", json={"kind": "count", "config": {"steps": 60, "step_s": 0.05},
                                             "request_id": "form-1"})
    assert retry.json()["id"] == job["id"]
    assert [j["id"] for j in api.get("/bksdm/v1/jobs").json()] == [job["id"]]

    assert api.post(f"/bksdm/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
    wait_for(runner, job["id"], "cancelled")
    got = api.get(f"/bksdm/v1/jobs/{job['id']}").json()
    assert got["state"] == "cancelled" and got["resumable"] and got["progress"]["total_steps"] == 60
    assert api.post(f"/bksdm/v1/jobs/{job['id']}/resume").json()["state"] == "running"
    wait_for(runner, job["id"], "done")
    done = api.get(f"/bksdm/v1/jobs/{job['id']}").json()
    assert done["progress"]["step"] == 60 and done["attempts"] == 2
    log = api.get(f"/bksdm/v1/jobs/{job['id']}/log", params={"max_bytes": 200})
    assert log.headers["content-type"].startswith("text/plain") and log.text.endswith("count: step 60\n")
    assert len(log.text.encode()) <= 200
    again = api.post(f"/bksdm/v1/jobs/{job['id']}/relaunch", params={"request_id": "again-1"}).json()
    assert again["id"] != job["id"] and again["kind"] == "count"
    assert api.post(f"/bksdm/v1/jobs/{job['id']}/relaunch", params={"request_id": "again-1"}).json()["id"] == again["id"]
    api.post(f"/bksdm/v1/jobs/{again['id']}/cancel")
    wait_for(runner, again["id"], "cancelled")
    assert api.delete(f"/bksdm/v1/jobs/{job['id']}").json() == {"deleted": job["id"]}
    assert [j["id"] for j in api.get("/bksdm/v1/jobs").json()] == [again["id"]]


def test_errors_are_readable_json(runner, client_for):
    api = client_for(runner, AccessGuard())
    bad = api.post("/bksdm/v1/jobs", json={"kind": "count", "config": {"steps": 0}})
    assert (bad.status_code, bad.json()) == (400, {"detail": "steps must be at least 1."})
    assert api.post("/bksdm/v1/jobs", json={"kind": "nope"}).status_code == 400
    missing = api.get("/bksdm/v1/jobs/nope")
    assert missing.status_code == 404 and "no job 'nope'" in missing.json()["detail"]
    assert api.post("/bksdm/v1/jobs/nope/cancel").status_code == 404


def test_guard_refuses_changes_on_an_exposed_server(runner, client_for):
    exposed = client_for(runner, AccessGuard(listen=True))
    refused = exposed.post("/bksdm/v1/jobs", json={"kind": "count", "config": {"steps": 1}})
    assert refused.status_code == 403 and "--listen binds 0.0.0.0" in refused.json()["detail"]
    assert runner.list() == []
    assert exposed.get("/bksdm/v1/jobs").status_code == 200  # reading stays allowed

    job = runner.submit("count", {"steps": 100, "step_s": 0.05})
    assert exposed.post(f"/bksdm/v1/jobs/{job.id}/cancel").status_code == 403
    assert exposed.delete(f"/bksdm/v1/jobs/{job.id}").status_code == 403
    allowed = client_for(runner, AccessGuard(listen=True, allow_insecure=True))
    assert allowed.post(f"/bksdm/v1/jobs/{job.id}/cancel").status_code == 200
    wait_for(runner, job.id, "cancelled")
