"""HTTP plumbing of the server: OpenAI-shaped errors, the body-size limit, strict JSON body parsing, and the
mapping of the library's errors to HTTP statuses (error bodies never carry server paths)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..errors import (ContextOverflowError, DataError, InputError, MemoryLockedError, NativememError,
                      StoreUnavailableError, UnknownNameError)
from .engine import Cancelled

__all__ = ["ApiError", "BodyLimit", "read_json", "int_param", "map_error", "json_body", "MAX_ID_CHARS"]

log = logging.getLogger("nativemem.server")

MAX_JSON_DEPTH = 32
MAX_ID_CHARS = 256
_INT64 = 2 ** 63
_DRAIN_LIMIT = 64 << 20  # an over-limit body up to this size is read (and dropped) so the client sees the 413


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


async def read_json(request: Request, schema: type[BaseModel]):
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


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads ``schema`` itself with :func:`read_json`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


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


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
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


def map_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (InputError, UnknownNameError, DataError)):  # messages about the request, never server paths
        return ApiError(400, str(exc))
    if isinstance(exc, Cancelled):
        return ApiError(504 if "timed out" in exc.reason else 499, exc.reason, type="timeout", code="cancelled")
    if isinstance(exc, MemoryLockedError):
        return ApiError(503, str(exc), type="server_error")
    if isinstance(exc, StoreUnavailableError):  # the reason names the store, never a password
        log.error("memory store unavailable: %s", exc)
        return ApiError(503, "the memory's shared store (Redis) cannot be reached; retry later",
                        type="server_error", code="store_unavailable")
    if isinstance(exc, NativememError):  # the message may name server files: it goes to the log, not the reply
        log.error("memory error: %s", exc)
        return ApiError(500, "the memory could not be read or written (see the server log)", type="server_error")
    log.error("internal error", exc_info=exc)
    return ApiError(500, "internal server error", type="server_error")
