"""Benchmark arms of the activation memory.

Every arm here shares one :class:`~nativemem.memories.activation.ActivationMemory` per run (built by the
first arm that needs it, reused by the others in the same process): the whole pool is written to it, each
pool chunk as one memory chunk whose ``source_id`` is the pool chunk id. The memory's retrieval transform
is fitted first on a fit set disjoint from the pool (:func:`fit_texts`: the task's chunks outside the
pool, seeded sample): never fitted on what is evaluated; with fewer than :data:`MIN_FIT_TEXTS` such
texts (SQuAD from 300 questions on: the pool is the whole file) the memory stays unfitted.

- ``activation``: retrieve the top-``k`` chunks of the whole pool with the memory's default variant
  (``hybrid_tokens``: token-level MaxSim fused with BM25 by RRF - a hybrid, report it as such) and inject
  their KV as a prefix before the chat-formatted question (no passages in the prompt).
  ``activation_pooled``, ``activation_tokens``, ``activation_hybrid`` do the same with the pooled
  KV-Embedding vector, token MaxSim alone, and pooled + BM25.
- ``activation_oracle``: inject the gold chunk(s) of the item (no retrieval).
- ``random_memory``: inject one random pool chunk that is not gold (seeded by the item id).
- ``text_same_order``: the exact token sequence of the ``activation`` arm (the chat prompt's head, the
  retrieved chunks in the same order, then the rest of the chat prompt) given as plain text; its answers should match ``activation``'s (up to
  the fp16 payload), which :func:`answer_agreement` checks on a finished run.

Retrieval time is outside TTFT for these arms, as for ``rag_*`` (both retrieve before generating); payload
loading, re-rotation and cache assembly are inside it. Tasks that set ``retrieval_scope = "source"``
(``needle``) restrict retrieval to the item's own source chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ContextOverflowError, InputError
from .arms import Arm, ArmOutput, register_arm
from ..prompting import DEFAULT_SYSTEM, build_messages, postprocess_answer
from .tasks import Chunk, QAItem, Task

__all__ = ["ActivationArm", "fit_texts", "answer_agreement", "BENCH_MEMORY_CONFIG", "shared_memory"]

BENCH_MEMORY_CONFIG: dict[str, Any] = {"chunk_tokens": 1024, "max_prefix_tokens": 4096, "frame": "chat",
                                       "frame_system": DEFAULT_SYSTEM}
"""Config of the benchmark memory: one pool chunk = one memory chunk, written in the user turn of the
arms' own chat prompt (system prompt included), so an injected chunk sits where ``rag_*`` arms paste their
passages; ``top_k`` is the arm's ``k``."""
FIT_TEXTS_MAX = 256
MIN_FIT_TEXTS = 64  # below this, the memory is left unfitted (raw states, cosine)
BENCH_USER = "bench"
READ_OPTIONS = {"recompute_tokens", "device_cache_bytes", "host_cache_bytes", "max_prefix_tokens", "prefix_order"}
"""Memory options that only change how stored chunks are read: a kept benchmark memory is reused across them."""
TMP_ENV = "NATIVEMEM_BENCH_TMP"  # where benchmark memories are written (default: the system temp folder)
KEEP_ENV = "NATIVEMEM_BENCH_MEMORY"  # keep benchmark memories here and reuse them for the same pool


def fit_texts(task: Task, pool: Sequence[Chunk], *, n: int = FIT_TEXTS_MAX, seed: int = 0) -> list[str]:
    """Fit set for the retrieval transform: the task's own ``fit_texts(pool)`` if it has one, else up to ``n``
    of the task's chunks that are not in the pool (seeded sample). Empty if there are none."""
    own = getattr(task, "fit_texts", None)
    if callable(own):
        return list(own(pool))[:n]
    in_pool = {c.id for c in pool}
    rest = [c.text for cid, c in task.data.chunks.items() if cid not in in_pool]
    random.Random(seed).shuffle(rest)
    return rest[:n]


class _Shared:
    """One memory per (model, pool, k): written once, used by every activation arm of a run.

    With ``$NATIVEMEM_BENCH_MEMORY`` set to a folder, the memory is kept there (one sub-folder per task,
    pool, model and memory config) and a later run with the same pool opens it instead of writing it again.
    """

    def __init__(self, lm, pool: Sequence[Chunk], task: Task, k: int, progress: bool, pooled: bool = False,
                 options: dict[str, Any] | None = None):
        import nativemem as nm

        self.pooled = pooled
        options = dict(options or {})
        config = {"top_k": k, "index_pooled": pooled, **BENCH_MEMORY_CONFIG, **options}
        keep = os.environ.get(KEEP_ENV)
        if keep:
            digest = hashlib.sha256(json.dumps([[c.id, c.text] for c in pool]).encode())
            digest.update(json.dumps([lm.fingerprint.short, task.name, pooled, BENCH_MEMORY_CONFIG]).encode())
            written = {key: v for key, v in options.items() if key not in READ_OPTIONS}
            if written:  # (memories kept before options existed keep their folder names)
                digest.update(json.dumps(written, sort_keys=True).encode())
            self.folder = Path(keep) / f"{task.name}-{len(pool)}-{digest.hexdigest()[:12]}"
            if (self.folder / "memory" / "memory_config.json").is_file():
                self.memory = nm.open_memory(self.folder / "memory", lm)
                self.memory.config.top_k = k
                for key in READ_OPTIONS & set(options):  # how this run reads the kept memory
                    setattr(self.memory.config, key, options[key])
                self.memory.config.__post_init__()  # validated like a new config
                self.fit_report = self.memory.config.fit_report
                self._index(pool)
                if set(self.by_source) == {c.id for c in pool}:
                    return
                raise InputError(f"the kept benchmark memory {self.folder} does not hold this pool (an interrupted "
                                 "write?); remove the folder")
            self.folder.mkdir(parents=True, exist_ok=True)
        else:
            self.folder = Path(tempfile.mkdtemp(prefix="nativemem-bench-", dir=os.environ.get(TMP_ENV)))
        self.memory = nm.open_memory(self.folder / "memory", lm, kind="activation", **config)
        texts = fit_texts(task, pool)
        # too small a fit set hurts: on SQuAD, 21 leftover paragraphs gave hit@1 0.59 where raw states gave 0.78
        self.fit_report = self.memory.fit(texts).details if len(texts) >= MIN_FIT_TEXTS else None
        from tqdm.auto import tqdm

        step = 64
        for i in tqdm(range(0, len(pool), step), desc="activation memory: add pool", disable=not progress):
            part = pool[i: i + step]
            self.memory.add([c.text for c in part], user_id=BENCH_USER, source_ids=[c.id for c in part])
        self._index(pool)
        if not keep:
            weakref.finalize(self, _cleanup, self.memory, str(self.folder))

    def _index(self, pool: Sequence[Chunk]) -> None:
        self.by_source: dict[str, list[str]] = {}
        self.source_of: dict[str, str] = {}
        rows = self.memory.store.index.scroll(user_id=BENCH_USER, with_payload=["source_id", "chunk_index"])
        for mid, payload in sorted(rows, key=lambda r: (str(r[1].get("source_id")), r[1].get("chunk_index", 0))):
            self.by_source.setdefault(str(payload["source_id"]), []).append(mid)
            self.source_of[mid] = str(payload["source_id"])
        self.pool_ids = [c.id for c in pool]

    def bytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())


def _cleanup(memory, folder: str) -> None:
    memory.close()
    del memory
    import gc

    gc.collect()  # the store closes (and unlocks) once no Memory holds it
    shutil.rmtree(folder, ignore_errors=True)


_SHARED: dict[tuple, _Shared] = {}


def shared_memory(lm, pool: Sequence[Chunk], task: Task, k: int, progress: bool = False,
                  pooled: bool = False, options: dict[str, Any] | None = None) -> _Shared:
    """The run's shared benchmark memory (the last one built is kept; older ones are dropped).

    ``pooled``: the arm retrieves by pooled vectors; a memory written without them is rebuilt with them
    (list pooled arms first to write the pool once).
    """
    key = (id(lm), tuple(c.id for c in pool), task.name, k, json.dumps(options or {}, sort_keys=True))
    if key not in _SHARED or (pooled and not _SHARED[key].pooled):
        _SHARED.clear()
        _SHARED[key] = _Shared(lm, pool, task, k, progress, pooled, options)
    return _SHARED[key]


class _MemoryArm(Arm):
    """Base: prepare the shared memory; helpers to retrieve and to answer with a pinned injection."""

    variant: str | None = None  # None: the memory's default variant

    def prepare(self, pool, lm, *, items, task) -> None:
        super().prepare(pool, lm, items=items, task=task)
        self.shared = shared_memory(lm, pool, task, self.k, self.progress,
                                    pooled=self.variant in ("pooled", "hybrid"), options=self.memory_options)
        self.memory = self.shared.memory

    def bytes_stored(self) -> int:
        return self.shared.bytes_stored()

    def retrieve(self, item: QAItem) -> tuple[list[str], tuple[tuple[str, float], ...]]:
        """Memory chunk ids to inject and ``(pool chunk id, score)`` pairs, best first (``last_search_s``: the
        search's time, query encoding included)."""
        import time

        start = time.perf_counter()
        scope = None
        if getattr(self.task, "retrieval_scope", "pool") == "source":
            scope = [m for cid in item.source_chunk_ids for m in self.shared.by_source.get(cid, [])]
        hits = self.memory.search(item.question, k=self.k, user_id=BENCH_USER, variant=self.variant,
                                  memory_ids=scope)
        self.last_search_s = time.perf_counter() - start
        retrieved, seen = [], set()
        for h in hits:
            cid = self.shared.source_of.get(h.id, h.payload.get("source_id"))
            if cid not in seen:
                seen.add(cid)
                retrieved.append((cid, h.score))
        return [h.id for h in hits], tuple(retrieved)

    def ordered(self, memory_ids: list[str]) -> list[str]:
        return memory_ids[::-1] if self.memory.config.prefix_order == "best_last" else memory_ids

    def answer_with(self, item: QAItem, memory_ids: list[str], retrieved=()) -> ArmOutput:
        return self.generate_answer(item, (), retrieved, memory=self.memory.injecting(self.ordered(memory_ids)))


@register_arm("activation")
class ActivationArm(_MemoryArm):
    """Top-``k`` chunks of the pool (memory's default variant: token MaxSim + BM25), injected as a KV prefix."""

    uses_retrieval = True

    def answer(self, item: QAItem) -> ArmOutput:
        ids, retrieved = self.retrieve(item)
        return dataclasses.replace(self.answer_with(item, ids, retrieved), search_s=self.last_search_s)


@register_arm("activation_gated")
class ActivationGatedArm(_MemoryArm):
    """The memory chooses what to inject, as in a chat: the top-``k`` hits whose calibrated relevance passes
    ``gate_threshold`` (the option of that name, else the memory's own; 0 injects the top ``k`` always).

    The ``memory`` option (with ``user_id``) answers from a memory the caller wrote instead of the run's
    shared one. ``last_info`` holds every hit considered (``hits``) and the gate's time (``gate_s``).
    """

    uses_retrieval = True

    def prepare(self, pool, lm, *, items, task) -> None:
        if self.options.get("memory") is None:
            super().prepare(pool, lm, items=items, task=task)
            self.user_id = BENCH_USER
        else:
            Arm.prepare(self, pool, lm, items=items, task=task)
            self.memory, self.user_id = self.options["memory"], self.options.get("user_id", BENCH_USER)

    def answer(self, item: QAItem) -> ArmOutput:
        cfg = self.memory.config
        before = cfg.gate_threshold
        cfg.gate_threshold = self.options.get("gate_threshold", before)
        try:
            out = self.generate_answer(item, memory=self.memory, user_id=self.user_id, query=item.question)
        finally:
            cfg.gate_threshold = before
        sel = self.memory.last_selection
        self.last_info = {"hits": sel.get("hits", []), "gate_s": float(sel.get("gate_s", 0.0))}
        return dataclasses.replace(out, retrieved=tuple(
            (str(h.get("source_id") or h["id"]), float(h["score"])) for h in self.last_info["hits"] if h["injected"]))

    def bytes_stored(self) -> int:
        return self.shared.bytes_stored() if self.options.get("memory") is None else 0


@register_arm("activation_pooled")
class ActivationPooledArm(ActivationArm):
    """As ``activation``, retrieving by the pooled KV-Embedding vector."""

    variant = "pooled"


@register_arm("activation_tokens")
class ActivationTokensArm(ActivationArm):
    """As ``activation``, retrieving by token-level MaxSim."""

    variant = "tokens"


@register_arm("activation_hybrid")
class ActivationHybridArm(ActivationArm):
    """As ``activation``, retrieving by the pooled vector fused with BM25 (RRF)."""

    variant = "hybrid"


@register_arm("activation_oracle")
class OracleArm(_MemoryArm):
    """The item's gold chunk(s) injected, no retrieval (an upper bound of the injection path)."""

    def answer(self, item: QAItem) -> ArmOutput:
        ids = [m for cid in item.gold_chunk_ids for m in self.shared.by_source.get(cid, [])]
        return self.answer_with(item, ids)


@register_arm("random_memory")
class RandomMemoryArm(_MemoryArm):
    """One random non-gold pool chunk injected (a control: does any prefix help?)."""

    def answer(self, item: QAItem) -> ArmOutput:
        gold = set(item.gold_chunk_ids)
        choices = [cid for cid in self.shared.pool_ids if cid not in gold] or self.shared.pool_ids
        cid = random.Random(f"random_memory:{item.id}").choice(choices)
        return self.answer_with(item, self.shared.by_source[cid])


@register_arm("text_same_order")
class TextSameOrderArm(_MemoryArm):
    """The ``activation`` arm's exact token sequence (prompt head, retrieved chunks, rest of the prompt) as text."""

    uses_retrieval = True

    def answer(self, item: QAItem) -> ArmOutput:
        ids, retrieved = self.retrieve(item)
        full = self.memory.as_text(self.lm.chat_ids(build_messages(item.question)), self.ordered(ids))
        limit = int(self.lm.max_context)
        if full.shape[1] + self.max_new_tokens > limit:
            return self._overflow(int(full.shape[1]), limit, retrieved)
        try:
            gen = self.lm.generate(full, max_new_tokens=self.max_new_tokens)
        except ContextOverflowError as e:
            return self._overflow(e.tokens, limit, retrieved)
        return ArmOutput(search_s=self.last_search_s, text=postprocess_answer(gen.text), raw_text=gen.text,
                         ttft_s=float(gen.ttft_s),
                         total_s=float(gen.total_s), prompt_tokens=int(gen.prompt_tokens),
                         new_tokens=int(gen.new_tokens), prefix_tokens=0, retrieved=retrieved)


def answer_agreement(folder: str | Path, a: str = "activation", b: str = "text_same_order") -> dict[str, Any]:
    """How often arms ``a`` and ``b`` of a finished run gave the same raw answer (items both answered)."""
    from .results import read_items

    by_arm: dict[str, dict[str, str]] = {}
    for rec in read_items(folder):
        if not rec.get("skipped"):
            by_arm.setdefault(rec["arm"], {})[rec["item_id"]] = rec["raw_output"]
    common = sorted(set(by_arm.get(a, {})) & set(by_arm.get(b, {})))
    same = [i for i in common if by_arm[a][i] == by_arm[b][i]]
    return {"a": a, "b": b, "n": len(common), "same": len(same), "rate": len(same) / len(common) if common else None,
            "different": [i for i in common if i not in same]}
