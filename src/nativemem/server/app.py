"""OpenAI-compatible HTTP server with per-user native memory (FastAPI; run by uvicorn).

Endpoints (all but ``/health`` need ``Authorization: Bearer KEY``; the key names the user):

- ``POST /v1/chat/completions``: OpenAI chat completions, streamed over SSE (``"stream": true``) or not,
  answered with the caller's activation memory injected as a KV prefix. Extra fields: ``memory``
  (bool, default true) and ``top_k`` (most chunks injected; the memory's relevance gate injects only hits
  whose calibrated relevance passes its ``gate_threshold``). The response carries ``nativemem.memory_ids``
  (the caller's chunks that were injected), ``nativemem.hits`` (every hit considered: ``id``, raw ``score``,
  ``relevance``, ``injected`` and, if not, ``reason``), ``prefix_tokens`` and ``ttft_s``.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model.
- ``POST /v1/memories`` (``{"text": ...}`` or ``{"texts": [...]}``, optional ``metadata``): write; all or
  nothing, acknowledged only once durable. ``GET /v1/memories?limit=&offset=``: list.
  ``POST /v1/memories/search`` (``{"query": ..., "k": 4}``). ``GET /v1/memories/{id}``.
  ``DELETE /v1/memories/{id}`` (a chunk id, or a source id to delete all its chunks).
  ``POST /v1/memories/consolidate`` (``{"into": "side_ffn" | "pkm"}``): train the caller's chunks into a
  parametric memory of their own (see :mod:`nativemem.consolidate`); the receipt has recall before/after.
  ``DELETE /v1/memories/consolidated`` (``?into=side_ffn|pkm``, default both) removes it; a consolidated
  memory that cannot be read is left out of chats, with a line in ``nativemem.warnings``.
  Only the caller's memories exist for the caller: another user's id answers 404 like an unknown one.
- ``GET /health``: liveness, no authentication, no counts.

Every body is read by :func:`_read_json` (size limit -> 413, UTF-8, JSON without NaN, lone surrogates,
huge integers or deep nesting -> 400) and validated by the pydantic schemas (-> 400), so no client input
can reach the model or the store unchecked. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``. Concurrency and cancellation are described in :mod:`nativemem.server.engine`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflowError, InputError, MemoryLockedError, NativememError, UnknownNameError
from .auth import KeyRing
from .engine import Cancelled, Engine, Stop
from .schemas import MAX_LIST_LIMIT, MAX_METADATA_CHARS, AddRequest, ChatRequest, ConsolidateRequest, SearchRequest

__all__ = ["create_app", "ServerSettings", "ApiError", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger("nativemem.server")

DEFAULT_MAX_BODY_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
MAX_ID_CHARS = 256
_INT64 = 2 ** 63
_DRAIN_LIMIT = 64 << 20  # an over-limit body up to this size is read (and dropped) so the client sees the 413


@dataclass
class ServerSettings:
    """How the server behaves (``nativemem serve`` options)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    request_timeout_s: float = 300.0  # waiting for the model plus generating; past it: 503 / 504
    anonymous: bool = False  # no API keys: every request acts as the anonymous user (loopback only)

    def __post_init__(self) -> None:
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise InputError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if not self.request_timeout_s > 0:
            raise InputError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------- body size limit
class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before any route sees it.

    The body is read here (up to the limit) and replayed to the app; later ``receive`` calls go to the
    server, so disconnects are still seen.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await ApiError(400, "Content-Length is not an integer").response()(scope, receive, send)
        if declared is not None and declared > _DRAIN_LIMIT:
            return await self._too_large(scope, receive, send, declared, drain=False)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send, declared, drain=more)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, declared, *, drain: bool):
        read = 0
        while drain and read < _DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            drain = message.get("more_body", False)
        size = f"{declared:,} bytes" if declared is not None else "larger than that"
        err = ApiError(413, f"request body is too large: {size}, the limit is {self.max_bytes:,} bytes",
                       code="body_too_large")
        await err.response()(scope, receive, send)


# ---------------------------------------------------------------------------- body parsing
def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _check_json(value: Any, depth: int = 0) -> None:
    """Reject what the store or the JSON encoder cannot hold: deep nesting, lone surrogates, huge integers."""
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "JSON string holds a lone UTF-16 surrogate (not valid Unicode text)") from None
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ApiError(400, "JSON integer does not fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError(400, "JSON number is not finite")
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)


async def _read_json(request: Request, schema: type[BaseModel]):
    body = await request.body()
    if not body:
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "JSON is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    _check_json(data)
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _validation_message(e), param=_first_loc(e)) from None


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = e.error_count() - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _first_loc(e: ValidationError) -> str | None:
    errs = e.errors(include_url=False, include_input=False)
    return ".".join(str(x) for x in errs[0].get("loc", ())) if errs else None


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer", param=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name} must be between {lo} and {hi}, got {value}", param=name)
    return value


# ---------------------------------------------------------------------------- the app
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
        app.state.engine = Engine(loaded_lm, loaded_memory)
        log.info("serving %s with memory %s (%d users with keys)", loaded_lm.name, loaded_memory.path,
                 len(keys.users()) if keys else 0)
        try:
            yield
        finally:
            if load is not None:
                close = getattr(loaded_memory, "close", None)
                if close is not None:
                    close()

    # no trailing-slash redirects: they are built from the request's Host header
    app = FastAPI(title="nativemem", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.settings = settings

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
        return _map_error(exc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal server error", type="server_error").response()

    # -------------------------------------------------------------- helpers
    def user_of(request: Request) -> str:
        if keys is None:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        user = keys.user_for(key.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return user

    def engine(request: Request) -> Engine:
        return request.app.state.engine

    def new_stop() -> Stop:
        return Stop(deadline=time.monotonic() + settings.request_timeout_s)

    async def acquire_model(eng: Engine, stop: Stop) -> None:
        wait = stop.deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await eng.model_lock.acquire()
        except TimeoutError:
            raise ApiError(503, "the server is busy (the model is in use by other requests); retry later",
                           type="server_busy", code="timeout", headers={"Retry-After": "1"}) from None

    def start_model_work(eng: Engine, fn: Callable[[], Any]) -> asyncio.Task:
        """Run ``fn`` in a thread while holding the (already acquired) model lock; released when it ends."""

        async def run():
            try:
                return await anyio.to_thread.run_sync(fn)
            finally:
                eng.model_lock.release()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception was never retrieved"
        return task

    async def watch_disconnect(request: Request, stop: Stop, task: asyncio.Task) -> None:
        """Stop the worker at its next token when the client goes away (a plain response has no other signal)."""
        while not task.done():
            if await request.is_disconnected():
                stop.event.set()
                return
            await asyncio.sleep(0.1)

    async def with_model(request: Request, fn: Callable[[Stop], Any]) -> Any:
        eng, stop = engine(request), new_stop()
        await acquire_model(eng, stop)
        task = start_model_work(eng, lambda: fn(stop))
        watcher = asyncio.ensure_future(watch_disconnect(request, stop, task))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.event.set()
            raise
        finally:
            watcher.cancel()

    async def in_thread(fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn)

    # -------------------------------------------------------------- routes
    @app.get("/health")
    async def health(request: Request):
        eng = getattr(request.app.state, "engine", None)
        return {"status": "ok" if eng is not None else "starting", "model": eng.lm.name if eng else None}

    def model_card(eng: Engine) -> dict[str, Any]:
        return {"id": eng.lm.name, "object": "model", "created": 0, "owned_by": "nativemem"}

    @app.get("/v1/models")
    async def models(request: Request):
        user_of(request)
        return {"object": "list", "data": [model_card(engine(request))]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        user_of(request)
        eng = engine(request)
        if model_id != eng.lm.name:
            raise ApiError(404, f"no such model; this server serves {eng.lm.name!r}", type="not_found",
                           code="model_not_found")
        return model_card(eng)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = user_of(request)
        req = await _read_json(request, ChatRequest)
        eng = engine(request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        max_new = req.new_tokens()
        # token counting of a large body runs in a worker thread, not on the event loop
        prompt_tokens = await in_thread(lambda: sum(eng.lm.count_tokens(m["content"]) for m in messages))
        if prompt_tokens + max_new > eng.lm.max_context:  # cheap early check; the exact one includes the prefix
            raise ContextOverflowError(prompt_tokens + max_new, eng.lm.max_context, what="messages plus max_tokens")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        run = dict(messages=messages, user_id=user, max_new_tokens=max_new, use_memory=req.memory, top_k=req.top_k)
        if req.stream:
            return await _stream(request, eng, req, run, cid, created)
        answer = await with_model(request, lambda stop: eng.generate(**run, stop=stop))
        gen = answer.generation
        return {"id": cid, "object": "chat.completion", "created": created, "model": eng.lm.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "finish_reason": "length" if gen.new_tokens >= max_new else "stop"}],
                "usage": _usage(gen), "nativemem": _extra(answer)}

    async def _stream(request: Request, eng: Engine, req: ChatRequest, run: dict, cid: str, created: int):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = new_stop()

        def push(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                push(("done", eng.generate(**run, stop=stop, on_token=lambda ids: push(("token", ids)))))
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                push(("error", e))

        await acquire_model(eng, stop)
        start_model_work(eng, work)
        first = await queue.get()
        if first[0] == "error":  # nothing sent yet: a plain HTTP error
            raise _map_error(first[1])

        tok = eng.lm.tokenizer
        eos = set(eng.lm.eos_token_ids)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.lm.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            ids: list[int] = []
            sent = ""
            item = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    if item[0] == "token":
                        ids += [i for i in item[1] if i not in eos]
                        text = tok.decode(ids, skip_special_tokens=True).lstrip()
                        # hold back trailing spaces (the final answer is stripped) and half-decoded characters
                        ready = text.rstrip()
                        if not ready.endswith("\ufffd") and ready.startswith(sent) and len(ready) > len(sent):
                            yield chunk({"content": ready[len(sent):]})
                            sent = ready
                    elif item[0] == "done":
                        answer = item[1]
                        gen = answer.generation
                        if gen.text.startswith(sent) and len(gen.text) > len(sent):
                            yield chunk({"content": gen.text[len(sent):]})
                        finish = "length" if gen.new_tokens >= run["max_new_tokens"] else "stop"
                        yield chunk({}, finish, nativemem=_extra(answer))
                        if req.stream_options is not None and req.stream_options.include_usage:
                            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": eng.lm.name, "choices": [], "usage": _usage(gen)}
                            yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:  # an error after the first token: tell the client in the stream
                        err = _map_error(item[1])
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
                        return
                    item = await queue.get()
            finally:
                stop.event.set()  # client gone or stream over: the worker stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/memories")
    async def add_memories(request: Request):
        user = user_of(request)
        req = await _read_json(request, AddRequest)
        try:
            texts = req.all_texts()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if len(json.dumps(req.metadata)) > MAX_METADATA_CHARS:
            raise ApiError(400, f"metadata is larger than {MAX_METADATA_CHARS:,} characters of JSON",
                           param="metadata")
        eng = engine(request)
        return await with_model(request, lambda stop: eng.add(texts, user_id=user, metadata=req.metadata, stop=stop))

    @app.get("/v1/memories")
    async def list_memories(request: Request):
        user = user_of(request)
        limit = _int_param(request, "limit", 100, 1, MAX_LIST_LIMIT)
        offset = _int_param(request, "offset", 0, 0, 1 << 40)
        eng = engine(request)
        return await in_thread(lambda: eng.list(user_id=user, limit=limit, offset=offset))

    @app.post("/v1/memories/search")
    async def search_memories(request: Request):
        user = user_of(request)
        req = await _read_json(request, SearchRequest)
        eng = engine(request)
        hits = await with_model(request, lambda stop: eng.search(req.query, user_id=user, k=req.k))
        return {"object": "list", "data": hits}

    @app.post("/v1/memories/consolidate")
    async def consolidate_memories(request: Request):
        user = user_of(request)
        req = await _read_json(request, ConsolidateRequest)
        eng = engine(request)
        return await with_model(request, lambda stop: eng.consolidate(req.into, user_id=user))

    @app.delete("/v1/memories/consolidated")
    async def delete_consolidated(request: Request):
        user = user_of(request)
        into = request.query_params.get("into")
        eng = engine(request)
        return await with_model(request, lambda stop: eng.delete_consolidated(user_id=user, into=into))

    def _not_found(memory_id: str) -> ApiError:
        # the id is not echoed: a response must never carry a memory id its caller does not own
        return ApiError(404, "no such memory", type="not_found", code="memory_not_found")

    @app.get("/v1/memories/{memory_id}")
    async def get_memory(memory_id: str, request: Request):
        user = user_of(request)
        if len(memory_id) > MAX_ID_CHARS:
            raise _not_found(memory_id)
        eng = engine(request)
        record = await in_thread(lambda: eng.get(memory_id, user_id=user))
        if record is None:
            raise _not_found(memory_id)
        return record

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: str, request: Request):
        user = user_of(request)
        if len(memory_id) > MAX_ID_CHARS:
            raise _not_found(memory_id)
        eng = engine(request)
        deleted = await in_thread(lambda: eng.delete(memory_id, user_id=user))
        if deleted is None:
            raise _not_found(memory_id)
        return {"object": "memory.deleted", "id": memory_id, "deleted": True, "ids": deleted}

    return app


def _usage(gen) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.new_tokens,
            "total_tokens": gen.prompt_tokens + gen.new_tokens}


def _extra(answer) -> dict[str, Any]:
    gen = answer.generation
    return {"memory_ids": answer.memory_ids, "prefix_tokens": gen.prefix_tokens, "ttft_s": round(gen.ttft_s, 6),
            "parametric": answer.parametric, "hits": answer.hits, "warnings": answer.warnings}


def _map_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (InputError, UnknownNameError)):
        return ApiError(400, str(exc))
    if isinstance(exc, Cancelled):
        return ApiError(504 if "timed out" in exc.reason else 499, exc.reason, type="timeout", code="cancelled")
    if isinstance(exc, MemoryLockedError):
        return ApiError(503, str(exc), type="server_error")
    if isinstance(exc, NativememError):  # the message may name server files: it goes to the log, not the reply
        log.error("memory error: %s", exc)
        return ApiError(500, "the memory could not be read or written (see the server log)", type="server_error")
    log.error("internal error", exc_info=exc)
    return ApiError(500, "internal server error", type="server_error")
