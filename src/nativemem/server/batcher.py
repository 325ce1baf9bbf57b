"""Chats of many users decoding together: one forward per step for every chat in the batch.

A chat that can be batched (:meth:`~nativemem.server.engine.Engine.batchable`) is handed to the
:class:`Batcher` instead of taking the model for its whole generation. The batcher's thread works in turns
on the model lock: holding it for up to ``hold_s`` (1 s) at a time, then handing it to the next waiter (an
add's batch, a search, a consolidation's training step), it prefills the next chat that arrived (with its own
memory prefix, selected for its own user) if the batch has fewer than ``max_rows`` rows, then runs one decode
step for every row (:class:`~nativemem.batching.DecodeBatch`), and again. A chat so waits for other work once or
twice, not at each of its tokens. A row that ends (its answer is complete, its client went away, its deadline
passed) leaves the batch and its request gets the answer or the error; the other rows go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..batching import DecodeBatch
from .engine import Answer, Chat, Engine, Stop

__all__ = ["Batcher"]

log = logging.getLogger("nativemem.server")


@dataclass(eq=False)
class _Pending:
    chat: Chat
    stop: Stop
    on_token: Callable[[list[int]], None] | None
    future: Future = field(default_factory=Future)


class Batcher:
    """Decodes submitted chats in batches of at most ``max_rows`` (see the module docstring)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, max_rows: int, hold_s: float = 1.0):
        self.engine, self.loop, self.max_rows, self.hold_s = engine, loop, max_rows, hold_s
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._next: _Pending | None = None  # taken off the queue while waiting for work, admitted first
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nativemem-batcher", daemon=True)
        self._thread.start()
        self.widest = 0  # most rows decoded in one step

    def submit(self, chat: Chat, *, stop: Stop, on_token: Callable[[list[int]], None] | None = None) -> Future:
        """Queue a prepared chat; the future gets its :class:`~nativemem.server.engine.Answer` or its error."""
        pending = _Pending(chat, stop, on_token)
        self._queue.put(pending)
        return pending.future

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the batcher's thread
    def _run(self) -> None:
        batch = DecodeBatch(self.engine.lm)
        rows: dict[int, _Pending] = {}
        while not self._closed.is_set():
            if not len(batch) and self._next is None:
                try:
                    self._next = self._queue.get(timeout=0.2)  # admitted below, under the model lock
                except queue.Empty:
                    continue
            if not self._take_model():
                break
            try:
                held = time.perf_counter()
                while True:  # turns of one prefill and one step, for up to hold_s (then others get the model)
                    self._admit(batch, rows)
                    if not len(batch):
                        break
                    self.widest = max(self.widest, len(batch))
                    ended = batch.step()
                    for row in ended:
                        self._finish(rows.pop(id(row)), row)
                    if time.perf_counter() - held >= self.hold_s or self._closed.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - a failed step fails its rows, never the thread
                log.error("batched decoding failed", exc_info=e)
                for pending in rows.values():
                    _fail(pending, e)
                rows.clear()
                batch = DecodeBatch(self.engine.lm)
            finally:
                self.loop.call_soon_threadsafe(self.engine.model_lock.release)
        for pending in [*rows.values(), *([self._next] if self._next is not None else [])]:
            _fail(pending, RuntimeError("the server is shutting down"))

    def _take_model(self) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(self.engine.model_lock.acquire(), self.loop).result()
            return True
        except (RuntimeError, asyncio.CancelledError):  # the event loop is gone: the server stopped
            return False

    def _admit(self, batch: DecodeBatch, rows: dict[int, _Pending]) -> None:
        """Prefill the next waiting chat (alone, with its own memory) if the batch has room: one prefill per turn,
        so the rows decoding go on while others arrive and other model work waits for one prefill and one step
        at most."""
        while len(batch) < self.max_rows:
            pending, self._next = self._next, None
            if pending is None:
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    return
            if pending.future.cancelled():
                continue
            try:
                row = self.engine.prefill(pending.chat, stop=pending.stop, on_token=pending.on_token)
            except BaseException as e:  # noqa: BLE001 - the request gets it
                _fail(pending, e)
                continue
            if row.done:
                self._finish(pending, row)
                continue  # answered by its prefill alone: take the next one
            rows[id(row)] = pending
            batch.join([row])
            return

    def _finish(self, pending: _Pending, row) -> None:
        if row.error is not None:
            _fail(pending, row.error)
            return
        answer: Answer = pending.chat.answer(row.result(self.engine.lm))
        if not pending.future.cancelled():
            pending.future.set_result(answer)


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)

