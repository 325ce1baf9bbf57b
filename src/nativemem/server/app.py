"""OpenAI-compatible HTTP server with per-user native memory (FastAPI; run by uvicorn).

Endpoints (all but ``/health`` need ``Authorization: Bearer KEY``; the key names the user):

- ``POST /v1/chat/completions``: OpenAI chat completions, streamed over SSE (``"stream": true``) or not,
  answered with the caller's activation memory injected as a KV prefix. Extra fields: ``memory``
  (bool, default true) and ``top_k`` (most chunks injected; the memory's relevance gate injects only hits
  whose calibrated relevance passes its ``gate_threshold``). The response carries ``nativemem.memory_ids``
  (the caller's chunks that were injected), ``nativemem.hits`` (every hit considered: ``id``, raw ``score``,
  ``relevance``, ``injected`` and, if not, ``reason``), ``prefix_tokens`` and ``ttft_s``.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served model and its alias ``nativemem`` (a chat naming another
  model gets 404).
- ``POST /v1/memories`` (``{"text": ...}`` or ``{"texts": [...]}``, optional ``metadata``): write; all or
  nothing, acknowledged only once durable. ``GET /v1/memories?limit=&offset=``: list.
  ``POST /v1/memories/search`` (``{"query": ..., "k": 4}``). ``GET /v1/memories/{id}``.
  ``DELETE /v1/memories/{id}`` (a chunk id, or a source id to delete all its chunks).
  ``POST /v1/memories/consolidate`` (``{"into": "side_ffn" | "pkm"}``): train the caller's chunks into a
  parametric memory of their own (see :mod:`nativemem.consolidate`); the receipt has recall before/after.
  It takes the model one training step at a time, so other users' requests go in between; with
  ``"background": true`` it answers 202 with a job instead of waiting.
  ``DELETE /v1/memories/consolidated`` (``?into=side_ffn|pkm``, default both) removes it; a consolidated
  memory that cannot be read is left out of chats, with a line in ``nativemem.warnings``.
  Only the caller's memories exist for the caller: another user's id answers 404 like an unknown one.
- ``GET /v1/jobs``, ``GET /v1/jobs/{id}``, ``DELETE /v1/jobs/{id}``: the caller's background jobs, their
  result, and cancelling one (see :mod:`nativemem.server.jobs`).
- ``GET /health``: liveness, no authentication, no counts. ``GET /openapi.json`` and ``GET /docs``: the API's
  schema and its browsable page (no data in them, so no key needed).

Every body is read by :func:`_read_json` (size limit -> 413, UTF-8, JSON without NaN, lone surrogates,
huge integers or deep nesting -> 400) and validated by the pydantic schemas (-> 400), so no client input
can reach the model or the store unchecked. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``. Concurrency and cancellation are described in :mod:`nativemem.server.engine`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batching import batchable
from ..errors import InputError, NativememError
from . import routes_admin, routes_chat, routes_jobs, routes_memories
from .auth import KeyRing
from .batcher import Batcher
from .engine import Cancelled, Engine
from .http import ApiError, BodyLimit, map_error
from .jobs import Jobs

__all__ = ["create_app", "ServerSettings", "ApiError", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger("nativemem.server")

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class ServerSettings:
    """How the server behaves (``nativemem serve`` options)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    request_timeout_s: float = 300.0  # waiting for the model plus generating; past it: 503 / 504
    anonymous: bool = False  # no API keys: every request acts as the anonymous user (loopback only)
    write_turn_chunks: int = 2  # chunks an add encodes per turn on the model (others' requests go in between)
    batch_size: int = 32  # chats decoded together, one forward per step (1: one chat at a time on the model)

    def __post_init__(self) -> None:
        if not isinstance(self.write_turn_chunks, int) or self.write_turn_chunks < 1:
            raise InputError(f"write_turn_chunks must be an integer >= 1, got {self.write_turn_chunks!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise InputError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if not self.request_timeout_s > 0:
            raise InputError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")


def create_app(*, keys: KeyRing | None, settings: ServerSettings | None = None, lm=None, memory=None,
               load: Callable[[], tuple[Any, Any]] | None = None) -> FastAPI:
    """The server application.

    Args:
        keys: API keys; None only with ``settings.anonymous`` (every request is the anonymous user).
        settings: limits and timeouts.
        lm, memory: an already loaded model and activation memory (in-process use and tests), or
        load: called in the lifespan to load them (``nativemem serve``).
    """
    settings = settings or ServerSettings()
    if keys is None and not settings.anonymous:
        raise InputError("no API keys: pass --api-keys FILE (or set NATIVEMEM_API_KEYS_FILE), or run without "
                         "authentication on loopback with --no-auth")
    if (lm is None) == (load is None) or (lm is None) != (memory is None):
        raise ValueError("give either lm and memory, or load")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load is not None:
            loaded_lm, loaded_memory = await anyio.to_thread.run_sync(load)
        else:
            loaded_lm, loaded_memory = lm, memory
        app.state.engine = engine = Engine(loaded_lm, loaded_memory)
        if settings.batch_size > 1 and batchable(loaded_lm):
            engine.batcher = Batcher(engine, asyncio.get_running_loop(), settings.batch_size)
        log.info("serving %s with memory %s (%d users with keys)", loaded_lm.name, loaded_memory.path,
                 len(keys.users()) if keys else 0)
        try:
            yield
        finally:
            app.state.jobs.stop_all()
            if engine.batcher is not None:
                engine.batcher.close()
            if load is not None:
                close = getattr(loaded_memory, "close", None)
                if close is not None:
                    close()

    # no trailing-slash redirects: they are built from the request's Host header
    app = FastAPI(title="nativemem", description="OpenAI-compatible chat with per-user native memory",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  redirect_slashes=False)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.settings, app.state.keys, app.state.jobs = settings, keys, Jobs()

    # -------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return ApiError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(NativememError)
    @app.exception_handler(Cancelled)
    async def _nativemem_error(request: Request, exc: Exception):
        return map_error(exc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal server error", type="server_error").response()

    # -------------------------------------------------------------- routes, by concern
    for module in (routes_admin, routes_chat, routes_memories, routes_jobs):
        app.include_router(module.router)
    return app
