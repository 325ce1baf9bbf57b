"""The server's single point of contact with the model and the memory store.

How concurrency works: one process holds one model and one memory folder. Every call that runs the model
(generation, writing, searching: they all encode with it) holds ``model_lock``, an asyncio lock taken in
the event loop before the work is handed to a thread, so a request waiting for the model holds no thread
and a cancelled wait holds nothing. Every call that touches the store (index and blobs) holds
``store_lock``, a threading lock taken inside that thread; the order is always model, then store, so they
cannot deadlock. Listing, getting and deleting memories take only the store lock and are served while
the model generates. Long work holds neither lock throughout: an add or import takes the model for one batch
of chunks at a time and the store for each commit (:class:`Turns`); a consolidation takes the model for one
training step or probe at a time (:func:`nativemem.turns.taking_turns`); other requests go in between.

Every memory operation is scoped to the caller's user id here, not in the routes: a memory id of another
user behaves exactly like an id that does not exist. User id ``""`` is the anonymous user (memories written
without a user id), served only when the server runs without API keys.

Cancellation: generation checks a per-request :class:`Stop` (client gone, or deadline passed) at every
new token and raises :class:`Cancelled`, which unwinds the memory's ``active()`` scope (hooks removed in
``finally``). A write runs to completion or is rolled back: an add that fails part-way deletes the chunks
it wrote, so a failed or cancelled request leaves no partial write.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..memories.activation.memory import Turns
from ..memories.base import Injection
from ..model import GREEDY, Generation, Sampling
from ..text import check_text
from .schemas import MAX_METADATA_CHARS

log = logging.getLogger("nativemem.server")

__all__ = ["Engine", "Stop", "Cancelled", "Answer", "Chat", "public_record", "public_item"]

_ALL = 1 << 30  # "every item" for the contract's items()


class Cancelled(Exception):
    """A request was cancelled (client disconnected) or passed its deadline while the model worked."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class Stop:
    """Cancellation signal of one request: set by the event loop, polled by the worker thread."""

    deadline: float  # time.monotonic() after which the work is abandoned
    event: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.event.is_set():
            raise Cancelled("the request was cancelled")
        if time.monotonic() > self.deadline:
            raise Cancelled("the request timed out")


@dataclass
class Answer:
    generation: Generation
    memory_ids: list[str]
    parametric: list[str] = field(default_factory=list)  # kinds of the caller's consolidated memories used
    hits: list[dict[str, Any]] = field(default_factory=list)  # every hit considered: scores, injected or why not
    warnings: list[str] = field(default_factory=list)  # e.g. a consolidated memory that could not be used
    remembered: dict[str, Any] | None = None  # memory_write: what the exchange's write stored and cost


@dataclass
class Chat:
    """One chat request, prepared: its prompt ids, the caller's memory selector, and what the selection chose."""

    ids: Any
    query: str
    user_id: str
    max_new_tokens: int
    sampling: Sampling
    span: tuple[int, int] | None = None
    memory: Any = None  # _Selected, or None without memory
    chosen: list[str] = field(default_factory=list)
    considered: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, gen: Generation, parametric: list[str] | None = None,
               warnings: list[str] | None = None) -> Answer:
        return Answer(gen, list(self.chosen), list(parametric or []), list(self.considered), list(warnings or []))


def public_item(item: dict[str, Any]) -> dict[str, Any]:
    """What a caller sees of one of its stored chunks (an item of the memory contract): no user id."""
    return public_record(item["id"], item)


def public_record(point_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What a caller sees of one stored chunk (its own): no store internals, no user id."""
    return {"id": point_id, "object": "memory", "text": payload.get("text", ""),
            "source_id": payload.get("source_id"), "chunk_index": payload.get("chunk_index"),
            "tokens": payload.get("tokens"), "created": payload.get("created"),
            "metadata": payload.get("metadata") or {}}


class _Selected:
    """Memory-like object for one generation: injects the caller's chunks that the memory selects for the query.

    Selection (search, relevance gate, token budget: :meth:`ActivationMemory.select`) runs inside ``active()``
    under the store lock, so it is part of the measured time to first token, as in-process generation with the
    memory is. ``chosen`` receives the ids injected, ``considered`` every hit with its scores.
    """

    def __init__(self, engine: Engine, user_id: str, top_k: int, budget: int, chosen: list[str],
                 considered: list[dict[str, Any]]):
        self.engine, self.user_id, self.top_k, self.budget = engine, user_id, top_k, budget
        self.chosen, self.considered = chosen, considered
        self.fingerprint = engine.memory.fingerprint

    @contextmanager
    def active(self, *, lm=None, user_id=None, query=None) -> Iterator[Injection]:
        mem = self.engine.memory
        if lm is not None and lm is not mem.lm:
            self.fingerprint.check(lm.fingerprint)
        with self.engine.store_lock:
            payloads = []
            if query and query.strip():
                payloads = mem.select(query, user_id=self.user_id or None, k=self.top_k, budget=self.budget)
                self.considered[:] = mem.last_selection.get("hits", [])
            for p in payloads:  # defence in depth; the search filters by user
                if p.get("user_id") != self.user_id:
                    raise RuntimeError("store returned another user's chunk")
            injection, used = mem._injection(payloads) if mem.config.payload != "none" else (Injection(), [])
        self.chosen[:] = used
        yield injection


class Engine:
    """The model, the memory and the locks around them (see the module docstring).

    Args:
        lm: a LanguageModel.
        memory: an activation memory (anything with search, add, delete and an index store).
    """

    def __init__(self, lm, memory):
        import asyncio

        if not getattr(memory, "supports_search", False) or not hasattr(memory, "store"):
            raise InputError(f"the server needs an activation memory; {memory.kind!r} memories cannot be searched "
                             "per user")
        self.lm = lm
        self.memory = memory
        check_free = getattr(memory, "_check_free_space", None)
        if check_free is not None:  # a disk too full to take a write is said at start, not at the first add
            check_free(0)
        if memory.config.gate_threshold > 0:  # an unfitted relevance score is fitted now, not at the first request
            _ = memory.calibrator
        self.model_lock = asyncio.Lock()
        self.store_lock = threading.Lock()
        self.training_lock = threading.Lock()  # one consolidation at a time
        self._parametric_cache: dict[str, tuple[int, Any]] = {}
        self.batcher = None  # a Batcher (nativemem.server.batcher) when the server decodes chats in batches

    # ------------------------------------------------------------------ generation
    def generate(self, messages: list[dict[str, str]], *, user_id: str, max_new_tokens: int, use_memory: bool,
                 top_k: int | None, stop: Stop, on_token: Callable[[list[int]], None] | None = None,
                 sampling: Sampling = GREEDY, keep: bool = False) -> Answer:
        """Answer to chat ``messages`` with the caller's memory injected (call under ``model_lock``); ``keep``: the
        generation keeps its KV for :meth:`remember` to reuse."""
        chat = self.prepare(messages, user_id=user_id, max_new_tokens=max_new_tokens, use_memory=use_memory,
                            top_k=top_k, sampling=sampling, keep=keep)
        stop.check()
        notices: list[str] = []
        parametric = self._parametric(user_id, notices) if use_memory else []
        with ExitStack() as scope:  # the caller's consolidated memories (hooks) around the KV-prefix injection
            for target in parametric:
                scope.enter_context(target.active(lm=self.lm, user_id=user_id, query=chat.query))
            gen = self.lm.generate(chat.ids, max_new_tokens=max_new_tokens, memory=chat.memory, user_id=user_id,
                                   query=chat.query, sampling=sampling, on_token=self._tick(stop, on_token),
                                   keep=chat.span, keep_layer=getattr(self.memory, "retrieval_layer", None))
        return chat.answer(gen, [t.kind for t in parametric], notices)

    def prepare(self, messages: list[dict[str, str]], *, user_id: str, max_new_tokens: int, use_memory: bool,
                top_k: int | None, sampling: Sampling = GREEDY, keep: bool = False) -> Chat:
        """Check the messages and set up the prompt and the caller's memory selection (nothing runs yet)."""
        for i, m in enumerate(messages):
            check_text(m["content"], what=f"message {i} content")
        query = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        # without a system message, the one the memory's chunks were written under (so they sit in the user turn)
        has_system = any(m["role"] == "system" for m in messages)
        ids = self.lm.chat_ids(messages, system=None if has_system else self.memory.chat_system)
        span = None
        if keep and messages[-1]["role"] == "user":
            span = self.lm.user_span(messages, system=None if has_system else self.memory.chat_system)
        chat = Chat(ids=ids, query=query, user_id=user_id, max_new_tokens=max_new_tokens, sampling=sampling,
                    span=span)
        # chunks that would push the prompt past the window are left out (the answer lists what was injected)
        frame, splice = self.memory.frame_ids()
        spliced = splice if ids[0, :splice].tolist() == frame[:splice] else 0
        budget = self.lm.max_context - int(ids.shape[1]) - max_new_tokens - len(frame) + spliced
        if use_memory:
            chat.memory = _Selected(self, user_id, top_k or self.memory.config.top_k, budget, chat.chosen,
                                    chat.considered)
        return chat

    def batchable(self, user_id: str, *, use_memory: bool, keep: bool) -> bool:
        """Whether a chat can decode in a batch with others: the server batches, the exchange is not kept for a
        memory write, and no consolidated memory of the caller (hooks on the whole model) takes part."""
        from ..memories.base import MEMORY_CONFIG_NAME

        if self.batcher is None or keep:
            return False
        return not use_memory or not any((self._consolidated_folder(user_id, into) / MEMORY_CONFIG_NAME).is_file()
                                         for into in ("side_ffn", "pkm"))

    def prefill(self, chat: Chat, *, stop: Stop, on_token: Callable[[list[int]], None] | None = None):
        """Run ``chat``'s prompt after its memory prefix and choose its first token, for a
        :class:`~nativemem.batching.DecodeBatch` (call under ``model_lock``)."""
        from ..batching import prefill

        stop.check()
        start = time.perf_counter()
        with chat.memory.active(lm=self.lm, user_id=chat.user_id, query=chat.query) if chat.memory is not None \
                else nullcontext() as injection:
            return prefill(self.lm, chat.ids, injection=injection, max_new_tokens=chat.max_new_tokens,
                           sampling=chat.sampling, on_token=self._tick(stop, on_token), start=start)

    @staticmethod
    def _tick(stop: Stop, on_token: Callable[[list[int]], None] | None) -> Callable[[list[int]], None]:
        def tick(token_ids: list[int]) -> None:
            stop.check()
            if on_token is not None:
                on_token(token_ids)

        return tick

    def _consolidated_folder(self, user_id: str, into: str):
        import hashlib

        digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]
        return self.memory.path / "consolidated" / f"{digest}-{into}"

    def _parametric(self, user_id: str, warnings_out: list[str] | None = None) -> list:
        """The caller's consolidated parametric memories (opened once, reopened after a new consolidation).

        One that cannot be read (damaged) is left out, with a warning for the reply (no server path in it)."""
        from ..memories.base import MEMORY_CONFIG_NAME, open_memory

        out = []
        for into in ("side_ffn", "pkm"):
            folder = self._consolidated_folder(user_id, into)
            config = folder / MEMORY_CONFIG_NAME
            if not config.is_file():
                continue
            stamp = config.stat().st_mtime_ns
            cached = self._parametric_cache.get(str(folder))
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, open_memory(folder, self.lm))
                except Exception as e:  # a damaged memory must not lock its user out
                    log.warning("consolidated %s memory of a user cannot be read: %s", into, e)
                    if warnings_out is not None:
                        warnings_out.append(f"your consolidated {into} memory cannot be read (damaged) and was not "
                                            "used; remove it with DELETE /v1/memories/consolidated")
                    continue
                self._parametric_cache[str(folder)] = cached
            out.append(cached[1])
        return out

    def delete_consolidated(self, *, user_id: str, into: str | None = None) -> dict[str, Any]:
        """Remove the caller's consolidated memories (one kind, or all); call under ``model_lock``."""
        import shutil

        kinds = [into] if into else ["side_ffn", "pkm"]
        for kind in kinds:
            if kind not in ("side_ffn", "pkm"):
                raise InputError(f"unknown consolidated memory kind {kind!r}; use side_ffn or pkm")
        deleted = []
        for kind in kinds:
            folder = self._consolidated_folder(user_id, kind)
            self._parametric_cache.pop(str(folder), None)
            if folder.exists():
                shutil.rmtree(folder)
                deleted.append(kind)
        return {"object": "memory.consolidated.deleted", "deleted": deleted}

    # ------------------------------------------------------------------ memories
    def add(self, texts: Sequence[str], *, user_id: str, metadata: dict[str, Any], stop: Stop,
            turns: Turns | None = None) -> dict[str, Any]:
        """Write ``texts`` for ``user_id``; all or nothing. With ``turns`` (:func:`~.calls.with_turns`), call holding
        nothing: each batch takes the model and each commit the store for its own time only; without, call under
        ``model_lock`` (the store is still taken step by step)."""
        texts = [check_text(t, what=f"text {i}" if len(texts) > 1 else "text") for i, t in enumerate(texts)]
        if "source_id" in metadata:
            raise InputError("metadata.source_id is reserved: the server gives each text its own source id")
        sources = [str(uuid.uuid4()) for _ in texts]
        stop.check()
        turns = turns or self._store_turns()
        try:
            receipt = self.memory.add(texts, user_id=user_id or None, metadata=metadata, source_ids=sources,
                                      turns=turns)
        except BaseException:  # batches written before the failure are removed: all or nothing
            with turns.store():
                for source in sources:
                    self._delete_source(source, user_id)
            raise
        with turns.store():  # in write order: text by text, chunk by chunk
            stored = [item for source in sources
                      for item in self.memory.items(user_id=user_id or None, source_id=source, limit=_ALL)]
        return {"object": "memory.add", "ids": [item["id"] for item in stored], "source_ids": sources,
                "data": [public_item(item) for item in stored], "notes": list(receipt.notes)}

    def _store_turns(self) -> Turns:
        """Turns for a write whose caller holds ``model_lock``: the store lock is taken for each store step."""
        return Turns(store=lambda: self.store_lock)

    def _delete_source(self, source: str, user_id: str) -> list[str]:
        ids = [item["id"] for item in self.memory.items(user_id=user_id or None, source_id=source, limit=_ALL)]
        for pid in ids:
            self.memory.delete(pid)
        return ids

    def search(self, query: str, *, user_id: str, k: int) -> list[dict[str, Any]]:
        """The caller's top-k chunks for ``query`` (call under ``model_lock``)."""
        query = check_text(query, what="query")
        with self.store_lock:
            hits = self.memory.search(query, k=k, user_id=user_id or None)
        return [{**public_record(h.id, h.payload), "score": h.score, "relevance": h.relevance} for h in hits
                if h.payload.get("user_id") == user_id]

    def list(self, *, user_id: str, limit: int, offset: int) -> dict[str, Any]:
        with self.store_lock:
            page = self.memory.items(user_id=user_id or None, limit=limit, offset=offset)
            total = self.memory.count(user_id=user_id or None)
        return {"object": "list", "data": [public_item(item) for item in page], "total": total,
                "offset": offset, "has_more": offset + limit < total}

    def get(self, memory_id: str, *, user_id: str) -> dict[str, Any] | None:
        with self.store_lock:
            item = self.memory.get(memory_id, user_id=user_id or None)
        return public_item(item) if item is not None else None

    def delete(self, memory_id: str, *, user_id: str) -> list[str] | None:
        """Delete one chunk, or every chunk of one source, of the caller; None when the caller has neither."""
        with self.store_lock:
            if self.memory.get(memory_id, user_id=user_id or None) is not None:
                self.memory.delete(memory_id)
                return [memory_id]
            return self._delete_source(memory_id, user_id) or None

    def remember(self, answer: Answer, messages: list[dict[str, str]], *, user_id: str) -> None:
        """Write the finished exchange (last user message, the answer) into the caller's memory; the cost and ids go
        to ``answer.remembered`` (call under ``model_lock``)."""
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if not answer.generation.text.strip():
            answer.remembered = {"ids": [], "skipped": "empty answer"}
            return
        with self.store_lock:
            receipt = self.memory.remember(question, answer.generation.text, user_id=user_id or None,
                                           generation=answer.generation)
        answer.generation.kept = None
        answer.remembered = {"ids": list(receipt.ids), "duplicate": receipt.details["duplicate"],
                             "reused_kv": bool(receipt.details.get("reused_kv")),
                             "write_s": round(receipt.elapsed_s, 6),
                             "turn_s": round(answer.generation.total_s, 6)}

    def update(self, memory_id: str, *, user_id: str, text: str | None, metadata: dict[str, Any] | None,
               stop: Stop) -> dict[str, Any] | None:
        """Replace one of the caller's chunks (call under ``model_lock``); None when the caller has no such chunk."""
        stop.check()
        with self.store_lock:
            if self.memory.get(memory_id, user_id=user_id or None) is None:
                return None
            self.memory.update(memory_id, text=text, metadata=metadata, user_id=user_id or None)
            return public_item(self.memory.get(memory_id, user_id=user_id or None))

    def history(self, memory_id: str, *, user_id: str) -> dict[str, Any] | None:
        with self.store_lock:
            versions = self.memory.history(memory_id, user_id=user_id or None)
        if not versions:
            return None
        return {"object": "list", "id": memory_id, "data": versions}

    def reset(self, *, user_id: str) -> dict[str, Any]:
        """Delete every chunk of the caller."""
        with self.store_lock:
            receipt = self.memory.reset(user_id or None)
        return {"object": "memory.reset", "deleted": len(receipt.ids)}

    def export(self, *, user_id: str) -> str:
        """The caller's chunks in the portable export format (JSON Lines), user ids left out."""
        from ..memories.export import dumps_export

        with self.store_lock:
            items = self.memory.items(user_id=user_id or None, limit=1 << 40)
        return dumps_export([{**i, "user_id": ""} for i in items], kind=self.memory.kind,
                            model=self.lm.name, user_id=None)

    def import_(self, text: str, *, user_id: str, stop: Stop, turns: Turns | None = None) -> dict[str, Any]:
        """Encode an export file's items into the caller's memory, all or nothing (``turns`` as for :meth:`add`).

        Every item becomes the caller's, with a new id: an import never reuses, or tells anything about, the ids
        of other users."""
        from ..memories.export import loads_export

        _, items = loads_export(text, where="body")
        for n, item in enumerate(items):
            item.update(id=str(uuid.uuid4()), user_id=user_id)
            if item.get("metadata") is not None and len(json.dumps(item["metadata"])) > MAX_METADATA_CHARS:
                raise InputError(f"body: item {n}: metadata larger than {MAX_METADATA_CHARS:,} characters of JSON")
        stop.check()
        receipt = self.memory.import_items(items, turns=turns or self._store_turns())
        return {"object": "memory.import", "imported": receipt.details["imported"], "ids": list(receipt.ids)}

    def consolidate(self, into: str, *, user_id: str, stop: Stop,
                    turn: Callable[[], AbstractContextManager]) -> dict[str, Any]:
        """Train the caller's chunks into a parametric memory of ``into`` kind; call holding no lock.

        Every model step (each probe, each training step) takes ``turn()`` (the model lock, in turn with other
        requests; it checks ``stop`` first), the store lock is held only to read the chunks, and one consolidation runs at a time
        (``training_lock``: training marks the backbone frozen for its whole length). ``stop`` ends it at the next
        step; nothing is saved then. The target lives in ``<memory>/consolidated/<user digest>-<kind>`` and grows
        with every call; it is saved within a model turn, so no chat reads it half written.
        """
        from ..consolidate import consolidate, stored_chunks
        from ..memories.base import open_memory
        from ..turns import taking_turns

        while not self.training_lock.acquire(timeout=0.2):
            stop.check()
        try:
            folder = self._consolidated_folder(user_id, into)
            folder.parent.mkdir(parents=True, exist_ok=True)

            with turn():
                try:
                    target = open_memory(folder, self.lm, kind=into)
                except Exception as e:
                    log.warning("consolidated %s memory of a user cannot be read: %s", into, e)
                    raise InputError(f"your consolidated {into} memory cannot be read (damaged); remove it with "
                                     f"DELETE /v1/memories/consolidated?into={into}, then consolidate again") from None
            with self.store_lock:
                chunks = stored_chunks(self.memory, user_id or None)
            with taking_turns(turn):  # turn() checks stop first
                receipt = consolidate(self.memory, target, user_id=user_id or None, chunks=chunks)
            stop.check()
            if not receipt.did_nothing:
                with turn():
                    target.save(folder)
                    self._parametric_cache.pop(str(folder), None)
        finally:
            self.training_lock.release()
        out = receipt.to_dict()
        out["details"].pop("user_id", None)
        return {"object": "memory.consolidation", "into": into, **out}

