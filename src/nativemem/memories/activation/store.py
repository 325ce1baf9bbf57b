"""Where activation memory lives: a Qdrant index of retrieval vectors, and the payload (segment files of
compressed records, :mod:`.payload`; content-addressed blobs from earlier versions and residual payloads).

Schema (identical for both backends): named vectors ``pooled`` (cosine) and ``tokens`` (cosine
multivector, MaxSim), sparse vector ``bm25`` (IDF modifier; documents and queries embedded with Qdrant's
own ``Bm25``), payload fields ``memory_id, user_id, source_id, chunk_index, created, fingerprint, text,
blob, tokens, metadata``; keyword indexes on ``user_id`` (tenant), ``source_id``, ``blob``; the memory id is
also the point id.

- :class:`EdgeIndex`: an embedded Qdrant Edge shard (``qdrant-edge-py``: WAL, HNSW, payload filters) in
  ``<memory>/store``. Every upsert is followed by ``flush()``, so a returned write is on disk.
- :class:`ClientIndex`: ``qdrant-client`` against a server or cluster (one collection per model
  fingerprint and retrieval transform), or its local mode (``:memory:`` or a folder) for tests.
- :class:`~.payload.SegmentStore` (``segments/``): append-only files of KV records; a point's ``blob``
  field names its record (``seg:<file>:<offset>:<length>``).
- :class:`BlobStore`: content-addressed safetensors files ``blobs/ab/abcdef....safetensors`` (payloads of
  earlier versions, and ``payload="residual"``), written to a temp file, fsynced and renamed, with the
  folder fsynced after the rename.

Write order (crash safety): payload written and fsynced -> index upsert + flush -> acknowledged. A kill
between the two leaves unreferenced bytes (harmless; :meth:`ActivationMemory.gc` removes segment files and
blobs nothing refers to), never an acknowledged point without its payload. Deletion goes the other way:
index points first, then blobs no longer referenced (segment space is reclaimed by ``gc``).

Locking: an embedded store is opened by one process at a time (Qdrant Edge itself locks its WAL); a
``memory.lock`` file held with portalocker turns a second process into a clear
:class:`~nativemem.errors.MemoryLockedError`. Inside one process, opening the same folder twice shares one
store (:func:`open_store`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError, MemoryFormatError, MemoryLockedError

__all__ = ["IndexPoint", "Index", "EdgeIndex", "ClientIndex", "BlobStore", "BlobError", "Store", "open_store",
           "bm25_document", "bm25_query", "LOCK_NAME", "serialize"]

LOCK_NAME = "memory.lock"
KEYWORD_FIELDS = ("user_id", "source_id", "blob", "pending")  # memory_id is also the point id
PENDING = "pending"  # payload field of the points of an add that is not finished (see Index.publish)
DEFAULT_USER = ""  # user_id of memories written without one; searched only without one


@dataclass
class IndexPoint:
    """One chunk as the index sees it."""

    id: str
    pooled: list[float] | None
    tokens: list[list[float]]
    sparse: tuple[list[int], list[float]]
    payload: dict[str, Any] = field(default_factory=dict)


def _vectors(point: IndexPoint, sparse) -> dict[str, Any]:
    """Named vectors of a point (``pooled`` left out when the memory does not index it)."""
    out: dict[str, Any] = {"tokens": point.tokens, "bm25": sparse(point.sparse)}
    if point.pooled is not None:
        out["pooled"] = point.pooled
    return out


def _bm25():
    import qdrant_edge

    return qdrant_edge.Bm25()


_BM25 = threading.local()


def bm25_document(text: str) -> tuple[list[int], list[float]]:
    """Qdrant's BM25 document embedding (term frequencies; IDF is applied by the index)."""
    model = getattr(_BM25, "model", None) or _bm25()
    _BM25.model = model
    sv = model.embed_document(text)
    return list(sv.indices), list(sv.values)


def bm25_query(text: str) -> tuple[list[int], list[float]]:
    model = getattr(_BM25, "model", None) or _bm25()
    _BM25.model = model
    sv = model.embed_query(text)
    return list(sv.indices), list(sv.values)


# ---------------------------------------------------------------------------- index protocol
class Index(ABC):
    """The vector index of one memory. Scores: higher is more similar."""

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert points; durable when this returns."""

    @abstractmethod
    def query(self, variant: str, *, pooled=None, tokens=None, sparse=None, user_id: str, limit: int,
              candidates: int, rrf_k: int, bm25_weight: float = 1.0,
              memory_ids: Sequence[str] | None = None) -> list[tuple[str, float, dict]]:
        """Top ``limit`` points of ``user_id`` for one retrieval variant: ``[(id, score, payload)]``.

        Hybrid variants fuse the dense and the BM25 rankings by reciprocal-rank fusion, the BM25 ranks
        weighted by ``bm25_weight`` (the dense ones by 1)."""

    @abstractmethod
    def scroll(self, *, user_id: str | None = None, field_name: str | None = None, values: Sequence[str] = (),
               with_payload: bool | Sequence[str] = True) -> list[tuple[str, dict]]:
        """All points (optionally of one user, or whose ``field_name`` is one of ``values``)."""

    @abstractmethod
    def get(self, ids: Sequence[str]) -> list[tuple[str, dict]]:
        """Points with these ids (unknown or malformed ids are left out), in the order given."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Remove points; durable when this returns."""

    @abstractmethod
    def count(self, *, user_id: str | None = None, field_name: str | None = None, value: str | None = None) -> int:
        ...

    @abstractmethod
    def publish(self, ids: Sequence[str]) -> None:
        """Make points written with a ``pending`` payload field visible (all at once); durable when this returns.

        Until then every query, scroll, count and get leaves them out, so an add is seen whole or not at all."""

    @abstractmethod
    def unpublished(self) -> list[str]:
        """Ids of points still pending (an add that never finished, e.g. killed)."""

    @abstractmethod
    def dims(self) -> dict[str, int]:
        """``{"pooled": n, "tokens": m}`` as stored."""

    @abstractmethod
    def close(self) -> None:
        ...


def _valid_ids(ids: Sequence[str]) -> list[str]:
    """Point ids are UUIDs; anything else cannot name a point."""
    out = []
    for i in ids:
        try:
            out.append(str(uuid.UUID(str(i))))
        except ValueError:
            continue
    return out


def _check_dims(found: dict[str, int], want: dict[str, int], where: str) -> None:
    for name, size in want.items():
        if found.get(name) != size:
            raise MemoryFormatError(
                f"vector dimension mismatch in {where}: {name!r} vectors have size {found.get(name)} there, but "
                f"this memory's retrieval transform produces {size} (the index was built with another fit or "
                "model; create a new memory, or fit() an empty one)")


# ---------------------------------------------------------------------------- Qdrant Edge
class EdgeIndex(Index):
    """An embedded Qdrant Edge shard at ``path`` (created with ``dims`` if absent)."""

    def __init__(self, path: Path, dims: dict[str, int], *, durable: bool = True):
        """``durable=False``: changes are not flushed to disk (a replica rebuilt from elsewhere at every start)."""
        import qdrant_edge as q

        self.q = q
        self.path = Path(path)
        self.durable = durable
        if (self.path / "edge_config.json").is_file():
            try:
                self.shard = q.EdgeShard.load(str(self.path))
            except Exception as e:
                raise MemoryFormatError(f"the memory's index (Qdrant Edge shard in {self.path.name}/) cannot be "
                                        f"opened: {e}; {REPAIR_HINT}") from e
            _check_dims(self.dims(), dims, str(self.path))
        else:
            cfg = q.EdgeConfig(
                vectors={"pooled": q.EdgeVectorParams(size=dims["pooled"], distance=q.Distance.Cosine),
                         # token vectors are most of the index: stored as float16 (half the bytes)
                         "tokens": q.EdgeVectorParams(size=dims["tokens"], distance=q.Distance.Cosine,
                                                      datatype=q.VectorStorageDatatype.Float16,
                                                      multivector_config=q.MultiVectorConfig(
                                                          q.MultiVectorComparator.MaxSim))},
                sparse_vectors={"bm25": q.EdgeSparseVectorParams(modifier=q.Modifier.Idf)})
            self.shard = q.EdgeShard.create(str(self.path), cfg)
            for name in KEYWORD_FIELDS:
                params = q.KeywordIndexParams(is_tenant=True) if name == "user_id" else q.PayloadSchemaType.Keyword
                self.shard.update(q.UpdateOperation.create_field_index(name, params))
            self.shard.flush()

    def dims(self) -> dict[str, int]:
        import json

        cfg = json.loads((self.path / "edge_config.json").read_text())
        vectors = cfg.get("vectors") or cfg.get("vector_data") or {}
        return {name: int(v.get("size")) for name, v in vectors.items()}

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        q = self.q
        pts = [q.Point(p.id, _vectors(p, lambda v: q.SparseVector(v[0], v[1])), p.payload) for p in points]
        self.shard.update(q.UpdateOperation.upsert_points(pts))
        self._flush()

    def _flush(self) -> None:
        if self.durable:
            self.shard.flush()

    def _filter(self, user_id: str | None, memory_ids: Sequence[str] | None = None, field_name: str | None = None,
                values: Sequence[str] = ()):
        q = self.q
        must = [q.IsEmptyCondition(PENDING)]  # points of an unfinished add are never seen
        if user_id is not None:
            must.append(q.FieldCondition("user_id", match=q.MatchValue(user_id)))
        if memory_ids is not None:
            must.append(q.HasIdCondition(set(_valid_ids(memory_ids))))
        if field_name is not None:
            must.append(q.FieldCondition(field_name, match=q.MatchAny(list(values))))
        return q.Filter(must=must)

    def publish(self, ids):
        if ids:
            self.shard.update(self.q.UpdateOperation.delete_payload(keys=[PENDING], point_ids=list(ids)))
            self._flush()

    def unpublished(self):
        q = self.q
        flt = q.Filter(must_not=[q.IsEmptyCondition(PENDING)])
        out, offset = [], None
        while True:
            records, offset = self.shard.scroll(q.ScrollRequest(offset=offset, limit=1000, filter=flt,
                                                                with_payload=False))
            out.extend(str(r.id) for r in records)
            if offset is None:
                return out

    def query(self, variant, *, pooled=None, tokens=None, sparse=None, user_id, limit, candidates, rrf_k,
              bm25_weight=1.0, memory_ids=None):
        q = self.q
        flt = self._filter(user_id, memory_ids)
        nearest = {"pooled": lambda: q.Query.Nearest(pooled, using="pooled"),
                   "tokens": lambda: q.Query.Nearest(tokens, using="tokens"),
                   "bm25": lambda: q.Query.Nearest(q.SparseVector(*sparse), using="bm25")}
        # BM25's term statistics come from the caller's own chunks only: nothing another user stores changes them
        idf = None if user_id is None else q.SearchParams(idf=q.IdfParams(corpus=self._filter(user_id)))
        if variant in ("pooled", "tokens", "bm25"):
            req = q.QueryRequest(limit=limit, query=nearest[variant](), filter=flt, with_payload=True,
                                 params=idf if variant == "bm25" else None)
        else:
            dense = "pooled" if variant == "hybrid" else "tokens"
            req = q.QueryRequest(limit=limit, query=q.Fusion.Rrf(k=rrf_k, weights=[1.0, bm25_weight]), with_payload=True, prefetches=[
                q.Prefetch(limit=candidates, query=nearest[dense](), filter=flt),
                q.Prefetch(limit=candidates, query=nearest["bm25"](), filter=flt, params=idf)])
        return [(str(p.id), float(p.score), dict(p.payload or {})) for p in self.shard.query(req)]

    def scroll(self, *, user_id=None, field_name=None, values=(), with_payload=True):
        q = self.q
        flt = self._filter(user_id, None, field_name, values)
        selector = with_payload if isinstance(with_payload, bool) else q.PayloadSelector.Include(list(with_payload))
        out, offset = [], None
        while True:
            records, offset = self.shard.scroll(q.ScrollRequest(offset=offset, limit=1000, filter=flt,
                                                                with_payload=selector))
            out.extend((str(r.id), dict(r.payload or {})) for r in records)
            if offset is None:
                return out

    def get(self, ids):
        ids = _valid_ids(ids)
        if not ids:
            return []
        found = {str(r.id): dict(r.payload or {}) for r in self.shard.retrieve(ids, with_payload=True,
                                                                               with_vector=False)}
        return [(i, found[i]) for i in ids if i in found and not found[i].get(PENDING)]

    def delete(self, ids):
        if ids:
            self.shard.update(self.q.UpdateOperation.delete_points(list(ids)))
            self._flush()

    def count(self, *, user_id=None, field_name=None, value=None):
        flt = self._filter(user_id, None, field_name, [value] if field_name else ())
        return int(self.shard.count(self.q.CountRequest(filter=flt, exact=True)))

    def close(self):
        shard, self.shard = getattr(self, "shard", None), None
        if shard is not None:
            shard.flush()
            shard.close()


# ---------------------------------------------------------------------------- qdrant-client
class ClientIndex(Index):
    """One collection of a Qdrant server/cluster (or qdrant-client's local mode) with the same schema."""

    def __init__(self, location: str, collection: str, dims: dict[str, int]):
        from qdrant_client import QdrantClient, models

        self.m = models
        self.collection = collection
        if location == ":memory:":
            self.client = QdrantClient(location=":memory:")
        elif location.startswith(("http://", "https://")):
            self.client = QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
        else:
            self.client = QdrantClient(path=location)
        m = models
        if self.client.collection_exists(collection):
            _check_dims(self.dims(), dims, f"collection {collection!r}")
            return
        self.client.create_collection(
            collection,
            vectors_config={"pooled": m.VectorParams(size=dims["pooled"], distance=m.Distance.COSINE),
                            "tokens": m.VectorParams(size=dims["tokens"], distance=m.Distance.COSINE,
                                                     datatype=m.Datatype.FLOAT16,
                                                     multivector_config=m.MultiVectorConfig(
                                                         comparator=m.MultiVectorComparator.MAX_SIM))},
            sparse_vectors_config={"bm25": m.SparseVectorParams(modifier=m.Modifier.IDF)},
            metadata={"nativemem": "activation", "schema": 1})
        with warnings.catch_warnings():  # local mode warns that payload indexes do nothing there
            warnings.simplefilter("ignore")
            for name in KEYWORD_FIELDS:
                schema = (m.KeywordIndexParams(type=m.KeywordIndexType.KEYWORD, is_tenant=True)
                          if name == "user_id" else m.PayloadSchemaType.KEYWORD)
                self.client.create_payload_index(collection, name, schema)

    def dims(self) -> dict[str, int]:
        vectors = self.client.get_collection(self.collection).config.params.vectors
        return {name: int(v.size) for name, v in vectors.items()}

    def upsert(self, points):
        m = self.m
        pts = [m.PointStruct(id=p.id, payload=p.payload,
                             vector=_vectors(p, lambda v: m.SparseVector(indices=v[0], values=v[1])))
               for p in points]
        self.client.upsert(self.collection, pts, wait=True)

    def _filter(self, user_id, memory_ids=None, field_name=None, values=()):
        m = self.m
        must = [m.IsEmptyCondition(is_empty=m.PayloadField(key=PENDING))]  # points of an unfinished add: never seen
        if user_id is not None:
            must.append(m.FieldCondition(key="user_id", match=m.MatchValue(value=user_id)))
        if memory_ids is not None:
            must.append(m.HasIdCondition(has_id=_valid_ids(memory_ids)))
        if field_name is not None:
            must.append(m.FieldCondition(key=field_name, match=m.MatchAny(any=list(values))))
        return m.Filter(must=must)

    def publish(self, ids):
        if ids:
            self.client.delete_payload(self.collection, keys=[PENDING], points=list(ids), wait=True)

    def unpublished(self):
        m = self.m
        flt = m.Filter(must_not=[m.IsEmptyCondition(is_empty=m.PayloadField(key=PENDING))])
        out, offset = [], None
        while True:
            records, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=1000, offset=offset,
                                                 with_payload=False)
            out.extend(str(r.id) for r in records)
            if offset is None:
                return out

    def query(self, variant, *, pooled=None, tokens=None, sparse=None, user_id, limit, candidates, rrf_k,
              bm25_weight=1.0, memory_ids=None):
        m = self.m
        flt = self._filter(user_id, memory_ids)
        vec = {"pooled": lambda: pooled, "tokens": lambda: tokens,
               "bm25": lambda: m.SparseVector(indices=sparse[0], values=sparse[1])}
        # BM25's term statistics come from the caller's own chunks only (per-tenant IDF)
        idf = None if user_id is None else m.SearchParams(idf=m.IdfCorpusParams(corpus=self._filter(user_id)))
        if variant in ("pooled", "tokens", "bm25"):
            res = self.client.query_points(self.collection, query=vec[variant](), using=variant, query_filter=flt,
                                           limit=limit, with_payload=True,
                                           search_params=idf if variant == "bm25" else None)
        else:
            dense = "pooled" if variant == "hybrid" else "tokens"
            res = self.client.query_points(
                self.collection, limit=limit, with_payload=True, query=m.RrfQuery(rrf=m.Rrf(k=rrf_k, weights=[1.0, bm25_weight])),
                prefetch=[m.Prefetch(query=vec[dense](), using=dense, limit=candidates, filter=flt),
                          m.Prefetch(query=vec["bm25"](), using="bm25", limit=candidates, filter=flt, params=idf)])
        return [(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def scroll(self, *, user_id=None, field_name=None, values=(), with_payload=True):
        flt = self._filter(user_id, None, field_name, values)
        out, offset = [], None
        while True:
            records, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=1000, offset=offset,
                                                 with_payload=with_payload if isinstance(with_payload, bool)
                                                 else list(with_payload))
            out.extend((str(r.id), dict(r.payload or {})) for r in records)
            if offset is None:
                return out

    def get(self, ids):
        ids = _valid_ids(ids)
        if not ids:
            return []
        found = {str(r.id): dict(r.payload or {}) for r in self.client.retrieve(self.collection, ids,
                                                                                with_payload=True)}
        return [(i, found[i]) for i in ids if i in found and not found[i].get(PENDING)]

    def delete(self, ids):
        if ids:
            self.client.delete(self.collection, points_selector=self.m.PointIdsList(points=list(ids)), wait=True)

    def count(self, *, user_id=None, field_name=None, value=None):
        flt = self._filter(user_id, None, field_name, [value] if field_name else ())
        return int(self.client.count(self.collection, count_filter=flt, exact=True).count)

    def close(self):
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()


# ---------------------------------------------------------------------------- blobs
class BlobError(MemoryFormatError):
    """A payload blob is missing, corrupted, or was written for another model or layout."""


class BlobStore:
    """Content-addressed payload files (sha256 of the bytes) under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def put(self, data: bytes) -> str:
        """Write ``data`` durably (temp file, fsync, rename, fsync folder); returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.is_file() and target.stat().st_size == len(data):
            return sha  # same content already stored (content addressing dedupes)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return sha

    def get(self, sha: str) -> bytes:
        """The bytes of blob ``sha``; raises BlobError if missing or if the content does not match its name."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"payload blob {path} is missing") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise BlobError(f"payload blob {path} is corrupted (its sha256 differs from its name)")
        return data

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def all(self) -> dict[str, int]:
        """sha -> size of every stored blob."""
        return {p.stem: p.stat().st_size for p in self.root.glob("*/*.safetensors")}

    def nbytes(self) -> int:
        return sum(self.all().values())


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int8": "I8",
              "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}


def serialize(tensors: dict, metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (sorted keys), so equal content gives equal bytes.

    safetensors' own writer orders its header through a hash map, which makes the bytes (and so a
    content address) vary between calls.
    """
    import json

    import torch

    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in names:
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the store and its lock
class Store:
    """Index, payload segments (and the blobs of older versions), catalog of one memory folder, and the writer lock."""

    def __init__(self, index: Index, blobs: BlobStore, segments, lock=None, catalog=None, link=None):
        self.index = index
        self.blobs = blobs
        self.segments = segments  # payload.SegmentStore, or shared.RedisPayload
        self.catalog = catalog  # catalog.Catalog: what the folder holds, independent of the index
        self.tiers = None  # set by the first memory that reads payloads (it knows the device and budgets)
        self._lock = lock
        self._finalizer = weakref.finalize(self, _close, index, lock, link)

    def close(self) -> None:
        self._finalizer()


def _close(index: Index, lock, link=None) -> None:
    try:
        index.close()
        if link is not None:
            link.close()
        if isinstance(index, EdgeIndex):
            _write_clean_signature(index.path)
    except Exception as e:  # e.g. the folder was removed while open; nothing left to flush
        warnings.warn(f"closing the memory store failed: {e}", RuntimeWarning, stacklevel=2)
    finally:
        if lock is not None:
            lock.release()


_OPEN: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()
_OPEN_GUARD = threading.Lock()


def _acquire_lock(folder: Path):
    import portalocker

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    lock = portalocker.Lock(str(path), mode="a+", timeout=0, fail_when_locked=True,
                            flags=portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
    try:
        handle = lock.acquire()
    except (portalocker.exceptions.LockException, portalocker.exceptions.AlreadyLocked):
        try:
            owner = path.read_text().strip() or "unknown"
        except OSError:
            owner = "unknown"
        raise MemoryLockedError(
            f"{folder} is open in another process ({owner}); an embedded memory can be written by one process "
            "at a time: close the other one, or use backend='qdrant' with a Qdrant server") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return lock


REPAIR_HINT = "rebuild it from the memory's catalog: `nativemem repair --memory DIR`"


def _clean_file(path: Path) -> Path:
    return path.with_name(path.name + ".clean.json")


def _shard_signature(path: Path) -> list[list]:
    """(relative path, size, mtime) of every file of a shard."""
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def _write_clean_signature(path: Path) -> None:
    """After a clean close: what the shard's files look like, so the next open can trust them unprobed."""
    import json

    if not path.is_dir():
        return
    _clean_file(path).write_text(json.dumps(_shard_signature(path)))


def verify_shard(path: Path, timeout_s: float = 300.0) -> None:
    """Check that a Qdrant Edge shard can be loaded before this process loads it.

    A damaged shard can abort the process from native code (an allocation of a garbage size), which no
    ``except`` catches. A shard whose files are as the last clean close left them is trusted; otherwise
    (a crash, an edit, a damaged disk) it is first loaded and counted in a child process.

    Raises:
        MemoryFormatError: the child process failed or died; the message says how and how to repair.
    """
    import json
    import subprocess
    import sys

    if not (path / "edge_config.json").is_file():
        return
    try:
        clean = json.loads(_clean_file(path).read_text())
    except (OSError, ValueError):
        clean = None
    if clean == _shard_signature(path):
        return
    probe = ("import sys, qdrant_edge as q\n"
             "s = q.EdgeShard.load(sys.argv[1])\n"
             "s.count(q.CountRequest(exact=True))\n"
             "s.close()\n")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MemoryFormatError(f"the memory's index (Qdrant Edge shard in {path.name}/) did not load within "
                                f"{timeout_s:.0f} s; {REPAIR_HINT}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
        how = f"exit status {done.returncode}" if done.returncode > 0 else f"killed by signal {-done.returncode}"
        raise MemoryFormatError(f"the memory's index (Qdrant Edge shard in {path.name}/) is damaged: loading it "
                                f"failed ({how}: {last}); {REPAIR_HINT}")


def open_store(key: str, *, backend: str, folder: Path, blob_dir: Path, dims: dict[str, int],
               location: str = "", collection: str = "", redis_url: str = "") -> Store:
    """The store of a memory folder, shared by every Memory object of this process that opens it.

    With ``redis_url`` the payload and the catalog live in that Redis under the collection's namespace, and with
    ``backend="redis"`` the index's change log too (:mod:`.shared`).

    Raises:
        StoreUnavailableError: the Redis cannot be reached.
    """
    with _OPEN_GUARD:
        store = _OPEN.get(key)
        if store is not None:
            _check_dims(store.index.dims(), dims, key)
            return store
        if redis_url:
            return _open_shared(key, backend=backend, blob_dir=blob_dir, dims=dims, location=location,
                                collection=collection, redis_url=redis_url)
        if backend == "edge":
            lock = _acquire_lock(folder)
            try:
                verify_shard(folder / "store")
                index: Index = EdgeIndex(folder / "store", dims)
            except BaseException:
                lock.release()
                raise
        elif backend == "qdrant":
            lock = None
            index = ClientIndex(location, collection, dims)
        else:
            raise InputError(f"unknown backend {backend!r}")
        from .catalog import Catalog
        from .payload import SegmentStore

        segments = SegmentStore(folder / "segments" if blob_dir == folder / "blobs" else blob_dir / "segments")
        store = Store(index, BlobStore(blob_dir), segments, lock, Catalog(folder))
        _OPEN[key] = store
        return store


def _open_shared(key: str, *, backend: str, blob_dir: Path, dims: dict[str, int], location: str, collection: str,
                 redis_url: str) -> Store:
    from .shared import Link, LogIndex, RedisCatalog, RedisPayload, namespace

    link, ns = Link(redis_url), namespace(collection)
    try:
        index: Index = LogIndex(link, ns, dims) if backend == "redis" else ClientIndex(location, collection, dims)
    except BaseException:
        link.close()
        raise
    store = Store(index, BlobStore(blob_dir), RedisPayload(link, ns), None, RedisCatalog(link, ns), link)
    _OPEN[key] = store
    return store


def new_id() -> str:
    return str(uuid.uuid4())
