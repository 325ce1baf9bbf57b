"""ActivationMemory: chunks stored as the model's own KV (payload) plus retrieval vectors from its own states.

Write (:meth:`ActivationMemory.add`): sentence-aware chunks under a token budget; per batch of chunks one
payload forward pass (KV with pre-RoPE keys, token vectors, the KV-Embedding slot) and, for memories that
index it, one re-routed pass (pooled vector). Each chunk's KV is quantised where it was computed and becomes
one record (:mod:`.payload`); a worker thread appends the batch's records to a segment with one fsync, then
upserts and flushes its index points, while the model encodes the next batch. The points carry a ``pending``
field that hides them from every read until all batches are committed; then they are published together
and the add returns (every chunk acknowledged): an add is seen whole or not at all, even across a SIGKILL
(what a killed add left pending is dropped when the folder is next opened). Before the index learns of a
chunk, its text goes to the folder's catalog (:mod:`.catalog`), which the index can be rebuilt from:
:meth:`ActivationMemory.repair` (``nativemem repair``) after a damaged index, which the open reports.

Frame (``config.frame``): every chunk is written after the same head. ``chat`` (default on chat models):
the chat template's system turn (``frame_system``) and the opening of the user turn, so ``Context: <chunk>``
sits inside the user message, where RAG prompts paste passages; ``raw``: after BOS alone.

Read (:meth:`search`, :meth:`active`): the query is encoded the same way (up to the retrieval layer only)
and searched with the configured variant, restricted to the caller's ``user_id``; the retrieved chunks come
from the tiers (:mod:`.tiers`: device, host RAM, disk) and, with the frame's KV, become a prefix cache
(keys rotated for their new positions). A prompt that starts with the frame's head (same
system prompt) continues right after the chunks without it (:attr:`Injection.splice`), so ``lm.generate``
prefills only the question and the end of the user turn; another prompt gets the whole prefix before it.
A chunk whose payload is missing or corrupted is skipped with a :class:`ChunkSkippedWarning`; the others
are still served. Several chunks are encoded independently, so a later chunk never attended to an earlier one
(unlike the same tokens given as text); with one chunk, injection equals the text prompt exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from ...errors import ContextOverflowError, InputError
from ...text import check_text, chunk_text
from ..base import Hit, Injection, Memory, Receipt
from .config import ActivationConfig
from .encode import Encoded, Layout, Transform, encode
from .kv import Captured, ChunkKV, capture, dequantize_int8, kv_geometry, quantize_int8, recompute_kv
from .payload import Record, dequantize, is_segment_location, pack, parse_location, quantize
from .store import (DEFAULT_USER, PENDING, REPAIR_HINT, BlobError, IndexPoint, Store, bm25_document, bm25_query,
                    new_id, open_store, serialize)
from .tiers import KVTiers

__all__ = ["ActivationMemory", "ChunkSkippedWarning", "BLOB_FORMAT", "reencode_memory", "oldest_first", "Turns"]

BLOB_FORMAT = "nativemem-activation-blob/1"
TIE_MARGIN = 8  # extra rows fetched per search to order tied scores deterministically
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ChunkSkippedWarning(UserWarning):
    """A retrieved chunk could not be injected (missing or corrupted blob, other model); others still are."""


@dataclass(frozen=True)
class Turns:
    """How a long write shares the model and the store with other threads (a server's locks): each batch's
    encoding runs inside ``model()``, each batch's commit and the add's publication inside ``store()``, and
    between them the write holds neither, so another request waits at most one batch. Chunking runs before
    any turn. A context manager factory may raise to abandon the write (it is then rolled back)."""

    model: Callable[[], AbstractContextManager] = nullcontext
    store: Callable[[], AbstractContextManager] = nullcontext
    batch_size: int | None = None  # chunks per model turn (None: the memory's ``batch_size``)


def best_rows(rows: Sequence[tuple[str, float, dict[str, Any]]], k: int) -> list[tuple[str, float, dict[str, Any]]]:
    """The ``k`` best ``(id, score, payload)`` rows; equal scores (frequent with rank fusion) are ordered by the
    chunk's source and place in it, then its id: the same order in every run over the same data."""
    return sorted(rows, key=lambda r: (-round(r[1], 9), str(r[2].get("source_id", "")),
                                       int(r[2].get("chunk_index") or 0), r[0]))[:k]


class ActivationMemory(Memory):
    """Stores chunks as KV payloads and retrieves them by the model's own states (see module docstring)."""

    kind = "activation"
    config_cls = ActivationConfig
    param_prefix = "activation_"
    supports_search = True

    def __init__(self, lm, config: ActivationConfig | None = None, *, path=None):
        super().__init__(lm, config, path=path)
        self.config: ActivationConfig
        self.geometry = kv_geometry(lm.model)
        self.pooled_transform = Transform()
        self.token_transform = _initial_token_transform(self.geometry.hidden_size, self.config.token_dim)
        self._store: Store | None = None
        self.last_timing: dict[str, Any] = {}
        self.last_selection: dict[str, Any] = {}
        self._noted_unfitted = False
        self._repairing = False  # repair(): the catalog already holds the chunks being re-encoded
        self.damage: dict[str, Any] = {}  # what the last open found missing or unreadable (see _reconcile)
        self._tmpdir: str | None = None
        self._frame_cache: dict[str, Any] | None = None
        L = self.geometry.num_layers
        for name in ("retrieval_layer", "checkpoint_layer"):
            value = getattr(self.config, name)
            if value is not None and not 0 <= value < L:
                raise InputError(f"{name} {value} is out of range: the model has {L} layers")
        for layer in self.config.reroute_layers or ():
            if not 0 <= layer < L:
                raise InputError(f"reroute layer {layer} is out of range: the model has {L} layers")

    # ------------------------------------------------------------------ layers and layout
    @property
    def retrieval_layer(self) -> int:
        if self.config.retrieval_layer is not None:
            return self.config.retrieval_layer
        report = self.config.fit_report or {}
        if "retrieval_layer" in report:
            return int(report["retrieval_layer"])
        return (2 * (self.geometry.num_layers - 1)) // 3

    @property
    def reroute_layers(self) -> list[int]:
        if self.config.reroute_layers is not None:
            return list(self.config.reroute_layers)
        report = self.config.fit_report or {}
        return [int(l) for l in report.get("reroute_layers", [self.retrieval_layer])]

    @property
    def checkpoint_layer(self) -> int | None:
        if self.config.payload != "residual":
            return None
        c = self.config.checkpoint_layer
        return c if c is not None else self.geometry.num_layers // 3

    @property
    def layers_used(self) -> list[int]:
        return sorted({self.retrieval_layer, *self.reroute_layers})

    def _bos(self) -> list[int]:
        bos = self.lm.tokenizer.bos_token_id
        return [] if bos is None else [int(bos)]

    @property
    def chat_system(self) -> str | None:
        """The system prompt chunks are written under (``frame="chat"`` on a chat model), else None."""
        if self.config.frame != "chat" or not getattr(self.lm.tokenizer, "chat_template", None):
            return None
        from ...model import DEFAULT_SYSTEM

        return self.config.frame_system if self.config.frame_system is not None else DEFAULT_SYSTEM

    def frame_ids(self) -> tuple[list[int], int]:
        """Ids every chunk is written after, and how many of them a matching prompt starts with (the splice).

        ``frame="chat"``: the chat template's system turn (``frame_system``) and user-turn opening, all spliced;
        ``frame="raw"`` (or a model without a chat template): BOS alone, nothing spliced.
        """
        if self._frame_cache is None:
            system = self.chat_system
            head = self.lm.chat_head_ids(system) if system is not None else None
            ids = list(head) if head else self._bos()
            self._frame_cache = {"ids": ids, "splice": len(ids) if head else 0,
                                 "digest": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}
        return list(self._frame_cache["ids"]), int(self._frame_cache["splice"])

    def _enc(self, text: str, *, plain: bool = False) -> list[int]:
        """Token ids of ``text``; ``plain``: control-token strings in it (``<|im_end|>``...) are encoded as the
        characters they are, so stored or queried text can never close a turn or open a forged one."""
        if not text:
            return []
        return list(self.lm.tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])

    def chunk_layout(self, text: str) -> Layout:
        """``frame + chunk_prefix + " " + text + chunk_suffix`` (+ the compression prompt for pass 1/2)."""
        head = self.frame_ids()[0] + self._enc(self.config.chunk_prefix)
        content = self._enc(" " + text if self.config.chunk_prefix else text, plain=True)
        ids = head + content + self._enc(self.config.chunk_suffix)
        return Layout(tuple(ids), (len(head), len(head) + len(content)), tuple(self._enc(self.config.compress_prompt)))

    def query_layout(self, query: str) -> Layout:
        head = self._bos() + self._enc(self.config.query_prefix)
        content = self._enc(" " + query if self.config.query_prefix else query, plain=True)
        ids = head + content + self._enc(self.config.chunk_suffix)
        return Layout(tuple(ids), (len(head), len(head) + len(content)), tuple(self._enc(self.config.compress_prompt)))

    # ------------------------------------------------------------------ store
    @property
    def store(self) -> Store:
        if self._store is None:
            if self.path is None:  # an unsaved memory keeps its store in a temporary folder
                self._tmpdir = tempfile.mkdtemp(prefix="nativemem-activation-")
                self.path = Path(self._tmpdir)
            folder = Path(self.path).resolve()
            blob_dir = Path(self.config.blob_dir) if self.config.blob_dir else folder / "blobs"
            key = f"{self.config.backend}:{folder}"
            self._store = open_store(key, backend=self.config.backend, folder=folder, blob_dir=blob_dir,
                                     dims=self.dims(), location=self.config.qdrant_location,
                                     collection=self.collection_name(), redis_url=self.config.redis_url)
            if self.config.backend == "edge" and not self._repairing:  # the folder's one writer: bring the index
                self._reconcile()                                              # in line with the catalog
        return self._store

    _CATALOG_FIELDS = ("memory_id", "user_id", "source_id", "chunk_index", "created", "seq", "text", "metadata",
                       "version")

    def _reconcile(self) -> None:
        """At open: finish what a crash interrupted, and say what the index lacks.

        Points of an add that never finished are dropped (its catalog ``publish`` line is missing) or shown (the
        line is there: the crash came between the two); a delete the catalog recorded is finished; chunks the
        catalog holds but the index lost are counted in :attr:`damage` and reported with the repair command.
        """
        store = self._store
        catalog = store.catalog
        if not catalog.exists:  # a folder written before the catalog: it is made from the index once
            rows = store.index.scroll(with_payload=list(self._CATALOG_FIELDS))
            catalog.add([{k: p.get(k) for k in self._CATALOG_FIELDS} for _, p in rows])
            catalog.create()
            return
        state = catalog.state()
        leftover = store.index.unpublished()
        finish = [i for i in leftover if i in state.live and i not in state.unpublished]
        # an update that never finished: the index holds the new version, unpublished; the old one is restored
        restore = [i for i in leftover if i in state.live and i in state.unpublished]
        drop = [i for i in leftover if i not in state.live]
        store.index.publish(finish)
        if restore:
            self._encode_again([state.live[i] for i in restore])
        if drop:
            catalog.delete(drop)
            store.index.delete(drop)
            warnings.warn(f"{len(drop)} chunks of an add that never finished (the process stopped before "
                          "acknowledging it) were dropped; `gc()` frees their payload", UserWarning, stacklevel=3)
        self.damage = {}
        if state.damaged_lines:
            self.damage["catalog_lines_unreadable"] = state.damaged_lines
            warnings.warn(f"{state.damaged_lines} lines of this memory's catalog cannot be read; the chunks they "
                          "describe cannot be rebuilt by repair", UserWarning, stacklevel=3)
        if store.index.count() == len(state.live):
            return
        in_index = {pid for pid, _ in store.index.scroll(with_payload=False)}
        store.index.delete([i for i in in_index if i in state.deleted])
        missing = len(state.live.keys() - in_index)
        if missing:
            self.damage["chunks_missing_from_index"] = missing
            warnings.warn(f"{missing} of {len(state.live)} acknowledged chunks are missing from this memory's index "
                          f"(damaged); they are not served until you {REPAIR_HINT}", UserWarning, stacklevel=3)

    def dims(self) -> dict[str, int]:
        D = self.geometry.hidden_size
        return {"pooled": self.pooled_transform.dim(D), "tokens": self.token_transform.dim(D)}

    def transform_id(self) -> str:
        h = hashlib.sha256()
        for t in (self.pooled_transform, self.token_transform):
            for x in (t.mean, t.scale, t.proj):
                if x is not None:
                    h.update(x.float().cpu().numpy().tobytes())
        h.update(json.dumps([self.retrieval_layer, self.reroute_layers, self.config.chunk_prefix,
                             self.config.query_prefix, self.config.compress_prompt]).encode())
        return h.hexdigest()[:10]

    def collection_name(self) -> str:
        return self.config.collection or f"nativemem_activation_{self.fingerprint.short}_{self.transform_id()}"

    def close(self) -> None:
        """Release this object's hold on the store (the store closes when no Memory of it remains)."""
        self._store = None
        if self._tmpdir is not None:
            import gc

            gc.collect()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ encoding
    def _encode(self, layouts: Sequence[Layout], *, pooled: bool, payload: bool, framed: bool = False) -> list[Encoded]:
        """``framed``: the layouts are chunks (they start with the frame, whose KV is computed once and reused)."""
        # the pooled pass runs whole sequences (the re-routed slot must see the frame too), so no cache then
        frame = self._frame_state()["kv"] if framed and not pooled and len(self.frame_ids()[0]) > 1 else None
        return encode(self.lm.model, layouts, layer=self.retrieval_layer, reroute=self.reroute_layers,
                      bias=self.config.reroute_bias, pooled=pooled, payload=payload,
                      checkpoint_layer=self.checkpoint_layer, pad_id=self._pad_id(), frame=frame)

    def _pad_id(self) -> int:
        tok = self.lm.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def _check_fits(self, layout: Layout, what: str) -> None:
        n = len(layout.pass_ids)
        if n > self.lm.max_context:
            raise ContextOverflowError(n, self.lm.max_context, what=what)

    # ------------------------------------------------------------------ write
    def add(self, texts, *, user_id: str | None = None, metadata: dict[str, Any] | None = None,
            source_ids: Sequence[str] | None = None, turns: Turns | None = None) -> Receipt:
        """Chunk, encode and store ``texts`` for ``user_id``.

        Args:
            texts: one text or a list of texts.
            user_id: owner; searches of other users never see these chunks (None = the anonymous user).
            metadata: JSON-serialisable fields stored with every chunk (``source_id`` names the source;
                with several texts, ``:<i>`` is appended to it).
            source_ids: one source id per text (instead of ``metadata["source_id"]``).
            turns: how the write shares the model and the store with other threads (:class:`Turns`); by
                default it holds neither, as a single-threaded caller needs.

        Returns:
            Receipt with one id per chunk; ``details["chunks"]`` has tokens and bytes per chunk.
        """
        start = time.perf_counter()
        texts = self._texts(texts)
        user = _check_user(user_id)
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise InputError(f"metadata must be JSON-serialisable: {e}") from None
        base_source = metadata.pop("source_id", None)
        if source_ids is not None and len(source_ids) != len(texts):
            raise InputError(f"source_ids has {len(source_ids)} entries for {len(texts)} texts")
        pending = []  # (source_id, chunk_index, text, layout)
        for i, text in enumerate(texts):
            if source_ids is not None:
                source = str(source_ids[i])
            elif base_source is None:
                source = new_id()
            else:
                source = str(base_source) if len(texts) == 1 else f"{base_source}:{i}"
            for j, chunk in enumerate(chunk_text(text, self.config.chunk_tokens, self.lm.count_tokens,
                                                 token_ends=self.lm.token_ends)):
                layout = self.chunk_layout(chunk)
                self._check_fits(layout, what=f"chunk {j} of text {i} with its template and compression prompt")
                pending.append((source, j, chunk, layout))
        return self._write(pending, user, metadata, start=start, turns=turns)

    def _write(self, pending: list[tuple], user: str, metadata: dict[str, Any], *, start: float,
               encoded: dict[int, Encoded] | None = None, turns: Turns | None = None) -> Receipt:
        """Store ``pending`` chunks (``encoded``: some already encoded, by position) and make the add's receipt."""
        receipt = Receipt(self.kind, "add", layers=self.layers_used,
                          details={"chunks": [], "payload": self.config.payload, "kv_dtype": self.config.kv_dtype,
                                   "bytes_per_token": self.bytes_per_token(), "user_id": user})
        if not self.pooled_transform.fitted and not self._noted_unfitted:
            self._noted_unfitted = True  # said once per memory object, not on every add
            receipt.notes.append("retrieval transform not fitted (raw states, or a random projection of them for "
                                 "models wider than 1,024; cosine): call fit() on a separate fit set before adding "
                                 "for better retrieval")
        done = self._store_chunks(pending, user, metadata, encoded, turns)
        for n in range(len(pending)):
            info = done[n]
            receipt.ids.append(info["id"])
            receipt.tokens += info["tokens"]
            receipt.bytes_written += info["blob_bytes"] + info["index_vector_bytes"]
            receipt.details["chunks"].append(info)
        if receipt.tokens:
            receipt.details["payload_bytes_per_token_written"] = sum(
                c["blob_bytes"] for c in receipt.details["chunks"]) / receipt.tokens
            receipt.details["index_bytes_per_token_written"] = sum(
                c["index_vector_bytes"] for c in receipt.details["chunks"]) / receipt.tokens
        receipt.elapsed_s = time.perf_counter() - start
        return receipt

    def _store_chunks(self, pending: list[tuple], user: str, metadata: dict[str, Any],
                      encoded: dict[int, Encoded] | None = None, turns: Turns | None = None) -> dict[int, dict[str, Any]]:
        """Encode and commit chunks ``(source_id, chunk_index, text, layout[, kept])``, all or nothing; returns
        each chunk's receipt entry by its position in ``pending`` (``encoded``: chunks encoded already)."""
        _ = self.store  # opened (and, for the embedded backend, locked) before any work
        self._check_free_space(sum(len(p[3].ids) for p in pending))
        # batches of similar lengths (less padding); the receipt keeps the input order
        order = sorted(range(len(pending)), key=lambda n: len(pending[n][3].pass_ids))
        done: dict[int, dict[str, Any]] = {}
        # the model encodes batch b+1 while a worker thread makes batch b durable (payload write and fsync, then
        # the index upsert and flush); add() returns once every batch is committed
        futures: list = []
        pending_id = new_id()  # the add's points stay invisible until all are committed, then appear at once
        turns = turns or Turns()
        try:
            self._add_batches(pending, order, done, futures, user, metadata, (pending_id, time.time()),
                              encoded or {}, turns)
        except BaseException:
            written = [info["id"] for info in done.values()]
            updated = {str(p[4]["memory_id"]) for p in pending if len(p) > 4 and int(p[4].get("version") or 1) > 1}
            try:  # nothing of a failed add is ever seen; what a crash leaves pending is dropped at the next open
                fresh = [i for i in written if i not in updated]
                with turns.store():
                    if not self._repairing:
                        self.store.catalog.delete(fresh)
                    self.store.index.delete(fresh)
                if updated and not self._repairing:  # a failed update: the old version comes back
                    live = self.store.catalog.state().live
                    self._encode_again([live[i] for i in updated if i in live])
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        with turns.store():
            if not self._repairing:
                self.store.catalog.publish(pending_id)
            self.store.index.publish([done[n]["id"] for n in range(len(pending))])
        return done

    def _add_batches(self, pending, order, done, futures, user, metadata, add: tuple[str, float],
                     ready: dict[int, Encoded], turns: Turns) -> None:
        """Encode the chunks batch by batch while a worker thread commits the previous batch (``done`` gets each
        chunk's receipt entry by its position in the add; ``ready``: chunks encoded already, by position). Each
        batch's model work takes one ``turns.model()`` turn and each commit one ``turns.store()`` turn."""

        def commit(*args):
            with turns.store():
                return self._commit(*args)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nativemem-commit") as committer:
            size = turns.batch_size or self.config.batch_size
            for b in range(0, len(order), size):
                picked = order[b: b + size]
                batch = [pending[n] for n in picked]
                todo = [n for n in picked if n not in ready]
                with turns.model():
                    fresh = dict(zip(todo, self._encode([pending[n][3] for n in todo], pooled=self.indexes_pooled,
                                                        payload=self.config.payload != "none", framed=True)
                                     if todo else []))
                    encoded = [ready[n] if n in ready else fresh[n] for n in picked]
                    if self.config.payload == "kv":
                        payloads = self._pack_records([p[3] for p in batch], encoded)
                    elif self.config.payload == "residual":
                        payloads = [self._blob_bytes(layout, enc) for (_, _, _, layout, *_), enc in zip(batch, encoded)]
                    else:
                        payloads = None
                    vectors = [(self.pooled_transform.apply(enc.pooled).cpu() if enc.pooled is not None else None,
                                self.token_transform.apply(enc.tokens).half().cpu()) for enc in encoded]
                futures.append(committer.submit(commit, picked, batch, payloads, vectors, user, metadata, add))
                if len(futures) > 2:  # bound what waits in host memory
                    done.update(futures[-3].result())
            for f in futures:
                done.update(f.result())

    def _check_free_space(self, tokens: int) -> None:
        """Refuse a write that would leave less than ``min_free_bytes`` free on the memory's disk (a clear error
        before anything is written, instead of a failure half-way)."""
        import shutil as _shutil

        need = tokens * (self.bytes_per_token() + self._index_bytes(1)) + self.config.min_free_bytes
        folder = Path(self.path)
        try:
            free = _shutil.disk_usage(folder).free
        except OSError:
            return
        if free < need:
            raise InputError(f"not enough free disk space for this write: about {need / 2**20:,.0f} MiB needed "
                             f"({tokens:,} tokens plus min_free_bytes), {free / 2**20:,.0f} MiB free where the memory "
                             "is stored; free some space or lower min_free_bytes")

    def _index_bytes(self, content_tokens: int) -> int:
        """Bytes of one chunk's vectors in the index (token vectors as float16, the pooled one as float32)."""
        dims = self.dims()
        return 2 * content_tokens * dims["tokens"] + (4 * dims["pooled"] if self.indexes_pooled else 0)

    def _record_header(self, tokens: int) -> dict[str, Any]:
        g = self.geometry
        return {"tokens": tokens, "kv_dtype": self.config.kv_dtype, "key_group": self.config.key_group,
                "num_layers": g.num_layers,
                "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim, "fingerprint": self.fingerprint.short,
                "frame": self._frame_digest(), "bos": bool(self._bos())}

    def _frame_digest(self) -> str:
        self.frame_ids()
        return self._frame_cache["digest"]

    def _pack_records(self, layouts: Sequence[Layout], encoded: Sequence[Encoded]) -> list[tuple[dict, memoryview]]:
        """Quantise each chunk's KV where it was computed and move the batch's records to the host in one copy:
        ``(header, body)`` per chunk, ready to append."""
        frame_len = len(self.frame_ids()[0])
        bodies, headers = [], []
        for layout, enc in zip(layouts, encoded):
            skip = frame_len - enc.start  # positions of the frame that this pass captured
            kv = enc.captured.kv
            keys = torch.stack([k[:, skip:] for k in kv.keys])
            values = torch.stack([v[:, skip:] for v in kv.values])
            ids = list(layout.ids[skip + enc.start:])
            group = self.config.key_group
            bodies.append(pack(ids, quantize(keys, values, self.config.kv_dtype, group), kv_dtype=self.config.kv_dtype,
                               key_group=group))
            headers.append(self._record_header(len(ids)))
        flat = torch.cat(bodies)
        if flat.device.type != "cpu":
            host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(flat.device).synchronize()
            flat = host
        view = memoryview(flat.numpy())
        records, offset = [], 0
        for header, body in zip(headers, bodies):
            records.append((header, view[offset: offset + body.numel()]))
            offset += body.numel()
        return records

    def _commit(self, picked: list[int], batch: list[tuple], payloads, vectors: list[tuple], user: str,
                metadata: dict[str, Any], add: tuple[str, float] = ("", 0.0)) -> dict[int, dict[str, Any]]:
        """Make one batch durable: its payload first (one write and one fsync), then its index points (one
        upsert and flush). ``add``: the add's pending id and time (every chunk of an add has the same ``created``;
        ``seq``, its position in the add, orders them). Returns the receipt entry of each chunk by its position."""
        pending_id, created = add
        store = self.store
        if self.config.payload == "kv":
            stored = [(loc, parse_location(loc)[2]) for loc in store.segments.append(payloads)]
        elif self.config.payload == "residual":
            stored = [(store.blobs.put(blob), len(blob)) for blob in payloads]
        else:
            stored = [("", 0)] * len(batch)
        frame_len = len(self.frame_ids()[0])
        points, infos = [], []
        for seq, (source, j, chunk, layout, *kept), (pooled, tokens), (location, nbytes) in zip(
                picked, batch, vectors, stored):
            # kept: what repair() re-encodes keeps of the original chunk (id, owner, time, metadata)
            known = kept[0] if kept else {"memory_id": new_id(), "user_id": user, "created": created,
                                          "metadata": metadata, "version": 1}
            mid = str(known["memory_id"])
            n_tokens = len(layout.ids) - frame_len
            points.append(IndexPoint(mid, pooled.tolist() if pooled is not None else None, tokens.tolist(),
                                     bm25_document(chunk), {
                "memory_id": mid, "user_id": known["user_id"], "source_id": source, "chunk_index": j,
                "created": known["created"], "fingerprint": self.fingerprint.short, "text": chunk, "blob": location,
                "tokens": n_tokens, "content_tokens": int(tokens.shape[0]), "payload_kind": self.config.payload,
                "metadata": known["metadata"], "seq": seq if known.get("seq") is None else known["seq"],
                "version": int(known.get("version") or 1),
                **({PENDING: pending_id} if pending_id else {})}))
            infos.append({"id": mid, "source_id": source, "chunk_index": j, "tokens": n_tokens,
                          "blob_bytes": nbytes, "index_vector_bytes": self._index_bytes(int(tokens.shape[0])),
                          "blob": location})
        if not self._repairing:  # the catalog first: the index never holds a chunk the catalog lacks
            store.catalog.add([{k: p.payload[k] for k in self._CATALOG_FIELDS} for p in points], pending_id)
        store.index.upsert(points)  # flushed: acknowledged from here on
        return dict(zip(picked, infos))

    @property
    def indexes_pooled(self) -> bool:
        """Whether chunks get a pooled KV-Embedding vector (``index_pooled``; auto: the variant needs it)."""
        if self.config.index_pooled is not None:
            return bool(self.config.index_pooled)
        return self.config.variant in ("pooled", "hybrid")

    def bytes_per_token(self) -> int:
        """Payload bytes per stored token by the formula of :class:`ActivationConfig` (scales per token
        included; per-chunk key scales, token ids and record headers are not: ``stats()`` measures those)."""
        if self.config.payload == "none":
            return 0
        return self.geometry.bytes_per_token(self.config.kv_dtype, self.config.payload, self.checkpoint_layer)

    def _blob_bytes(self, layout: Layout, enc: Encoded) -> bytes:
        """Serialise one chunk's payload (frame positions dropped) deterministically."""
        skip = len(self.frame_ids()[0]) - enc.start  # positions of the frame that this pass captured
        kv = enc.captured.kv
        upto = self.geometry.num_layers if self.checkpoint_layer is None else self.checkpoint_layer
        tensors: dict[str, torch.Tensor] = {"input_ids": torch.tensor(layout.ids[skip + enc.start:],
                                                                       dtype=torch.int64)}
        for l in range(upto):
            for name, x in (("k", kv.keys[l][:, skip:]), ("v", kv.values[l][:, skip:])):
                if self.config.kv_dtype == "int8":
                    q, scale = quantize_int8(x)
                    tensors[f"{name}.{l}"], tensors[f"{name}.{l}.scale"] = q, scale
                else:
                    tensors[f"{name}.{l}"] = x.to(_DTYPES[self.config.kv_dtype])
        if self.checkpoint_layer is not None:
            resid = enc.captured.hidden[-self.checkpoint_layer - 1][skip:]
            tensors["residual"] = resid.to(_DTYPES.get(self.config.kv_dtype, torch.float16))
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        g = self.geometry
        meta = {"format": BLOB_FORMAT, "fingerprint": self.fingerprint.short, "payload": self.config.payload,
                "kv_dtype": self.config.kv_dtype, "num_layers": str(g.num_layers), "num_kv_heads": str(g.num_kv_heads),
                "head_dim": str(g.head_dim), "hidden_size": str(g.hidden_size), "bos": str(bool(self._bos())),
                "frame": self._frame_cache["digest"],
                "checkpoint_layer": str(self.checkpoint_layer)}
        return serialize(tensors, meta)

    # ------------------------------------------------------------------ payload read
    def _frame_state(self) -> dict[str, Any]:
        """KV (and checkpoint residual) of the frame alone: the same for every prefix."""
        if self._frame_cache is None or "kv" not in self._frame_cache:
            ids, splice = self.frame_ids()
            state: dict[str, Any] = {"kv": None, "residual": None, "stacked": None}
            if ids:
                c = self.checkpoint_layer
                cap = capture(self.lm.model, [ids], kv=True, input_layers=[c] if c is not None else [])[0]
                state["kv"] = cap.kv
                state["stacked"] = (torch.stack(cap.kv.keys), torch.stack(cap.kv.values))  # (L, H, F, Dh)
                if c is not None:
                    state["residual"] = cap.hidden[-c - 1]
            self._frame_cache.update(state)
        return self._frame_cache

    @property
    def tiers(self) -> KVTiers:
        """The device / host-RAM / disk tiers of this memory's payloads (shared by the folder's Memory objects)."""
        store = self.store
        if store.tiers is None:
            cfg, device = self.config, self.lm.device
            budget = cfg.device_cache_bytes if cfg.device_cache_bytes is not None else \
                (1 << 30 if device.type == "cuda" else 0)
            store.tiers = KVTiers(device=device, device_budget=budget, host_budget=cfg.host_cache_bytes)
        return store.tiers

    def drop_caches(self, tiers: Sequence[str] = ("device", "host")) -> None:
        """Empty the device and/or host tiers, and with ``"page"`` also ask the OS to drop the segment files from
        its page cache (so the next read of every chunk comes from the disk itself)."""
        self.tiers.clear(tiers)
        if "page" in tiers:
            self.store.segments.drop_page_cache()

    def _check_record(self, header: dict[str, Any], where: str = "") -> None:
        g = self.geometry
        for name, want in (("fingerprint", self.fingerprint.short), ("num_layers", g.num_layers),
                           ("num_kv_heads", g.num_kv_heads), ("head_dim", g.head_dim)):
            if header.get(name) != want:
                raise BlobError(f"payload record {where} does not match this model: {name} is {header.get(name)!r} "
                                f"there but {want!r} for the model (layer or model mismatch)")
        if header.get("frame") != self._frame_digest():
            raise BlobError(f"payload record {where} was written after another frame than this memory's (frame or "
                            "frame_system changed since): its KV cannot be injected; re-add the text")

    def _fetch(self, payload: dict[str, Any]) -> tuple[tuple, Record, str]:
        """(cache key, record, tier) of one stored chunk; raises BlobError if it cannot be read."""
        location = str(payload.get("blob", ""))
        key = (str(payload.get("user_id", "")), location, self.fingerprint.short)
        load = self._read_record if is_segment_location(location) else self._decode_blob
        rec, tier = self.tiers.fetch(key, lambda: load(payload))
        return key, rec, tier

    def _read_record(self, payload: dict[str, Any]) -> Record:
        """One chunk's record from its segment: one read into (pinned) memory, CRC-checked, checked against
        this memory's model and frame."""
        location = str(payload["blob"])
        header, body = self.store.segments.read(location, pin=self.tiers.cuda)
        self._check_record(header, location)
        rec = Record(header, body)
        rec.header["ids"] = rec.ids()
        return rec

    def _decode_blob(self, payload: dict[str, Any]) -> Record:
        """A chunk stored as a blob (earlier versions, residual checkpoints) as a record of the same layout
        (float16 unless the memory stores a wider float), so the tiers and assembly treat it like any other."""
        ids, kv = self._load_blob(payload)
        keys, values = torch.stack([k.float() for k in kv.keys]), torch.stack([v.float() for v in kv.values])
        dt = self.config.kv_dtype if self.config.kv_dtype in ("float16", "bfloat16", "float32") else "float16"
        body = pack(ids, quantize(keys.cpu(), values.cpu(), dt), kv_dtype=dt)
        header = {**self._record_header(len(ids)), "kv_dtype": dt, "key_group": 0, "ids": ids}
        return Record(header, body.pin_memory() if self.tiers.cuda else body)

    def chunk_ids(self, payload: dict[str, Any]) -> list[int]:
        """Token ids of one stored chunk (what its KV stands for)."""
        return list(self._fetch(payload)[1].header["ids"])

    def load_chunk(self, payload: dict[str, Any]) -> tuple[list[int], ChunkKV]:
        """Token ids and pre-RoPE KV of one stored chunk, dequantised (a copy: nothing stored is modified).

        Raises:
            BlobError: the payload is missing, corrupted, or was written for another model or layout.
        """
        _, rec, _ = self._fetch(payload)
        keys, values = dequantize(rec.parts(), rec.header["kv_dtype"], torch.float32)
        L = rec.header["num_layers"]
        return list(rec.header["ids"]), ChunkKV([keys[l].clone() for l in range(L)],
                                                [values[l].clone() for l in range(L)])

    def _load_blob(self, payload: dict[str, Any]) -> tuple[list[int], ChunkKV]:
        """Token ids and pre-RoPE KV of a chunk stored as a content-addressed blob (older versions; residual)."""
        sha = payload.get("blob", "")
        data = self.store.blobs.get(sha)
        try:
            tensors = st_load(data)
            meta = _safetensors_metadata(data)
        except Exception as e:
            raise BlobError(f"payload blob {sha} cannot be read: {e}") from e
        g = self.geometry
        if meta.get("format") != BLOB_FORMAT:
            raise BlobError(f"payload blob {sha} has format {meta.get('format')!r}, expected {BLOB_FORMAT!r}")
        frame = self._frame_state()
        if "frame" in meta:
            same_frame = meta["frame"] == frame["digest"]
        else:  # written before frames existed: after BOS alone
            same_frame = frame["splice"] == 0 and frame["ids"] == self._bos()
        if not same_frame:
            raise BlobError(f"payload blob {sha} was written after another frame than this memory's (frame or "
                            "frame_system changed since): its KV cannot be injected; re-add the text")
        for name, want in (("fingerprint", self.fingerprint.short), ("num_layers", str(g.num_layers)),
                           ("num_kv_heads", str(g.num_kv_heads)), ("head_dim", str(g.head_dim))):
            if meta.get(name) != want:
                raise BlobError(f"payload blob {sha} does not match this model: {name} is {meta.get(name)!r} in "
                                f"the blob but {want!r} for the model (layer or model mismatch)")
        ids = tensors["input_ids"].tolist()
        c = None if meta.get("checkpoint_layer") in (None, "None") else int(meta["checkpoint_layer"])
        upto = g.num_layers if c is None else c
        keys, values = [], []
        for l in range(upto):
            for name, out in (("k", keys), ("v", values)):
                x = tensors[f"{name}.{l}"]
                if meta.get("kv_dtype") == "int8":
                    x = dequantize_int8(x, tensors[f"{name}.{l}.scale"])
                out.append(x)
        if c is not None:
            resid = tensors["residual"]
            if frame["residual"] is not None:
                resid = torch.cat([frame["residual"].to(resid.dtype), resid], dim=0)
            skip = len(frame["ids"])
            for k, v in recompute_kv(self.lm.model, resid, c):
                keys.append(k[:, skip:].cpu())
                values.append(v[:, skip:].cpu())
        return ids, ChunkKV(keys, values)

    def _injection(self, payloads: Sequence[dict[str, Any]]) -> tuple[Injection, list[str]]:
        """Injection for the given chunks (in order); unreadable chunks are skipped with a warning.

        The chunks come from the tiers (device, host RAM, disk) and are assembled with the frame into one
        buffer on the model's device (:meth:`KVTiers.assemble`); ``last_timing`` keeps the step times.
        """
        t0 = time.perf_counter()
        frame = self._frame_state()
        ids: list[int] = list(frame["ids"])
        records, used, tiers = [], [], []
        for p in payloads:
            try:
                key, rec, tier = self._fetch(p)
            except BlobError as e:
                warnings.warn(f"chunk {p.get('memory_id')} skipped: {e}", ChunkSkippedWarning, stacklevel=3)
                continue
            ids += rec.header["ids"]
            records.append((key, rec))
            used.append(str(p.get("memory_id")))
            tiers.append(tier)
        if not used:
            self.last_timing = {"fetch_s": time.perf_counter() - t0, "tiers": []}
            return Injection(), []
        t1 = time.perf_counter()
        tiers_obj = self.tiers
        keys, values = tiers_obj.assemble(self.lm.model, frame["stacked"], records)
        cache = self._cache(keys, values, ids, frame, records)
        prefix = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
        self.last_timing = {"fetch_s": t1 - t0, **tiers_obj.last, "tiers": tiers,
                            "injection_s": time.perf_counter() - t0}
        return Injection(prefix_ids=prefix, past_key_values=cache, splice=frame["splice"], owned=True), used

    def _cache(self, keys: torch.Tensor, values: torch.Tensor, ids: list[int], frame: dict[str, Any],
               records: Sequence[tuple[Any, Record]]):
        """A DynamicCache of the assembled prefix; with ``recompute_tokens`` the first tokens of every chunk after
        the first are recomputed attending to everything before them (boundary repair)."""
        from transformers import DynamicCache

        n = self.config.recompute_tokens
        cache = DynamicCache(config=self.lm.model.config)
        L = keys.shape[0]
        if not n or len(records) < 2:
            from transformers.cache_utils import DynamicLayer

            with torch.inference_mode():
                for l, layer in enumerate(cache.layers):
                    k, v = keys[l].unsqueeze(0), values[l].unsqueeze(0)
                    if type(layer) is DynamicLayer:  # take the views as they are (update() would copy them)
                        layer.lazy_initialization(k, v)
                        layer.keys, layer.values = k, v
                    else:  # sliding-window layers keep only their window: their own update() decides
                        cache.update(k, v, l)
            return cache
        # the frame and the first chunk as stored; then, per later chunk, a forward over its first n tokens
        # (attending to the whole prefix so far) followed by its stored KV for the rest
        bounds, pos = [], len(frame["ids"])
        for _, rec in records:
            bounds.append((pos, pos + rec.tokens))
            pos += rec.tokens
        end = bounds[0][1]
        with torch.inference_mode():
            for l in range(L):
                cache.update(keys[l, :, :end].unsqueeze(0), values[l, :, :end].unsqueeze(0), l)
            for a, b in bounds[1:]:
                m = min(n, b - a)
                chunk = torch.tensor([ids[a: a + m]], dtype=torch.long, device=self.lm.device)
                positions = torch.arange(a, a + m, device=self.lm.device).unsqueeze(0)
                self.lm.model(input_ids=chunk, past_key_values=cache, position_ids=positions, use_cache=True,
                              logits_to_keep=1)
                if a + m < b:
                    for l in range(L):
                        cache.update(keys[l, :, a + m: b].unsqueeze(0), values[l, :, a + m: b].unsqueeze(0), l)
        return cache

    # ------------------------------------------------------------------ search
    def encode_query(self, query: str, *, variant: str) -> dict[str, Any]:
        """Transformed query vectors for ``variant`` (pooled and/or token vectors and the BM25 sparse vector)."""
        out: dict[str, Any] = {}
        if variant in ("hybrid", "hybrid_tokens", "bm25"):
            out["sparse"] = bm25_query(query)
        if variant != "bm25":
            layout = self.query_layout(query)
            self._check_fits(layout, what="query with its template and compression prompt")
            enc = self._encode([layout], pooled=variant in ("pooled", "hybrid"), payload=False)[0]
            if enc.pooled is not None:
                out["pooled"] = self.pooled_transform.apply(enc.pooled).tolist()
            if variant in ("tokens", "hybrid_tokens"):
                out["tokens"] = self.token_transform.apply(enc.tokens).tolist()
        return out

    def search(self, query: str, *, k: int = 4, user_id: str | None = None, variant: str | None = None,
               memory_ids: Sequence[str] | None = None, relevance: bool = True) -> list[Hit]:
        """Top-``k`` chunks of ``user_id`` for ``query`` (never another user's), best first.

        Args:
            variant: pooled | tokens | hybrid | hybrid_tokens | bm25 (default: the config's).
            memory_ids: restrict the search to these chunk ids.
            relevance: give each hit its calibrated relevance (:mod:`.relevance`; the configured variant only,
                else None). A memory whose relevance was never fitted is fitted on the built-in generic set
                first, with a :class:`~.relevance.RelevanceWarning`.
        """
        return self._search(query, k=k, user_id=user_id, variant=variant, memory_ids=memory_ids,
                            relevance=relevance)[0]

    def _search(self, query: str, *, k: int, user_id: str | None, variant: str | None = None,
                memory_ids: Sequence[str] | None = None, relevance: bool = True) -> tuple[list[Hit], float]:
        """Hits and the seconds spent on their relevance scores."""
        from ...text import check_text
        from .config import VARIANTS

        variant = variant or self.config.variant
        if variant not in VARIANTS:
            raise InputError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
        if variant in ("pooled", "hybrid") and not self.indexes_pooled:
            raise InputError(f"variant {variant!r} needs pooled vectors, which this memory does not store "
                             f"(index_pooled=False, or variant={self.config.variant!r} by default); create the "
                             "memory with index_pooled=True")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        query = check_text(query, what="query")
        calibrator = self.calibrator if relevance and variant == self.config.variant else None
        vectors = self.encode_query(query, variant=variant)
        user = _check_user(user_id)
        # a few extra rows so that equal scores are ordered by best_rows, not by chance
        rows = self.store.index.query(variant, user_id=user, limit=k + TIE_MARGIN,
                                      candidates=max(self.config.candidates, k), rrf_k=self.config.rrf_k,
                                      bm25_weight=self.config.bm25_weight,
                                      memory_ids=memory_ids, **vectors)
        rows = best_rows(rows, k)
        hits = [Hit(id=i, score=s, text=str(p.get("text", "")), payload=p) for i, s, p in rows]
        if calibrator is None or not hits:
            return hits, 0.0
        t0 = time.perf_counter()
        from .relevance import features

        probs = calibrator(features(*self._hit_scores(query, hits, user, vectors)))
        for h, p in zip(hits, probs):
            h.relevance = float(p)
        return hits, time.perf_counter() - t0

    def hit_scores(self, query: str, hits: Sequence[Hit], *, user_id: str | None = None
                   ) -> tuple[list[float], list[float]]:
        """Raw per-hit scores behind the relevance features: (dense, bm25); dense is the mean over query tokens of
        the best cosine with a chunk token (pooled cosine for the pooled variants), bm25 the index's BM25."""
        return self._hit_scores(query, hits, _check_user(user_id), None)

    def _hit_scores(self, query: str, hits: Sequence[Hit], user: str, vectors: dict[str, Any] | None
                    ) -> tuple[list[float], list[float]]:
        variant = self.config.variant
        dense_name = "pooled" if variant in ("pooled", "hybrid") else "tokens"
        if vectors is None or dense_name not in vectors or "sparse" not in vectors:
            vectors = {**self.encode_query(query, variant="hybrid" if dense_name == "pooled" else "hybrid_tokens")}
        ids = [h.id for h in hits]
        index = self.store.index

        def scores(name, **vec):
            rows = index.query(name, user_id=user, limit=len(ids), candidates=len(ids), rrf_k=self.config.rrf_k,
                               memory_ids=ids, **vec)
            return {i: s for i, s, _ in rows}

        dense = scores(dense_name, **{dense_name: vectors[dense_name]})
        bm25 = scores("bm25", sparse=vectors["sparse"])
        n = max(1, len(vectors["tokens"])) if dense_name == "tokens" else 1
        return [dense.get(i, 0.0) / n for i in ids], [bm25.get(i, 0.0) for i in ids]

    @property
    def calibrator(self):
        """The relevance calibrator (fitted on the built-in generic set, with a warning, if never fitted)."""
        from .relevance import GENERIC_QA, GENERIC_UNANSWERABLE, Calibrator, warn_generic

        state = self.config.relevance
        if state is None or state.get("variant") != self.config.variant:
            warn_generic(len(GENERIC_QA))
            self.fit_relevance(GENERIC_QA, unanswerable=GENERIC_UNANSWERABLE, source="built-in generic set")
            state = self.config.relevance
        cached = getattr(self, "_calibrator", None)
        if cached is None or cached.state is not state:
            cached = self._calibrator = Calibrator(state)
        return cached

    def fit_relevance(self, pairs: Sequence[tuple[str, str]], *, unanswerable: Sequence[str] = (),
                      k: int | None = None, seed: int = 0, source: str = "caller's pairs") -> Receipt:
        """Fit the calibrated relevance score on (question, passage) pairs (and questions nothing answers).

        The memory's own chunks are not touched: the passages go to a scratch memory with the same layers and
        transforms (see :mod:`.relevance`). Stored in ``config.relevance`` (and saved with a saved memory).
        """
        from .relevance import fit_relevance

        start = time.perf_counter()
        state = fit_relevance(self, pairs, unanswerable=unanswerable, k=k, seed=seed, source=source)
        self.config.relevance = state
        if self._tmpdir is None and self.path is not None and (Path(self.path) / "memory_config.json").is_file():
            self.save()
        return Receipt(self.kind, "fit_relevance", elapsed_s=time.perf_counter() - start, steps=1, details=state,
                       notes=[f"relevance fitted on {state['pairs']} pairs ({source}); held-out ECE "
                              f"{state['heldout_ece']}, AUC {state['heldout_auc']}"])

    def prefix_for(self, query: str | None, *, user_id: str | None = None) -> tuple[list[int], list[dict]]:
        """The chunks ``active()`` would inject for ``query`` (payloads, in prefix order) and the prefix token ids
        they stand for (the frame first)."""
        payloads = self._select(query, user_id)
        ids = self.frame_ids()[0]
        for p in payloads:
            try:
                ids += self.chunk_ids(p)
            except BlobError:
                continue
        return ids, payloads

    def as_text(self, prompt_ids: torch.LongTensor, memory_ids: Sequence[str]) -> torch.LongTensor:
        """The token sequence that injecting ``memory_ids`` (in this order) before ``prompt_ids`` stands for: the
        frame, the chunks, then the prompt (without its head when it starts with the frame's spliced head)."""
        frame, splice = self.frame_ids()
        ids = list(frame)
        rows = dict(self.store.index.get(list(memory_ids)))
        for mid in memory_ids:
            if mid in rows:
                ids += self.chunk_ids(rows[mid])
        prompt = prompt_ids[0].tolist()
        if splice and prompt[:splice] == frame[:splice] and len(prompt) > splice:
            prompt = prompt[splice:]
        return torch.tensor([ids + prompt], dtype=torch.long, device=prompt_ids.device)

    def _select(self, query: str | None, user_id: str | None) -> list[dict]:
        """Payloads to inject, in prefix order (:meth:`select`)."""
        return self.select(query, user_id=user_id)

    def select(self, query: str | None, *, user_id: str | None = None, k: int | None = None,
               budget: int | None = None) -> list[dict]:
        """Payloads ``active()`` injects for ``query``, in prefix order: the top-``k`` hits (default ``top_k``) whose
        calibrated relevance passes ``gate_threshold`` and that fit the token budget (``max_prefix_tokens``,
        and ``budget`` when given). ``last_selection`` records every hit considered: its raw score, relevance,
        whether it was injected and why not.

        Without a query (``lm.logits`` does not pass one) the user's most recently added chunks are used.
        """
        cfg = self.config
        k = cfg.top_k if k is None else k
        limit = cfg.max_prefix_tokens if budget is None else min(cfg.max_prefix_tokens, budget)
        gate_s = 0.0
        if query is None or not query.strip():
            rows = self.store.index.scroll(user_id=_check_user(user_id))
            rows.sort(key=lambda r: (r[1].get("created", 0.0), r[1].get("chunk_index", 0)), reverse=True)
            hits = [Hit(id=i, score=0.0, text=str(p.get("text", "")), payload=p) for i, p in rows[:k]]
        else:
            hits, gate_s = self._search(query, k=k, user_id=user_id, relevance=cfg.gate_threshold > 0)
        chosen, considered, total = [], [], 0
        for h in hits:
            n = int(h.payload.get("tokens", 0))
            reason = None
            if h.relevance is not None and h.relevance < cfg.gate_threshold:
                reason = "below_threshold"
            elif total + n > limit:
                reason = "token_budget"
            else:
                chosen.append(h.payload)
                total += n
            considered.append({"id": h.id, "source_id": h.payload.get("source_id"), "score": h.score,
                               "relevance": h.relevance, "injected": reason is None,
                               **({"reason": reason} if reason else {})})
        self.last_selection = {"threshold": cfg.gate_threshold, "hits": considered, "gate_s": gate_s}
        return chosen[::-1] if cfg.prefix_order == "best_last" else chosen

    @contextmanager
    def _activate(self, *, user_id: str | None, query: str | None) -> Iterator[Injection]:
        if self.config.payload == "none":  # a retrieval-only memory has nothing to inject
            yield Injection()
            return
        injection, _ = self._injection(self._select(query, user_id))
        yield injection

    def injecting(self, memory_ids: Sequence[str]) -> _Pinned:
        """A memory-like view that injects exactly these chunks (oracle/random benchmark arms)."""
        return _Pinned(self, list(memory_ids))

    def _encode_again(self, records: Sequence[dict[str, Any]]) -> None:
        """Write catalog records into the index again (new payload, same id, owner, time, metadata and version);
        the catalog already holds them, so it gets no new line."""
        before, self._repairing = self._repairing, True
        try:
            pending = [(str(r.get("source_id")), int(r.get("chunk_index") or 0), str(r["text"]),
                        self.chunk_layout(str(r["text"])),
                        {"memory_id": r["memory_id"], "user_id": str(r.get("user_id") or DEFAULT_USER),
                         "created": r.get("created"), "seq": r.get("seq"), "metadata": r.get("metadata") or {},
                         "version": r.get("version")}) for r in records]
            if pending:
                self._store_chunks(pending, DEFAULT_USER, {})
        finally:
            self._repairing = before

    # ------------------------------------------------------------------ the lifecycle

    def _user_rows(self, user_id: str | None, source_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        user = _check_user(user_id)
        by_source = {"field_name": "source_id", "values": [source_id]} if source_id is not None else {}
        rows = [r for r in self.store.index.scroll(user_id=user, with_payload=list(self._CATALOG_FIELDS) + ["tokens"],
                                                   **by_source) if r[1].get("user_id") == user]
        rows.sort(key=oldest_first)
        return rows

    def items(self, *, user_id: str | None = None, limit: int = 100, offset: int = 0,
              source_id: str | None = None) -> list[dict[str, Any]]:
        if limit < 1 or offset < 0:
            raise InputError(f"limit must be >= 1 and offset >= 0, got {limit} and {offset}")
        return [item_of(pid, p) for pid, p in self._user_rows(user_id, source_id)[offset: offset + limit]]

    def count(self, *, user_id: str | None = None) -> int:
        return int(self.store.index.count(user_id=_check_user(user_id)))

    def get(self, memory_id: str, *, user_id: str | None = None) -> dict[str, Any] | None:
        user = _check_user(user_id)
        rows = [r for r in self.store.index.get([str(memory_id)]) if r[1].get("user_id") == user]
        return item_of(*rows[0]) if rows else None

    def remember(self, question: str, answer: str, *, user_id: str | None = None, generation=None) -> Receipt:
        """Write one finished chat exchange into the user's memory (conversation memory), once.

        The exchange is stored as ``User: … / Assistant: …`` text under a source id derived from its content,
        so the same exchange is never stored twice for a user (``details["duplicate"]``); metadata
        ``{"kind": "conversation"}`` marks it.

        With ``generation`` (a :class:`~nativemem.model.Generation` made with ``generate(keep=...)`` whose
        answer is ``answer``), the write reuses what the chat computed instead of a forward pass over the
        exchange: the KV of the user's text and the answer, taken from the chat's cache (keys rotated back to
        position-free form), and their retrieval-layer states (see :meth:`_from_chat`). Those KV were computed
        in the chat's context (its system turn, history and injected memory), as the model read them then, not
        as a separate pass would compute them. ``details["reused_kv"]`` says which way was taken and,
        when not, why (``details["separate_write_why"]``); ``elapsed_s`` is the write's cost.
        """
        start = time.perf_counter()
        user = _check_user(user_id)
        question, answer = check_text(question, what="question"), check_text(answer, what="answer")
        text = f"User: {question.strip()}\nAssistant: {answer.strip()}"
        source = "turn-" + hashlib.sha256(f"{user}\0{text}".encode()).hexdigest()[:24]
        if self.store.index.count(user_id=user, field_name="source_id", value=source):
            return Receipt(self.kind, "remember", elapsed_s=time.perf_counter() - start,
                           details={"duplicate": True, "source_id": source})
        meta = {"kind": "conversation"}
        if generation is None:
            reused = "no generation was given"
        elif generation.text.strip() != answer.strip():
            reused = "the answer is not the generation's text"
        else:
            reused = self._from_chat(generation)
            generation.kept = None  # its cache has run on: it serves one write
        if isinstance(reused, str):
            receipt = self.add(text, user_id=user_id, metadata={"source_id": source, **meta})
            receipt.details.update(reused_kv=False, separate_write_why=reused)
        else:
            layout, enc, states = reused
            self._check_fits(layout, what="the remembered exchange")
            receipt = self._write([(source, 0, text, layout)], user, meta, start=start, encoded={0: enc})
            receipt.details.update(reused_kv=True, retrieval_states=states)
        receipt.op = "remember"
        receipt.details.update(duplicate=False, source_id=source)
        receipt.elapsed_s = time.perf_counter() - start
        return receipt

    def _from_chat(self, generation) -> tuple[Layout, Encoded, str] | str:
        """The exchange of a kept generation as an encoded chunk (``frame + chunk_prefix + the user's text + the
        answer + chunk_suffix``) and where its retrieval states came from (``"chat"`` or ``"chunk"``), or why it
        cannot be had that way.

        The payload is the chat's own KV of the user's text and the answer (keys rotated back by their positions);
        the chunk prefix and suffix are constants (their KV around an empty chunk, computed once). The retrieval
        states are the chat's too when nothing was injected ahead of the exchange; when memory was, they are
        computed again over the chunk alone, running the model only up to the retrieval layer (states that had
        injected chunks in view drift from a query's, and the relevance gate then passes the exchange less
        often: measured in ``nativemem bench conversation``). Only an answer cut by the token cap runs its last
        token (generation never runs the token it ends with).
        """
        from ...hooks import hooks, output_hidden
        from .kv import _rotary, _text_model, rotate_layers

        kept = generation.kept
        if kept is None:
            return "the generation kept no KV (generate(keep=...)), or its answer was cut at a stop string"
        if self.config.payload != "kv" or self.indexes_pooled:
            return "this memory stores residual payloads or pooled vectors, which a chat's KV does not give"
        if kept.layer != self.retrieval_layer or kept.states is None:
            return "the generation kept no states of this memory's retrieval layer"
        if float(getattr(_rotary(self.lm.model)[0], "attention_scaling", 1.0)) != 1.0:
            return "this model's rotary encoding scales keys, so its cached keys cannot be rotated back"
        (u0, u1), (a0, a1) = kept.user, kept.answer
        if not (kept.first <= u0 < u1 <= a0 < a1 and kept.run_end <= a1 <= len(kept.ids)):
            return "the user's text or the answer is not where the generation ran (or one of them is empty)"
        model, layer, device = self.lm.model, self.retrieval_layer, self.lm.device
        states = [kept.states]
        if kept.run_end < a1:  # the answer ends at the token cap: its last token never ran
            grabbed: dict[str, torch.Tensor] = {}

            def grab(module, args, kwargs, output):
                grabbed["h"] = output_hidden(output)[0].detach()

            with torch.inference_mode(), hooks(model, [("residual_post", layer, grab)]):
                _text_model(model)(input_ids=torch.tensor([kept.ids[kept.run_end:a1]], device=device),
                                   past_key_values=kept.cache, use_cache=True)
            states.append(grabbed["h"])
        positions = list(range(u0, u1)) + list(range(a0, a1))
        content = [kept.ids[p] for p in positions]
        keys, values = [], []
        with torch.inference_mode():
            for cached in kept.cache.layers:
                held = int(cached.keys.shape[-2])
                offset = int(getattr(cached, "cumulative_length", held)) - held  # a sliding layer keeps the last
                if u0 < offset:
                    return "the user's text left a sliding-window layer's cache (the chat was longer than its window)"
                idx = torch.tensor(positions, device=cached.keys.device) - offset
                keys.append(cached.keys[0][:, idx])
                values.append(cached.values[0][:, idx])
            keys = rotate_layers(model, keys, -torch.tensor(positions))
            head, tail = self._chunk_frame_kv()
            keys = [torch.cat([h.to(k), k, t.to(k)], dim=1) for h, k, t in zip(head.keys, keys, tail.keys)]
            values = [torch.cat([h.to(v), v, t.to(v)], dim=1) for h, v, t in zip(head.values, values, tail.values)]
        frame = self.frame_ids()[0]
        prefix, suffix = self._enc(self.config.chunk_prefix), self._enc(self.config.chunk_suffix)
        layout = Layout(tuple(frame + prefix + content + suffix),
                        (len(frame) + len(prefix), len(frame) + len(prefix) + len(content)),
                        tuple(self._enc(self.config.compress_prompt)))
        if kept.prefix > len(frame):  # memory was injected ahead of the exchange: states of the chunk alone
            tokens, source = self._encode([layout], pooled=False, payload=False, framed=True)[0].tokens, "chunk"
        else:
            ran = torch.cat([s.to(device) for s in states])
            tokens, source = ran[torch.tensor(positions, device=device) - kept.first].float(), "chat"
        return layout, Encoded(tokens, None, Captured(ChunkKV(keys, values), {}), len(frame)), source

    def _chunk_frame_kv(self) -> tuple[ChunkKV, ChunkKV]:
        """Pre-RoPE KV of the chunk prefix and suffix around an empty chunk after the frame (computed once)."""
        frame = self.frame_ids()[0]  # (fills the frame cache)
        if "chunk_frame_kv" not in self._frame_cache:
            prefix, suffix = self._enc(self.config.chunk_prefix), self._enc(self.config.chunk_suffix)
            kv = capture(self.lm.model, [frame + prefix + suffix], kv=True)[0].kv
            a, b = len(frame), len(frame) + len(prefix)
            self._frame_cache["chunk_frame_kv"] = (
                ChunkKV([k[:, a:b] for k in kv.keys], [v[:, a:b] for v in kv.values]),
                ChunkKV([k[:, b:] for k in kv.keys], [v[:, b:] for v in kv.values]))
        return self._frame_cache["chunk_frame_kv"]

    def update(self, memory_id: str, *, text: str | None = None, metadata: dict[str, Any] | None = None,
               user_id: str | None = None) -> Receipt:
        """Replace one of the user's chunks with a new text (encoded again) and/or new metadata; the id stays.

        All or nothing: until the new version is acknowledged, the old one is served, and a crash in between
        leaves the old one (restored at the next open). The new text must fit one chunk (``chunk_tokens``).

        Raises:
            InputError: no such chunk for this user (another user's id answers the same), nothing to change, or a
                text longer than one chunk.
        """
        start = time.perf_counter()
        user = _check_user(user_id)
        rows = [r for r in self.store.index.get([str(memory_id)]) if r[1].get("user_id") == user]
        if not rows:
            raise InputError(f"no memory {memory_id!r} for this user")
        if text is None and metadata is None:
            raise InputError("update needs a new text, new metadata, or both")
        old = rows[0][1]
        new_text = check_text(text) if text is not None else str(old.get("text", ""))
        if metadata is not None:
            try:
                json.dumps(metadata)
            except TypeError as e:
                raise InputError(f"metadata must be JSON-serialisable: {e}") from None
        n = self.lm.count_tokens(new_text)
        if n > self.config.chunk_tokens:
            raise InputError(f"the new text has {n} tokens, more than one chunk ({self.config.chunk_tokens}); "
                             "delete the chunk and add the text instead")
        layout = self.chunk_layout(new_text)
        self._check_fits(layout, what="the new text with its template")
        version = int(old.get("version") or 1) + 1
        done = self._store_chunks([(str(old.get("source_id")), int(old.get("chunk_index") or 0), new_text, layout,
                                    {"memory_id": str(memory_id), "user_id": user, "created": old.get("created"),
                                     "seq": old.get("seq"), "metadata": old.get("metadata") or {} if metadata is None
                                     else metadata, "version": version})], user, {})
        location = str(old.get("blob") or "")
        self.tiers.forget(lambda key: key[1] == location)
        info = done[0]
        return Receipt(self.kind, "update", ids=[str(memory_id)], tokens=info["tokens"],
                       bytes_written=info["blob_bytes"] + info["index_vector_bytes"],
                       elapsed_s=time.perf_counter() - start, details={"version": version})

    def history(self, memory_id: str, *, user_id: str | None = None) -> list[dict[str, Any]]:
        """The versions of one of the user's chunks, oldest first: ``op`` (add, update, delete), ``time``,
        ``version``, ``text``, ``metadata``. Empty for an id the user never had (or another user's); a deleted
        chunk's history ends with its delete until ``gc()`` erases it (``gc()`` also keeps only the latest
        version of live chunks)."""
        state = self.store.catalog.state()
        if state.owners.get(str(memory_id)) != _check_user(user_id):
            return []
        return state.history.get(str(memory_id), [])

    def reset(self, user_id: str | None) -> Receipt:
        """Delete every chunk of one user (the catalog first, then the index; ``gc()`` frees the bytes)."""
        start = time.perf_counter()
        rows = self._user_rows(user_id)
        ids = [pid for pid, _ in rows]
        self.store.catalog.delete(ids)
        self.store.index.delete(ids)
        locations = {str(p.get("blob") or "") for _, p in rows}
        self.tiers.forget(lambda key: key[1] in locations)
        return Receipt(self.kind, "reset", ids=ids, tokens=sum(int(p.get("tokens") or 0) for _, p in rows),
                       elapsed_s=time.perf_counter() - start, details={"user_id": _check_user(user_id)})

    def export(self, path, *, user_id: str | None = None, force: bool = False) -> Receipt:
        from ..export import write_export

        start = time.perf_counter()
        if user_id is None:
            rows = sorted(self.store.index.scroll(with_payload=list(self._CATALOG_FIELDS)), key=oldest_first)
        else:
            rows = self._user_rows(user_id)
        n = write_export(path, [item_of(pid, p) for pid, p in rows], kind=self.kind, model=self.fingerprint.name,
                         user_id=user_id, force=force)
        return Receipt(self.kind, "export", ids=[pid for pid, _ in rows], elapsed_s=time.perf_counter() - start,
                       details={"items": n, "path": str(path)})

    def import_file(self, path) -> Receipt:
        from ..export import read_export

        header, items = read_export(path)
        receipt = self.import_items(items)
        receipt.details["from_model"] = header.get("model")
        return receipt

    def import_items(self, items: Sequence[dict[str, Any]], *, turns: Turns | None = None) -> Receipt:
        """Encode exported items (``id``, ``user_id``, ``text``, ``source_id``, ``chunk_index``, ``created``,
        ``metadata``) with this memory's model, all or nothing; each keeps its id, owner, source, time and
        metadata. Ids already stored are skipped (counted as duplicates); each item stays one chunk. ``turns``: as
        for :meth:`add`."""
        start = time.perf_counter()
        with (turns or Turns()).store():
            known = {pid for pid, _ in self.store.index.get([str(i["id"]) for i in items])}
        seen: set[str] = set()
        pending = []
        for n, item in enumerate(items):
            mid = str(item["id"])
            if mid in known or mid in seen:
                continue
            seen.add(mid)
            text = check_text(item["text"], what=f"item {n}")
            layout = self.chunk_layout(text)
            self._check_fits(layout, what=f"item {n} with its template")
            user = _check_user(item.get("user_id") or None)
            pending.append((str(item.get("source_id") or mid), int(item.get("chunk_index") or 0), text, layout,
                            {"memory_id": mid, "user_id": user, "created": item.get("created") or time.time(),
                             "seq": item.get("seq", n), "metadata": item.get("metadata") or {}}))
        done = self._store_chunks(pending, DEFAULT_USER, {}, turns=turns) if pending else {}
        users = {p[4]["user_id"] for p in pending}
        return Receipt(self.kind, "import", ids=[p[4]["memory_id"] for p in pending],
                       tokens=sum(info["tokens"] for info in done.values()), elapsed_s=time.perf_counter() - start,
                       bytes_written=sum(info["blob_bytes"] + info["index_vector_bytes"] for info in done.values()),
                       notes=[f"imported {len(pending)} items of {len(users)} users"
                              + (f"; {len(items) - len(pending)} already stored (skipped)" if len(pending) < len(items)
                                 else "")],
                       details={"imported": len(pending), "duplicates": len(items) - len(pending),
                                "users": len(users)})

    # ------------------------------------------------------------------ delete and maintenance
    def delete(self, memory_id: str) -> Receipt:
        """Remove one chunk (by memory id) or every chunk of a source (by source id): index points, then blobs."""
        start = time.perf_counter()
        index = self.store.index
        rows = index.get([str(memory_id)])
        if not rows:
            rows = index.scroll(field_name="source_id", values=[str(memory_id)])
        if not rows:
            return Receipt(self.kind, "delete", notes=[f"no chunk or source {memory_id!r}"])
        self.store.catalog.delete([pid for pid, _ in rows])  # the catalog first: a crash here finishes at open
        index.delete([pid for pid, _ in rows])
        freed, released = 0, 0
        locations = {str(p.get("blob") or "") for _, p in rows}
        self.tiers.forget(lambda key: key[1] in locations)
        for loc in locations:
            if is_segment_location(loc):
                released += parse_location(loc)[2]  # segment bytes are reclaimed by gc()
            elif loc and index.count(field_name="blob", value=loc) == 0:
                path = self.store.blobs.path(loc)
                freed += path.stat().st_size if path.is_file() else 0
                self.store.blobs.delete(loc)
        return Receipt(self.kind, "delete", ids=[pid for pid, _ in rows], tokens=sum(int(p.get("tokens", 0))
                       for _, p in rows), elapsed_s=time.perf_counter() - start,
                       details={"blob_bytes_freed": freed, "segment_bytes_released": released})

    def check(self) -> Receipt:
        """Verify every chunk's payload (CRC, model, frame) and the index against the catalog; the receipt lists
        unreadable chunks in ``notes`` and counts chunks missing from the index (nothing is changed)."""
        bad = []
        state = self.store.catalog.state() if self.store.catalog.exists else None
        missing = 0
        if state is not None:
            in_index = {pid for pid, _ in self.store.index.scroll(with_payload=False)}
            missing = len(state.live.keys() - in_index)
            if missing:
                bad.append(f"{missing} acknowledged chunks are missing from the index; {REPAIR_HINT}")
        for pid, p in self.store.index.scroll(with_payload=["blob", "payload_kind"]):
            if p.get("payload_kind") == "none":
                continue
            location = str(p.get("blob", ""))
            try:
                if is_segment_location(location):
                    header, _ = self.store.segments.view(location)  # CRC-checked
                    self._check_record(header, location)
                else:
                    self.store.blobs.get(location)
            except BlobError as e:
                bad.append(f"{pid}: {e}")
        unreadable = len(bad) - (1 if missing else 0)
        if unreadable:
            bad.append(f"{unreadable} chunks have an unreadable payload (they are skipped when retrieved); "
                       f"{REPAIR_HINT} to encode them again")
        return Receipt(self.kind, "check", notes=bad,
                       details={"unreadable": unreadable, "missing_from_index": missing})

    def gc(self) -> Receipt:
        """Remove payload no index point refers to: blobs, and segment files none of whose records is referenced
        (left by deletes, or by a crash between the payload write and the index upsert); and rewrite the catalog
        without deleted chunks, so their text leaves the disk.

        Raises:
            MemoryFormatError: the index lacks acknowledged chunks (:attr:`damage`): repair it first.
        """
        from ...errors import MemoryFormatError

        _ = self.store  # opening it reconciles the index with the catalog, which sets ``damage``
        if self.damage.get("chunks_missing_from_index"):
            raise MemoryFormatError(f"gc() refused: {self.damage['chunks_missing_from_index']} acknowledged chunks "
                                    f"are missing from the index; first {REPAIR_HINT}")
        catalog_freed = self.store.catalog.compact(self.store.catalog.state().live) \
            if self.config.backend == "edge" and self.store.catalog.exists else 0
        used = {str(p.get("blob")) for _, p in self.store.index.scroll(with_payload=["blob"])}
        orphans = {sha: n for sha, n in self.store.blobs.all().items() if sha not in used}
        for sha in orphans:
            self.store.blobs.delete(sha)
        live: dict[str, int] = {}
        for loc in used:
            if is_segment_location(loc):
                name, _, length = parse_location(loc)
                live[name] = live.get(name, 0) + length
        dead = {name: n for name, n in self.store.segments.files().items()
                if name not in live and self.store.segments.settled(name)}
        for name in dead:
            self.store.segments.delete(name)
        garbage = sum(max(0, n - live.get(name, 0)) for name, n in self.store.segments.files().items())
        return Receipt(self.kind, "gc", ids=sorted(orphans) + sorted(dead),
                       notes=[f"removed {len(orphans)} unreferenced blob(s) and {len(dead)} segment file(s)"],
                       details={"bytes_freed": sum(orphans.values()) + sum(dead.values()),
                                "segment_bytes_unreferenced": garbage, "catalog_bytes_freed": catalog_freed})

    def stats(self) -> dict[str, Any]:
        blobs = self.store.blobs.all()
        rows = self.store.index.scroll(with_payload=["user_id", "tokens", "source_id", "blob", "content_tokens"])
        tokens = sum(int(p.get("tokens", 0)) for _, p in rows)
        payload_bytes = sum(parse_location(str(p["blob"]))[2] if is_segment_location(str(p.get("blob")))
                            else blobs.get(str(p.get("blob")), 0) for _, p in rows)
        index_bytes = sum(self._index_bytes(int(p.get("content_tokens", p.get("tokens", 0)))) for _, p in rows)
        segments = self.store.segments.files()
        return {**super().stats(), "chunks": len(rows), "sources": len({p.get("source_id") for _, p in rows}),
                "users": len({p.get("user_id") for _, p in rows}), "tokens": tokens,
                "blobs": len(blobs), "blob_bytes": sum(blobs.values()), "segments": len(segments),
                "segment_bytes": sum(segments.values()), "payload_bytes": payload_bytes,
                "payload_bytes_per_token": payload_bytes / tokens if tokens else 0.0,
                "index_vector_bytes_per_token": index_bytes / tokens if tokens else 0.0,
                "tiers": self.tiers.stats(), "payload": self.config.payload,
                "kv_dtype": self.config.kv_dtype, "bytes_per_token": self.bytes_per_token(),
                "retrieval_layer": self.retrieval_layer, "reroute_layers": self.reroute_layers,
                "checkpoint_layer": self.checkpoint_layer, "fitted": self.pooled_transform.fitted,
                "backend": self.config.backend, "dims": self.dims(), "gate_threshold": self.config.gate_threshold,
                "damage": dict(self.damage),
                "relevance": None if self.config.relevance is None else {
                    k: self.config.relevance.get(k) for k in ("source", "pairs", "unanswerable", "heldout_ece",
                                                              "heldout_auc")}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.pooled_transform.state("activation_pooled"), **self.token_transform.state("activation_token")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith(("activation_pooled_", "activation_token_"))]
        if unknown:
            from ...errors import MemoryFormatError

            raise MemoryFormatError(f"activation memory file holds unknown tensors {unknown[:3]}")
        self.pooled_transform = Transform.from_state(state, "activation_pooled")
        self.token_transform = Transform.from_state(state, "activation_token")
        D = self.geometry.hidden_size
        for name, t in (("pooled", self.pooled_transform), ("token", self.token_transform)):
            width = {int(x.shape[0]) for x in (t.mean, t.scale, t.proj) if x is not None}
            if width and width != {D}:
                from ...errors import MemoryFormatError

                raise MemoryFormatError(f"{name} transform expects width {sorted(width)}, the model has {D}")
        if self._store is not None:
            raise RuntimeError("load_state_dict after the store was opened")

    def extra_state(self) -> dict[str, Any]:
        return {"store_initialized": True}

    def save(self, path=None) -> Path:
        """Write ``memory_config.json`` and ``memory.safetensors``; the store (and lock) is created first."""
        if path is not None and self.path is not None and Path(path).resolve() != Path(self.path).resolve() \
                and self._store is not None:
            raise InputError(f"an activation memory lives in its folder {self.path}; copy the folder instead of "
                             "saving it elsewhere")
        if path is not None and self._store is None:
            self.path = Path(path)
        if self.path is not None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        _ = self.store  # a new memory folder gets its (empty) store and lock before its config says so
        return super().save(path)

    @classmethod
    def open(cls, path, lm) -> ActivationMemory:
        """Open a memory folder; the store is opened (and, for the embedded backend, locked) right away.

        Raises:
            MemoryFormatError: the config says the folder has an embedded store, but it is missing.
        """
        from ...errors import MemoryFormatError
        from ..base import read_memory_config

        meta = read_memory_config(Path(path))
        mem = super().open(path, lm)
        if mem.config.backend == "edge" and meta.get("state", {}).get("store_initialized") \
                and not (Path(path) / "store" / "edge_config.json").is_file():
            raise MemoryFormatError(f"{Path(path) / 'store'} is missing: the memory's index is gone; {REPAIR_HINT}")
        _ = mem.store
        return mem

    @classmethod
    def repair(cls, path, lm) -> Receipt:
        """Rebuild a memory folder's index from its catalog, encoding every live chunk again with ``lm``.

        The damaged index is moved aside to ``store.damaged-<time>`` (delete it once the repaired memory serves
        what you expect); each chunk keeps its id, owner, source, time and metadata, and gets a fresh payload
        record, so chunks whose payload was unreadable are served again. ``gc()`` afterwards frees the old
        payload. Embedded (``edge``) memories only.

        Raises:
            MemoryFormatError: the folder has no catalog (written before there was one) or is not an embedded
                activation memory.
        """
        from ...errors import MemoryFormatError
        from ..base import Memory
        from .catalog import Catalog
        from .store import _acquire_lock, _clean_file

        path = Path(path)
        start = time.perf_counter()
        mem = Memory.open.__func__(cls, path, lm)  # config, fingerprint and transforms; the store stays closed
        if mem.config.backend != "edge":
            raise MemoryFormatError("repair rebuilds embedded (edge) memories; a Qdrant server keeps its own copies")
        catalog = Catalog(path)
        if not catalog.exists:
            raise MemoryFormatError(f"{path} has no catalog to rebuild from (written by an older version); restore "
                                    "the folder from a copy")
        state = catalog.state()
        lock = _acquire_lock(path)  # nobody else may have the folder open while its index is swapped
        try:
            moved = None
            if (path / "store").exists():
                moved = path / f"store.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
                (path / "store").rename(moved)
                _clean_file(path / "store").unlink(missing_ok=True)
        finally:
            lock.release()
        mem._repairing = True  # the store opens without reconciling: its index is new and empty
        try:
            mem._encode_again(list(state.live.values()))
        finally:
            mem._repairing = False
            mem.close()
        by_user = {str(rec.get("user_id") or DEFAULT_USER) for rec in state.live.values()}
        notes = [f"encoded {len(state.live)} chunks of {len(by_user)} users again from the catalog"]
        if moved is not None:
            notes.append(f"the old index is in {moved.name}/; delete it when the memory serves what you expect")
        if state.damaged_lines:
            notes.append(f"{state.damaged_lines} catalog lines could not be read and were not restored")
        return Receipt(cls.kind, "repair", ids=list(state.live), tokens=0, elapsed_s=time.perf_counter() - start,
                       notes=notes, details={"chunks": len(state.live), "users": len(by_user),
                                             "catalog_lines_unreadable": state.damaged_lines,
                                             "old_index": moved.name if moved else None})

    # ------------------------------------------------------------------ fit
    def fit(self, texts: Sequence[str], *, probe_pairs: Sequence[tuple[str, str]] | None = None,
            relevance_pairs: Sequence[tuple[str, str]] | None = None, unanswerable: Sequence[str] = (),
            tokens_per_text: int = 32, max_texts: int = 512, seed: int = 0) -> Receipt:
        """Choose layers (TwoNN + retrieval probe), fit the retrieval transforms on a separate fit set, then the
        relevance score.

        Only an empty memory can be fitted (stored vectors would no longer match). The ID curve, chosen
        layers and probe scores go to ``config.fit_report``; the transforms to ``memory.safetensors``; the
        relevance calibrator to ``config.relevance``.

        Args:
            texts: the fit set (never the evaluated corpus).
            probe_pairs: (query, relevant text) pairs for the probe; default: each fit text's first sentence
                against the rest of it.
            relevance_pairs: (question, passage) pairs for the relevance score (:meth:`fit_relevance`); default:
                the built-in generic questions.
            unanswerable: questions no passage answers (negatives of the relevance score); with the default
                pairs, the built-in general questions.
            tokens_per_text: content tokens subsampled per text for TwoNN and the token transform.
            max_texts: cap on fit texts used (seeded sample).
        """
        from .fit import fit_memory
        from .relevance import GENERIC_QA, GENERIC_UNANSWERABLE

        receipt = fit_memory(self, texts, probe_pairs=probe_pairs, tokens_per_text=tokens_per_text,
                             max_texts=max_texts, seed=seed)
        if relevance_pairs is None:
            rel = self.fit_relevance(GENERIC_QA, unanswerable=unanswerable or GENERIC_UNANSWERABLE, seed=seed,
                                     source="built-in generic set")
        else:
            rel = self.fit_relevance(relevance_pairs, unanswerable=unanswerable, seed=seed)
        receipt.details["relevance"] = rel.details
        receipt.notes += rel.notes
        receipt.elapsed_s += rel.elapsed_s
        return receipt

    def _reset_store(self) -> None:
        """Drop the (empty) index so it is re-created with the current transform's dimensions."""
        store = self.store
        if store.index.count() != 0:
            raise InputError("fit() needs an empty memory: stored vectors would not match the new transform")
        from .store import _OPEN

        if self.config.backend == "qdrant":
            store.index.client.delete_collection(store.index.collection)
        store.close()  # backend redis: the new transform has a namespace of its own
        _OPEN.pop(f"{self.config.backend}:{Path(self.path).resolve()}", None)
        if self.config.backend == "edge":
            shutil.rmtree(Path(self.path) / "store", ignore_errors=True)
        self._store = None


class _Pinned:
    """Memory-like object whose ``active()`` injects fixed chunks (no retrieval)."""

    def __init__(self, memory: ActivationMemory, memory_ids: list[str]):
        self.memory = memory
        self.memory_ids = memory_ids
        self.fingerprint = memory.fingerprint

    @contextmanager
    def active(self, *, lm=None, user_id=None, query=None) -> Iterator[Injection]:
        if lm is not None and lm is not self.memory.lm:
            self.fingerprint.check(lm.fingerprint)
        rows = dict(self.memory.store.index.get(self.memory_ids))
        payloads = [rows[i] for i in self.memory_ids if i in rows]
        injection, _ = self.memory._injection(payloads)
        yield injection


def item_of(pid: str, p: dict[str, Any]) -> dict[str, Any]:
    """One stored chunk as the lifecycle methods give it, from its index payload or catalog record."""
    return {"id": pid, "user_id": p.get("user_id", DEFAULT_USER), "text": p.get("text", ""),
            "source_id": p.get("source_id"), "chunk_index": p.get("chunk_index"), "created": p.get("created"),
            "seq": p.get("seq"), "metadata": p.get("metadata") or {}, "tokens": p.get("tokens")}


def oldest_first(row: tuple[str, dict[str, Any]]) -> tuple:
    """Sort key of index rows: by add, then by position in the add (chunk index for points without one)."""
    p = row[1]
    return (p.get("created") or 0.0, p.get("seq") if p.get("seq") is not None else p.get("chunk_index") or 0, row[0])


def _check_user(user_id: str | None) -> str:
    if user_id is None:
        return DEFAULT_USER
    if not isinstance(user_id, str) or not user_id.strip():
        raise InputError(f"user_id must be a non-empty string or None, got {user_id!r}")
    return user_id


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    return dict(header.get("__metadata__", {}))


UNFITTED_PROJECTION_ABOVE = 1024  # hidden sizes above this get a random projection of token vectors until fit()


def _initial_token_transform(hidden_size: int, token_dim: int | None) -> Transform:
    """Token-vector transform of a new, unfitted memory.

    Up to ``UNFITTED_PROJECTION_ABOVE`` dimensions the raw states are indexed (cosine); wider models get a
    seeded random orthonormal projection to ``token_dim`` dimensions (Johnson-Lindenstrauss: cosines are
    kept up to small noise), because raw token vectors of a 4,096-wide model would make the index larger
    than the compressed payload and the MaxSim search slow. ``fit()`` replaces it with a fitted transform.
    """
    if not token_dim or hidden_size <= UNFITTED_PROJECTION_ABOVE or token_dim >= hidden_size:
        return Transform()
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(hidden_size, token_dim, generator=g, dtype=torch.float64))
    return Transform(torch.zeros(hidden_size), None, q.float())


# config fields that describe the old model (its layers, its fitted transforms and scores) or the old folder
_MODEL_BOUND = ("checkpoint_layer", "retrieval_layer", "reroute_layers", "fit_report", "relevance", "collection",
                "blob_dir", "qdrant_location")


def reencode_memory(source, out, lm) -> Receipt:
    """Encode an activation memory's live chunks again, with ``lm``, into a new memory folder ``out``.

    The source folder is only read, from its catalog (its own model is not needed, so this moves a memory to
    any other model). Settings that do not depend on the model (chunking, frame, payload precision, retrieval
    variant, gate threshold) are kept; the layers and fitted transforms of the old model are not: fit the new
    memory's relevance score on your pairs (``fit_relevance``) for the best gate.

    Raises:
        InputError: ``out`` exists and is not empty.
        MemoryFormatError: the source is not an activation memory or has no catalog.
    """
    from ...errors import MemoryFormatError
    from ..base import read_memory_config
    from .catalog import Catalog

    source, out = Path(source), Path(out)
    meta = read_memory_config(source)
    if meta["kind"] != ActivationMemory.kind:
        raise MemoryFormatError(f"{source} holds a {meta['kind']!r} memory; reencode moves activation memories")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new --out")
    catalog = Catalog(source)
    if not catalog.exists:
        raise MemoryFormatError(f"{source} has no catalog (written by an older version): open it once with its own "
                                "model, which writes one, then re-encode")
    live = catalog.state().live
    config = {k: v for k, v in meta["config"].items() if k not in _MODEL_BOUND}
    mem = ActivationMemory(lm, ActivationConfig.from_dict(config), path=out)
    receipt = mem.import_items([{**rec, "id": rec["memory_id"]} for rec in live.values()])
    mem.save()
    mem.close()
    receipt.op = "reencode"
    receipt.notes = [f"re-encoded {receipt.details['imported']} chunks of {receipt.details['users']} users from "
                     f"{meta['fingerprint'].get('name')} for {lm.name}"]
    return receipt
