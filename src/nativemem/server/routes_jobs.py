"""Routes: the caller's background jobs (see :mod:`nativemem.server.jobs`); another user's job ids answer 404."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .calls import user_of
from .http import MAX_ID_CHARS, ApiError

router = APIRouter()


def _not_found() -> ApiError:
    return ApiError(404, "no such job", type="not_found", code="job_not_found")


@router.get("/v1/jobs")
async def list_jobs(request: Request):
    user = user_of(request)
    return {"object": "list", "data": [j.public() for j in request.app.state.jobs.of(user)]}


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    return _public(request, job_id, lambda jobs, user, jid: jobs.get(user, jid))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    """Ask the job to stop at its next model step; the reply is the job (``cancel_requested`` until it has)."""
    return _public(request, job_id, lambda jobs, user, jid: jobs.cancel(user, jid))


def _public(request: Request, job_id: str, find) -> dict:
    """``find(jobs, user, id)``'s job as the caller sees it; 404 when the caller has no such job."""
    job = find(request.app.state.jobs, user_of(request), job_id[:MAX_ID_CHARS + 1])
    if job is None:
        raise _not_found()
    return job.public()
