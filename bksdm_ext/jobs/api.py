"""The REST API `/bksdm/v1/jobs`: the same runner behind the WebUI's FastAPI app and `bksdm app`.

GET /jobs, POST /jobs {kind, config, request_id}, GET /jobs/ID, GET /jobs/ID/log, POST /jobs/ID/cancel,
POST /jobs/ID/resume, POST /jobs/ID/relaunch (a new job from its config.toml), DELETE /jobs/ID.

Reading (list, get) is always allowed; creating, cancelling, resuming and deleting jobs pass the
access guard. Errors are JSON `{"detail": message}`: 403 refused by the guard, 404 no such job,
400 anything else the user can fix.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from .. import kinds
from ..errors import BKSDMError
from .guard import AccessDenied, AccessGuard
from .runner import Runner
from .store import Job, JobNotFound

PREFIX = "/bksdm/v1"


class JobRequest(BaseModel):
    kind: str = Field(..., description="A job kind of bksdm_ext.kinds: " + ", ".join(kinds.all()))
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's config fields; missing ones keep their defaults")
    request_id: str | None = Field(None, description="Sending the same id again returns the same job, never a second one")


def job_view(runner: Runner, job: Job) -> dict[str, Any]:
    """A job as the API and the tab show it: the store's record and the job's own progress."""
    progress = runner.job_progress(job.id)
    return {
        "id": job.id, "kind": job.kind, "state": job.state, "message": job.message, "folder": job.folder,
        "created": job.created, "started": job.started, "finished": job.finished, "attempts": job.attempts,
        "resumable": bool(job.resumable),
        "progress": progress.public(),
    }


def http_answer(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except AccessDenied as error:
        raise HTTPException(status_code=403, detail=str(error)) from None
    except JobNotFound as error:
        raise HTTPException(status_code=404, detail=str(error)) from None
    except BKSDMError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def jobs_router(runner: Runner, guard: AccessGuard) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["BK-SDM jobs"])

    @router.get("/jobs")
    def list_jobs() -> list[dict[str, Any]]:
        return [job_view(runner, job) for job in runner.list()]

    @router.post("/jobs")
    def create_job(request: JobRequest) -> dict[str, Any]:
        def create():
            guard.check("Creating a job")
            return job_view(runner, runner.submit(request.kind, request.config, request.request_id))
        return http_answer(create)

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return http_answer(lambda: job_view(runner, runner.get(job_id)))

    @router.get("/jobs/{job_id}/log", response_class=PlainTextResponse)
    def job_log(job_id: str, max_bytes: int = 32768) -> str:
        return http_answer(lambda: runner.log_tail(runner.get(job_id).id, max(0, min(max_bytes, 1 << 24))))

    @router.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        def cancel():
            guard.check("Cancelling a job")
            return job_view(runner, runner.cancel(job_id))
        return http_answer(cancel)

    @router.post("/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict[str, Any]:
        def resume():
            guard.check("Resuming a job")
            return job_view(runner, runner.resume(job_id))
        return http_answer(resume)

    @router.post("/jobs/{job_id}/relaunch")
    def relaunch_job(job_id: str, request_id: str | None = None) -> dict[str, Any]:
        def relaunch():
            guard.check("Launching a job")
            return job_view(runner, runner.relaunch(job_id, request_id))
        return http_answer(relaunch)

    @router.delete("/jobs/{job_id}")
    def delete_job(job_id: str) -> dict[str, Any]:
        def delete():
            guard.check("Deleting a job")
            runner.delete(job_id)
            return {"deleted": job_id}
        return http_answer(delete)

    return router
