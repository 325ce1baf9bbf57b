"""One activation memory served by several processes (server replicas) through a shared Redis.

A memory with ``redis_url`` keeps what its folder would hold in Redis instead, under the namespace
``nativemem:<collection>`` (the collection name names the model's fingerprint and the retrieval transform, so
only memories that encode alike share one):

- **Payload** (:class:`RedisPayload`): each chunk's KV record (the same bytes as in a segment file: header, CRC,
  body) is one Redis string ``<ns>:kv:<name>``; its location ``seg:<name>:0:<length>`` reads like a segment file
  holding one record, so ``stats()``, ``check()`` and ``gc()`` work as they do on files. A group of records is
  one ``MULTI``/``EXEC``.
- **Catalog** (:class:`RedisCatalog`): the catalog's lines (:mod:`.catalog`) as entries of the stream
  ``<ns>:catalog``, in the order every writer appended them.
- **Index** (:class:`LogIndex`, ``backend="redis"``): every change of the index (upsert, publish, delete) is
  appended to the stream ``<ns>:index`` and then applied to a Qdrant Edge replica that each process keeps in a
  temporary folder; every read first applies the entries it has not seen, in stream order. So a chunk one
  replica acknowledged is found by the next request on any other, and all replicas hold the same index.
  With ``backend="qdrant"`` (a Qdrant server or cluster) the index is shared there and Redis holds the payload
  and the catalog.

Durability: a write is acknowledged after Redis acknowledged it, so a replica killed at any point loses nothing
it acknowledged, and a replica that starts rebuilds its index replica from the stream. For the writes to survive
Redis itself being killed, run it with ``appendonly yes`` and ``appendfsync always`` (opening warns otherwise).

Costs and limits: a replica's start replays the whole index stream (deleted chunks included: the stream is not
compacted); the catalog is not compacted by ``gc()`` either (another replica may be between an add's lines).
``gc()`` leaves payload records younger than :data:`GC_GRACE_S` alone, since another replica may have written
them and not yet indexed them. Redis unreachable: :class:`~nativemem.errors.StoreUnavailableError` at open and
on every later call that needs it (the server answers 503 with the reason).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from ...errors import StoreUnavailableError
from .catalog import FORMAT, Catalog
from .payload import _frame, parse_location, unpack
from .store import BlobError, EdgeIndex, Index, IndexPoint

__all__ = ["Link", "RedisPayload", "RedisCatalog", "LogIndex", "namespace", "GC_GRACE_S"]

GC_GRACE_S = 600.0  # gc() leaves payload records younger than this (another replica may be about to index them)
_PAGE = 500  # stream entries read per round trip


def namespace(collection: str) -> str:
    return f"nativemem:{collection}"


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path if parts.hostname else ''}"


class Link:
    """A Redis connection pool; every call goes through :meth:`reaching`, which turns an unreachable or
    failing server into :class:`StoreUnavailableError`."""

    def __init__(self, url: str, *, timeout_s: float = 5.0):
        import redis

        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          health_check_interval=30)
        with self.reaching():
            self.redis.ping()
        self._warn_if_volatile()

    @contextmanager
    def reaching(self) -> Iterator[None]:
        import redis

        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"the memory's Redis at {_shown(self.url)} cannot be reached ({e})") from None
        except redis.exceptions.ResponseError as e:  # e.g. out of memory, read-only replica, auth required
            raise StoreUnavailableError(f"the memory's Redis at {_shown(self.url)} refused a write or read ({e})") \
                from None

    def _warn_if_volatile(self) -> None:
        import redis

        try:
            conf = self.redis.config_get("append*")
        except redis.exceptions.RedisError:  # CONFIG is often disabled on managed servers: nothing to say then
            return
        if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
            warnings.warn(f"Redis at {_shown(self.url)} runs without appendonly yes / appendfsync always: writes it "
                          "acknowledged are lost if Redis itself stops uncleanly", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        self.redis.close()


# ---------------------------------------------------------------------------- payload
class RedisPayload:
    """KV records as Redis strings; the interface of :class:`~.payload.SegmentStore` (one record per "segment")."""

    def __init__(self, link: Link, ns: str):
        self.link, self.prefix = link, f"{ns}:kv:"

    def append(self, records: list[tuple[dict[str, Any], bytes | memoryview]]) -> list[str]:
        """Store records (header, body) in one transaction; returns their locations."""
        if not records:
            return []
        now = int(time.time())
        out, pipe = [], self.link.redis.pipeline(transaction=True)
        for header, body in records:
            data = _frame(header, body) + bytes(body)
            name = f"{now}-{uuid.uuid4().hex}"  # the time: gc() spares records younger than GC_GRACE_S
            pipe.set(self.prefix + name, data)
            out.append(f"seg:{name}:0:{len(data)}")
        with self.link.reaching():
            pipe.execute()
        return out

    def read(self, location: str, *, pin: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
        """Header and CRC-checked body (a uint8 tensor, pinned if ``pin``) of one record."""
        name, offset, length = parse_location(location)
        with self.link.reaching():
            data = self.link.redis.get(self.prefix + name)
        if data is None:
            raise BlobError(f"payload record {location} is missing from Redis")
        if offset != 0 or len(data) != length:
            raise BlobError(f"payload record {location} has {len(data)} bytes in Redis, not {length}")
        buf = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(buf.numpy())
        view[:] = data
        header, body = unpack(view, location)
        start = 8 + int.from_bytes(view[4:8], "little")
        return header, buf[start: start + len(body)]

    def view(self, location: str) -> tuple[dict[str, Any], memoryview]:
        header, body = self.read(location)
        return header, memoryview(body.numpy())

    def files(self) -> dict[str, int]:
        """Record name -> size in bytes."""
        with self.link.reaching():
            keys = list(self.link.redis.scan_iter(match=self.prefix + "*", count=1000))
            pipe = self.link.redis.pipeline(transaction=False)
            for k in keys:
                pipe.strlen(k)
            sizes = pipe.execute() if keys else []
        return {k.decode()[len(self.prefix):]: int(n) for k, n in zip(keys, sizes) if n}

    def settled(self, name: str) -> bool:
        """Whether ``gc()`` may remove this record when nothing refers to it (old enough that no add of another
        replica can be between writing it and indexing it)."""
        try:
            return time.time() - int(name.split("-", 1)[0]) > GC_GRACE_S
        except ValueError:
            return True

    def delete(self, name: str) -> None:
        with self.link.reaching():
            self.link.redis.delete(self.prefix + name)

    def drop_page_cache(self) -> None:
        """Nothing to drop: the records live in Redis."""

    def close(self) -> None:
        """The link is closed with the store."""


# ---------------------------------------------------------------------------- catalog
class RedisCatalog(Catalog):
    """The catalog's lines as entries of one Redis stream (see :mod:`.catalog` for what they say)."""

    def __init__(self, link: Link, ns: str):
        self.link, self.key, self.marker = link, f"{ns}:catalog", f"{ns}:catalog:format"
        self._lock = threading.Lock()

    @property
    def exists(self) -> bool:
        with self.link.reaching():
            return bool(self.link.redis.exists(self.marker))

    def create(self) -> None:
        with self.link.reaching():
            self.link.redis.set(self.marker, FORMAT, nx=True)

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        now = time.time()
        pipe = self.link.redis.pipeline(transaction=True)
        pipe.set(self.marker, FORMAT, nx=True)
        for line in lines:
            pipe.xadd(self.key, {"l": json.dumps({"time": now, **line}, ensure_ascii=False, separators=(",", ":"))})
        with self.link.reaching():
            pipe.execute()

    def files(self) -> list[Path]:
        return []

    def _sources(self) -> list[list[bytes]]:
        return [[fields.get(b"l", b"") for _, fields in _entries(self.link, self.key, "-")] + [b""]]

    def compact(self, live: dict[str, dict[str, Any]]) -> int:
        """Not compacted: another replica may be between an add's lines and its publish line."""
        return 0


def _entries(link: Link, key: str, after: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries after id ``after`` (``"-"``: all), in order, a page per round trip."""
    start = after if after == "-" else f"({after}"
    while True:
        with link.reaching():
            page = link.redis.xrange(key, min=start, count=_PAGE)
        yield from page
        if len(page) < _PAGE:
            return
        start = f"({page[-1][0].decode()}"


# ---------------------------------------------------------------------------- index
class LogIndex(Index):
    """The index as a Redis stream of changes, replayed into a local Qdrant Edge replica (module docstring)."""

    def __init__(self, link: Link, ns: str, dims: dict[str, int]):
        self.link, self.key = link, f"{ns}:index"
        self._folder = tempfile.mkdtemp(prefix="nativemem-replica-")
        self.local = EdgeIndex(Path(self._folder) / "store", dims, durable=False)  # rebuilt from the stream
        self._seen = "-"
        self._lock = threading.Lock()
        self.catch_up()

    def catch_up(self) -> int:
        """Apply the stream's entries this replica has not seen; returns how many."""
        n = 0
        with self._lock:
            for entry_id, fields in _entries(self.link, self.key, self._seen):
                self._apply(fields)
                self._seen = entry_id.decode()
                n += 1
        return n

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        op, meta = fields[b"op"].decode(), json.loads(fields[b"meta"])
        if op == "upsert":
            self.local.upsert(_points(meta, fields[b"vec"]))
        elif op == "publish":
            self.local.publish(meta)
        elif op == "delete":
            self.local.delete(meta)
        else:
            raise BlobError(f"the index stream holds an entry of unknown kind {op!r} (written by a newer version?)")

    def _log(self, op: str, meta: Any, vec: bytes = b"") -> None:
        with self.link.reaching():
            self.link.redis.xadd(self.key, {"op": op, "meta": json.dumps(meta, separators=(",", ":")), "vec": vec})
        self.catch_up()

    # -------------------------------------------------------------- changes: the stream first, then the replica
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            self._log("upsert", *_serialise(points))

    def publish(self, ids: Sequence[str]) -> None:
        if ids:
            self._log("publish", list(ids))

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._log("delete", list(ids))

    # -------------------------------------------------------------- reads: after catching up
    def query(self, variant, **kw):
        self.catch_up()
        return self.local.query(variant, **kw)

    def scroll(self, **kw):
        self.catch_up()
        return self.local.scroll(**kw)

    def get(self, ids):
        self.catch_up()
        return self.local.get(ids)

    def count(self, **kw):
        self.catch_up()
        return self.local.count(**kw)

    def unpublished(self):
        self.catch_up()
        return self.local.unpublished()

    def dims(self) -> dict[str, int]:
        return self.local.dims()

    def close(self) -> None:
        self.local.close()
        shutil.rmtree(self._folder, ignore_errors=True)


def _serialise(points: Sequence[IndexPoint]) -> tuple[list[dict[str, Any]], bytes]:
    """Points as JSON (ids, payloads, sparse vectors, shapes) and their dense vectors as float32 bytes."""
    meta, parts = [], []
    for p in points:
        tokens = np.asarray(p.tokens, dtype=np.float32).reshape(len(p.tokens), -1)
        meta.append({"id": p.id, "payload": p.payload, "sparse": [list(p.sparse[0]), list(p.sparse[1])],
                     "pooled": None if p.pooled is None else len(p.pooled), "tokens": list(tokens.shape)})
        if p.pooled is not None:
            parts.append(np.asarray(p.pooled, dtype=np.float32).tobytes())
        parts.append(tokens.tobytes())
    return meta, b"".join(parts)


def _points(meta: list[dict[str, Any]], vec: bytes) -> list[IndexPoint]:
    flat, at, out = np.frombuffer(vec, dtype=np.float32), 0, []
    for m in meta:
        pooled = None
        if m["pooled"] is not None:
            pooled = flat[at: at + m["pooled"]].tolist()
            at += m["pooled"]
        n, d = m["tokens"]
        tokens = flat[at: at + n * d].reshape(n, d).tolist()
        at += n * d
        out.append(IndexPoint(m["id"], pooled, tokens, (m["sparse"][0], m["sparse"][1]), m["payload"]))
    return out
