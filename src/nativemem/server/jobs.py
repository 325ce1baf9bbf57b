"""Background jobs: long work a client does not wait on (``POST /v1/memories/consolidate`` with
``"background": true``) answers ``202`` with a job; ``GET /v1/jobs/{id}`` says its state and, once done, its
result or error; ``DELETE /v1/jobs/{id}`` cancels it (it stops at its next model step and leaves nothing
behind). A job is its caller's: another user's job id answers 404 like one that does not exist.

Jobs live in the server process: a restart forgets them, and the work a job had not finished is not saved
(a consolidation saves its memory only at its end). Each user may have :data:`MAX_OPEN_PER_USER` unfinished
jobs; the last :data:`KEEP_FINISHED` finished jobs are kept for their results.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from .engine import Cancelled, Stop
from .http import ApiError, map_error

__all__ = ["Job", "Jobs", "MAX_OPEN_PER_USER", "KEEP_FINISHED"]

MAX_OPEN_PER_USER = 4
KEEP_FINISHED = 256


@dataclass
class Job:
    id: str
    user: str
    kind: str
    created: float
    stop: Stop = field(default_factory=lambda: Stop(deadline=math.inf))
    status: str = "running"  # running | succeeded | failed | cancelled
    finished: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status != "running"

    def public(self) -> dict[str, Any]:
        """What the caller sees: no user id, no server paths (errors are mapped as a reply's would be)."""
        return {"object": "job", "id": self.id, "kind": self.kind, "status": self.status, "created": self.created,
                "finished": self.finished, "cancel_requested": self.stop.event.is_set() and not self.done,
                "result": self.result, "error": self.error}


class Jobs:
    """The server's jobs (see the module docstring); used from the event loop."""

    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, user: str, kind: str, fn: Callable[[Stop], Any]) -> Job:
        """Run ``fn(stop)`` in a worker thread as a job of ``user`` (429 when the user has too many open)."""
        with self._lock:
            if sum(1 for j in self._jobs.values() if j.user == user and not j.done) >= MAX_OPEN_PER_USER:
                raise ApiError(429, f"you have {MAX_OPEN_PER_USER} unfinished jobs; wait for one or cancel it "
                               "(GET /v1/jobs)", type="rate_limit_error", code="too_many_jobs")
            job = Job(id=f"job-{uuid.uuid4().hex}", user=user, kind=kind, created=time.time())
            self._jobs[job.id] = job
            self._prune()

        async def run():
            try:
                job.result = await anyio.to_thread.run_sync(lambda: fn(job.stop))
                job.status = "succeeded"
            except Cancelled as e:
                job.status = "cancelled" if job.stop.event.is_set() else "failed"
                job.error = _body(map_error(e))
            except Exception as e:
                job.status = "failed"
                job.error = _body(map_error(e))
            finally:
                job.finished = time.time()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return job

    def get(self, user: str, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.user == user else None

    def of(self, user: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.user == user]

    def cancel(self, user: str, job_id: str) -> Job | None:
        job = self.get(user, job_id)
        if job is not None and not job.done:
            job.stop.event.set()
        return job

    def stop_all(self) -> None:
        for job in list(self._jobs.values()):
            job.stop.event.set()

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]


def _body(err: ApiError) -> dict[str, Any]:
    return {"message": err.message, "type": err.type, "code": err.code, "status": err.status}
