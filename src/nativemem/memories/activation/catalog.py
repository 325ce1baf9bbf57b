"""The catalog: what a memory folder holds, in a log that does not depend on the index.

The Qdrant index is fast but fragile: a lost segment folder or a few flipped bytes lose chunks silently or
stop the process. The catalog is the source of truth it can be rebuilt from (:func:`repair_memory`):

- **Lines.** ``catalog/<writer>.jsonl`` files of JSON lines. ``add`` (one per chunk and version: id, user,
  source, chunk index, creation time, text, metadata, ``version`` (1, then one more per update) and the pending
  id of its add or update), ``publish`` (a pending id, when all its chunks are written) and ``delete`` (ids).
  Every line has its ``time``. Each process appends to its own file; a group of lines is one write and one
  fsync.
- **Order.** An add's lines are fsynced after its payload and before the index learns of its chunks; its
  ``publish`` line before the index shows them; a ``delete`` line before the index drops them. So every
  acknowledged chunk is in the catalog, and a crash between the two leaves the catalog ahead of the index,
  which the next open catches up (:meth:`ActivationMemory._reconcile`).
- **Live chunks** are the added ones not deleted, each at its latest published version. A line torn by a
  crash (the last of a file) is ignored; a damaged line elsewhere is skipped and counted.
- **Deleted text** stays in the catalog (as deleted KV stays in segment files) until ``gc()``, which
  rewrites the catalog with only the live chunks (:meth:`Catalog.compact`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import _fsync_dir

__all__ = ["Catalog", "CatalogState", "CatalogView", "CATALOG_DIR", "FORMAT"]

CATALOG_DIR = "catalog"
FORMAT = "nativemem-catalog/1"
_MARKER = "FORMAT"


@dataclass
class CatalogState:
    """What the catalog's lines say: the live chunks by id, deleted ids, and lines that could not be read."""

    live: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    unpublished: set[str] = field(default_factory=set)  # chunks whose latest add or update was never published
    damaged_lines: int = 0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # id -> its published versions, deletes
    owners: dict[str, str] = field(default_factory=dict)  # id -> user id, deleted chunks included


class Catalog:
    """The catalog of one memory folder (created on first use; see the module docstring)."""

    def __init__(self, folder: Path):
        self.root = Path(folder) / CATALOG_DIR
        self._file = self.root / f"{uuid.uuid4().hex}.jsonl"  # this writer's own file
        self._lock = threading.Lock()

    @property
    def exists(self) -> bool:
        return (self.root / _MARKER).is_file()

    def create(self) -> None:
        """Make the catalog folder and its format marker (durably)."""
        if self.exists:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / _MARKER
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".FORMAT.")
        with os.fdopen(fd, "w") as f:
            f.write(FORMAT + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        _fsync_dir(self.root)
        _fsync_dir(self.root.parent)

    # ------------------------------------------------------------------ writes
    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        now = time.time()
        data = "".join(json.dumps({"time": now, **line}, ensure_ascii=False, separators=(",", ":")) + "\n"
                       for line in lines)
        with self._lock:
            self.create()
            new = not self._file.exists()
            with open(self._file, "ab") as f:
                f.write(data.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            if new:
                _fsync_dir(self.root)

    def add(self, entries: list[dict[str, Any]], pending_id: str = "") -> None:
        """Record chunks or new versions of them (each a dict with ``memory_id``, ``user_id``, ``source_id``,
        ``chunk_index``, ``created``, ``text``, ``metadata``, ``version``); with ``pending_id`` they are live only
        once it is published."""
        self._append([{"op": "add", **e, **({"pending": pending_id} if pending_id else {})} for e in entries])

    def publish(self, pending_id: str) -> None:
        self._append([{"op": "publish", "pending": pending_id}])

    def delete(self, ids: list[str]) -> None:
        if ids:
            self._append([{"op": "delete", "ids": list(ids)}])

    # ------------------------------------------------------------------ reads
    def files(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []

    def _sources(self) -> list[list[bytes]]:
        """Each writer's lines, in order; the last of a list may be torn by a crash (``b""`` when it is not)."""
        return [path.read_bytes().split(b"\n") for path in self.files()]

    def state(self) -> CatalogState:
        """Replay every line of every writer's file."""
        versions: dict[str, list[dict[str, Any]]] = {}
        deletes: dict[str, float] = {}
        published: set[str] = set()
        out = CatalogState()
        for raw in self._sources():
            for n, line in enumerate(raw):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    op = rec["op"]
                except (ValueError, KeyError, TypeError):
                    if n < len(raw) - 1:  # the last line of a file may be torn by a crash: not damage
                        out.damaged_lines += 1
                    continue
                if op == "add" and "memory_id" in rec:
                    versions.setdefault(str(rec["memory_id"]), []).append(rec)
                elif op == "publish":
                    published.add(str(rec.get("pending", "")))
                elif op == "delete":
                    for i in rec.get("ids", []):
                        deletes.setdefault(str(i), rec.get("time"))
                else:
                    out.damaged_lines += 1
        out.deleted = set(deletes)
        for mid, recs in versions.items():
            recs.sort(key=lambda r: int(r.get("version") or 1))
            done = [{k: v for k, v in r.items() if k not in ("op", "pending")} for r in recs
                    if not r.get("pending") or r["pending"] in published]
            out.history[mid] = [{"op": "add" if int(r.get("version") or 1) == 1 else "update",
                                 "time": r.get("time", r.get("created")), "version": int(r.get("version") or 1),
                                 "text": r.get("text"), "metadata": r.get("metadata")} for r in done]
            out.owners[mid] = str(recs[0].get("user_id") or "")
            if mid in deletes:
                out.history[mid].append({"op": "delete", "time": deletes[mid]})
                continue
            if recs[-1].get("pending") and recs[-1]["pending"] not in published:
                out.unpublished.add(mid)
            if done:
                out.live[mid] = done[-1]
        return out

    # ------------------------------------------------------------------ maintenance
    def compact(self, live: dict[str, dict[str, Any]]) -> int:
        """Rewrite the catalog as one file of the live chunks (deleted text leaves the disk); returns bytes freed."""
        with self._lock:
            before = sum(p.stat().st_size for p in self.files())
            self.create()
            new = self.root / f"{uuid.uuid4().hex}.jsonl"
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".compact.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for rec in live.values():
                    f.write(json.dumps({"op": "add", **rec}, ensure_ascii=False, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            old = self.files()
            os.replace(tmp, new)
            _fsync_dir(self.root)
            for p in old:
                p.unlink(missing_ok=True)
            _fsync_dir(self.root)
            self._file = self.root / f"{uuid.uuid4().hex}.jsonl"
            return max(0, before - new.stat().st_size)


class CatalogView:
    """A read-only view of a memory folder through its catalog: ``items``, ``get``, ``history`` and ``export``,
    with no model and no index, so it works while another process has the folder open and writes to it (it
    sees every write acknowledged before each call; a line being written is skipped). Search and generation
    need the index: ask the process that holds it (e.g. the server's HTTP API).

    Raises:
        MemoryFormatError: the folder has no catalog.
    """

    kind = "activation"

    def __init__(self, folder: str | os.PathLike):
        from ...errors import MemoryFormatError

        self.catalog = Catalog(Path(folder))
        if not self.catalog.exists:
            raise MemoryFormatError(f"{folder} has no catalog to read (an older memory folder, or not an activation "
                                    "memory)")

    def _rows(self, user_id: str | None) -> list[tuple[str, dict[str, Any]]]:
        from .memory import _check_user, oldest_first

        user = _check_user(user_id)
        rows = [(mid, rec) for mid, rec in self.catalog.state().live.items() if (rec.get("user_id") or "") == user]
        return sorted(rows, key=oldest_first)

    def items(self, *, user_id: str | None = None, limit: int = 100, offset: int = 0,
              source_id: str | None = None) -> list[dict[str, Any]]:
        from .memory import item_of

        rows = [r for r in self._rows(user_id) if source_id is None or r[1].get("source_id") == source_id]
        return [item_of(mid, rec) for mid, rec in rows[offset: offset + limit]]

    def count(self, *, user_id: str | None = None) -> int:
        return len(self._rows(user_id))

    def get(self, memory_id: str, *, user_id: str | None = None) -> dict[str, Any] | None:
        from .memory import item_of

        return next((item_of(mid, rec) for mid, rec in self._rows(user_id) if mid == str(memory_id)), None)

    def history(self, memory_id: str, *, user_id: str | None = None) -> list[dict[str, Any]]:
        from .memory import _check_user

        state = self.catalog.state()
        if state.owners.get(str(memory_id)) != _check_user(user_id):
            return []
        return state.history.get(str(memory_id), [])

    def export(self, path, *, user_id: str | None = None, force: bool = False) -> int:
        from ..export import write_export
        from .memory import item_of, oldest_first

        state = self.catalog.state()
        rows = self._rows(user_id) if user_id is not None else sorted(state.live.items(), key=oldest_first)
        model = "unknown (read from the catalog)"
        return write_export(path, [item_of(mid, rec) for mid, rec in rows], kind=self.kind, model=model,
                            user_id=user_id, force=force)
