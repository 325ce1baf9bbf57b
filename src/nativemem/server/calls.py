"""How a route runs work: the caller's user, the engine, and model work under the model lock in a worker thread,
stopped when the request times out or its client goes away (see :mod:`nativemem.server.engine`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import anyio
from fastapi import Request

from ..memories.activation.memory import Turns
from .engine import Engine, Stop
from .http import ApiError

__all__ = ["user_of", "engine", "new_stop", "acquire_model", "start_model_work", "with_model", "with_turns",
           "with_steps", "model_turn", "until_done", "in_thread"]


def user_of(request: Request) -> str:
    """The user the request's API key names (401 without a valid key; "" for an anonymous server)."""
    keys = request.app.state.keys
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


def new_stop(request: Request) -> Stop:
    return Stop(deadline=time.monotonic() + request.app.state.settings.request_timeout_s)


async def acquire_model(eng: Engine, stop: Stop) -> None:
    if math.isinf(stop.deadline):  # a background job: it waits its turn however long
        await eng.model_lock.acquire()
        return
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
    eng, stop = engine(request), new_stop(request)
    await acquire_model(eng, stop)
    return await until_done(request, stop, start_model_work(eng, lambda: fn(stop)))


async def until_done(request: Request, stop: Stop, task: asyncio.Future) -> Any:
    """The worker's result; a client that goes away or a cancelled request stops it at its next check."""
    watcher = asyncio.ensure_future(watch_disconnect(request, stop, task))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.event.set()
        raise
    finally:
        watcher.cancel()


def model_turn(eng: Engine, stop: Stop) -> Callable[[], AbstractContextManager]:
    """For work running in a thread that holds no lock: a context manager factory that takes the model lock for
    one turn (waiting in the event loop, in turn with other requests; 503 past the deadline) after checking
    ``stop``."""

    @contextmanager
    def turn():
        stop.check()
        anyio.from_thread.run(acquire_model, eng, stop)
        try:
            yield
        finally:
            anyio.from_thread.run_sync(eng.model_lock.release)

    return turn


async def with_turns(request: Request, fn: Callable[[Stop, Turns], Any]) -> Any:
    """Run a long write ``fn(stop, turns)`` in a thread that holds no lock: each of its batches takes the model
    lock (waiting in the event loop, in turn with other requests) and each commit the store lock, so no other
    request waits longer than one batch. The request's timeout and disconnect end it at the next batch (the
    write is then rolled back)."""
    eng, stop = engine(request), new_stop(request)
    turns = Turns(model=model_turn(eng, stop), store=lambda: eng.store_lock,
                  batch_size=request.app.state.settings.write_turn_chunks)
    return await until_done(request, stop, _in_worker(lambda: fn(stop, turns)))


async def with_steps(request: Request, fn: Callable[[Stop, Callable[[], AbstractContextManager]], Any]) -> Any:
    """Run long model work ``fn(stop, turn)`` (training) in a thread that holds no lock; it takes ``turn()`` for
    each model step, so no other request waits longer than one step. Timeout and disconnect end it at the next
    step."""
    eng, stop = engine(request), new_stop(request)
    return await until_done(request, stop, _in_worker(lambda: fn(stop, model_turn(eng, stop))))


def _in_worker(fn: Callable[[], Any]) -> asyncio.Task:
    task = asyncio.ensure_future(anyio.to_thread.run_sync(fn))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception was never retrieved"
    return task


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(fn)
