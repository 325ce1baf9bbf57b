"""The memory contract every kind implements, and the kind registry.

A memory kind is a :class:`Memory` subclass with a :class:`MemoryConfig` dataclass, registered with
:func:`register_memory`. The contract:

- ``add(texts, user_id=, metadata=) -> Receipt``: write knowledge; the receipt says what happened.
- ``search(query, k=, user_id=) -> list[Hit]``: only where ``supports_search``.
- ``active(lm=, user_id=, query=)``: a context manager entered by every generation call; it registers
  the kind's hooks (removed in ``finally``) and yields an :class:`Injection` (maybe a KV prefix).
  When the memory is disabled it does nothing, so logits are bit-identical to the bare model.
- ``delete(memory_id) -> Receipt``, ``stats() -> dict``.
- The lifecycle: ``items(user_id=, limit=, offset=)``, ``get(memory_id, user_id=)``, ``update``, ``history``,
  ``reset(user_id)``,
  ``export(path, user_id=)`` (the portable JSON Lines format of :mod:`.export`) and ``import_file(path)``.
  A kind that cannot do one raises :class:`~nativemem.errors.UnsupportedError` naming itself.
- ``save(path)`` / ``Memory.open(path, lm)``: a folder with ``memory_config.json`` (sorted keys, a
  format version, the model fingerprint) and ``memory.safetensors`` (tensors named with the kind's
  ``param_prefix``). Opening with another model raises FingerprintMismatchError naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import FingerprintMismatchError, InputError, MemoryFormatError, UnsupportedError
from ..fingerprint import Fingerprint
from ..registry import Registry
from ..text import check_text

__all__ = ["Memory", "MemoryConfig", "Receipt", "Hit", "Injection", "RecordLifecycle", "register_memory",
           "memory_kinds", "get_memory_class", "open_memory", "MEMORY_CONFIG_NAME", "MEMORY_WEIGHTS_NAME",
           "FORMAT_VERSION"]

MEMORY_CONFIG_NAME = "memory_config.json"
MEMORY_WEIGHTS_NAME = "memory.safetensors"
FORMAT_VERSION = 1

_KINDS: Registry[type[Memory]] = Registry("memory kind")
_PREFIXES: dict[str, str] = {}


@dataclass
class MemoryConfig:
    """Base of every kind's config. Subclasses add fields with ``metadata={"help": ...}``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MemoryFormatError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class Receipt:
    """What an operation did. ``did_nothing`` is True when nothing was written or trained."""

    kind: str
    op: str
    ids: list[str] = field(default_factory=list)
    tokens: int = 0
    bytes_written: int = 0
    layers: list[int] = field(default_factory=list)
    steps: int = 0
    final_loss: float | None = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def did_nothing(self) -> bool:
        return not self.ids and self.steps == 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "did_nothing": self.did_nothing}

    def __str__(self) -> str:
        if self.did_nothing:
            return f"{self.kind} {self.op}: nothing was done" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        parts = [f"{len(self.ids)} item(s)", f"{self.tokens} tokens", f"{self.bytes_written:,} bytes"]
        if self.steps:
            parts.append(f"{self.steps} steps, final loss {self.final_loss:.4g}" if self.final_loss is not None
                         else f"{self.steps} steps")
        return f"{self.kind} {self.op}: " + ", ".join(parts) + f" in {self.elapsed_s:.2f}s"


@dataclass
class Hit:
    """One search result; higher score means more similar.

    ``score`` is the search's raw score (for hybrid searches a rank-fusion value that only orders hits);
    ``relevance``, where the memory has one, is the calibrated probability that the hit helps answer the query.
    """

    id: str
    score: float
    text: str
    payload: dict[str, Any] = field(default_factory=dict)
    relevance: float | None = None


@dataclass
class Injection:
    """What a memory adds to one generation call besides its hooks.

    ``past_key_values`` stands for ``prefix_ids`` placed before the prompt (a KV prefix). It is deep-copied
    for each call, so a stored cache is never mutated by generation, unless ``owned`` says it was built for
    this scope's one call (then that call takes it as it is, and a second call is an error).

    With ``splice = n``, the prefix's first ``n`` ids are the head every matching prompt starts with (a chat
    template's system turn and user-turn opening): :meth:`generate_kwargs` drops them from a prompt that
    starts with them, so the rest of the prefix sits inside the prompt, right after its head. A prompt
    with another head gets the whole prefix before it.
    """

    prefix_ids: torch.LongTensor | None = None  # (1, P)
    past_key_values: Any = None
    splice: int = 0
    owned: bool = False  # the cache was built for one call: that call takes it without a copy

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_ids is None else int(self.prefix_ids.shape[1])

    def spliced(self, input_ids: torch.LongTensor) -> bool:
        """Whether ``input_ids`` starts with the prefix's head (and so continues the prefix without it)."""
        n = self.splice
        return bool(n) and input_ids.shape[1] > n and torch.equal(
            input_ids[0, :n].cpu(), self.prefix_ids[0, :n].cpu())

    def generate_kwargs(self, input_ids: torch.LongTensor) -> dict[str, Any]:
        if self.past_key_values is None and not self.owned:
            return {}
        rest = input_ids[:, self.splice:] if self.spliced(input_ids) else input_ids
        full = torch.cat([self.prefix_ids.to(input_ids.device), rest], dim=1)
        return {"input_ids": full, "past_key_values": self._take_cache()}

    def forward_kwargs(self, input_ids: torch.LongTensor) -> dict[str, Any]:
        if self.past_key_values is None and not self.owned:
            return {}
        return {"past_key_values": self._take_cache()}

    def _take_cache(self):
        if not self.owned:
            return copy.deepcopy(self.past_key_values)
        # generation extends the cache in place, so an owned cache serves exactly one call
        cache, self.past_key_values = self.past_key_values, None
        if cache is None:
            raise RuntimeError("this injection's KV cache was already used by a call (an owned injection serves "
                               "one forward or generate call)")
        return cache


class Memory(ABC):
    """Base class of every memory kind (see the module docstring for the contract)."""

    kind: ClassVar[str]
    config_cls: ClassVar[type[MemoryConfig]] = MemoryConfig
    param_prefix: ClassVar[str]
    supports_search: ClassVar[bool] = False
    supports_fuse: ClassVar[bool] = False

    def __init__(self, lm, config: MemoryConfig | None = None, *, path: str | os.PathLike | None = None):
        self.lm = lm
        self.config = config if config is not None else self.config_cls()
        self.path = Path(path) if path is not None else None
        self.fingerprint: Fingerprint = lm.fingerprint
        self.enabled = True

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def add(self, texts: str | Sequence[str], *, user_id: str | None = None,
            metadata: dict[str, Any] | None = None) -> Receipt:
        """Write knowledge into the memory."""

    @abstractmethod
    def delete(self, memory_id: str) -> Receipt:
        """Remove one stored item."""

    def search(self, query: str, *, k: int = 4, user_id: str | None = None) -> list[Hit]:
        raise NotImplementedError(f"memory kind {self.kind!r} does not support search")

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "enabled": self.enabled}

    # ------------------------------------------------------------------ the lifecycle
    def _unsupported(self, op: str, why: str = "") -> UnsupportedError:
        return UnsupportedError(f"memory kind {self.kind!r} does not support {op}" + (f": {why}" if why else ""))

    def items(self, *, user_id: str | None = None, limit: int = 100, offset: int = 0,
              source_id: str | None = None) -> list[dict[str, Any]]:
        """The user's stored items, oldest first: ``id``, ``text``, ``source_id``, ``chunk_index``, ``created``,
        ``metadata``; with ``source_id``, only the items of that source."""
        raise self._unsupported("items")

    def count(self, *, user_id: str | None = None) -> int:
        """How many items the user has stored."""
        raise self._unsupported("count")

    def get(self, memory_id: str, *, user_id: str | None = None) -> dict[str, Any] | None:
        """One of the user's items by id (as :meth:`items` gives it), or None; another user's id is None too."""
        raise self._unsupported("get")

    def update(self, memory_id: str, *, text: str | None = None, metadata: dict[str, Any] | None = None,
               user_id: str | None = None) -> Receipt:
        """Replace one of the user's items with a new text (encoded again) and/or metadata; the id stays."""
        raise self._unsupported("update")

    def history(self, memory_id: str, *, user_id: str | None = None) -> list[dict[str, Any]]:
        """The versions of one of the user's items (``op``: add, update, delete; ``time``), oldest first."""
        raise self._unsupported("history")

    def reset(self, user_id: str | None) -> Receipt:
        """Delete every item of one user."""
        raise self._unsupported("reset")

    def export(self, path: str | os.PathLike, *, user_id: str | None = None, force: bool = False) -> Receipt:
        """Write what the memory was built from (one user's items, or all) to ``path`` in the portable format."""
        raise self._unsupported("export")

    def import_file(self, path: str | os.PathLike) -> Receipt:
        """Encode the items of an export file (from any model) into this memory, all or nothing."""
        raise self._unsupported("import")

    @abstractmethod
    @contextmanager
    def _activate(self, *, user_id: str | None, query: str | None) -> Iterator[Injection]:
        """Register this kind's hooks (removed in finally) and yield an Injection."""

    @contextmanager
    def active(self, *, lm=None, user_id: str | None = None, query: str | None = None) -> Iterator[Injection]:
        """Read-time scope for one forward/generate call. Disabled memory yields an empty Injection."""
        if lm is not None and lm is not self.lm:
            self.fingerprint.check(lm.fingerprint)
        if not self.enabled:
            yield Injection()
            return
        with self._activate(user_id=user_id, query=query) as injection:
            yield injection

    @contextmanager
    def disabled(self) -> Iterator[Memory]:
        """Temporarily disable the memory (restored in finally)."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to persist; every key starts with ``param_prefix``."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise MemoryFormatError(f"{self.kind} memory has no tensors but the file holds {sorted(state)[:3]}")

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable state besides tensors (ids, texts, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @staticmethod
    def _texts(texts: str | Sequence[str]) -> list[str]:
        """Validate one text or a list of texts (each non-empty UTF-8 text)."""
        items = [texts] if isinstance(texts, (str, bytes)) else list(texts)
        if not items:
            raise InputError("no texts given")
        return [check_text(t, what=f"text {i}" if len(items) > 1 else "text") for i, t in enumerate(items)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the memory folder atomically (weights first, then the config with their checksum)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise InputError("no path given and the memory has none")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        bad = [k for k in state if not k.startswith(self.param_prefix)]
        if bad:
            raise RuntimeError(f"{self.kind}: tensor names must start with {self.param_prefix!r}: {bad}")
        weights = path / MEMORY_WEIGHTS_NAME
        _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "kind": self.kind}))
        cfg = {
            "format_version": FORMAT_VERSION, "kind": self.kind, "nativemem_version": __version__,
            "fingerprint": self.fingerprint.to_dict(), "config": self.config.to_dict(),
            "state": self.extra_state(), "weights_sha256": _sha256(weights), "saved": time.time(),
        }
        text = json.dumps(cfg, indent=2, sort_keys=True)
        _atomic_write(path / MEMORY_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        self.path = path
        return path

    @classmethod
    def open(cls, path: str | os.PathLike, lm) -> Memory:
        """Open a saved memory folder for ``lm``; checks the kind, format and model fingerprint."""
        path = Path(path)
        meta = read_memory_config(path)
        if meta["kind"] != cls.kind:
            raise MemoryFormatError(f"{path} holds a {meta['kind']!r} memory, not {cls.kind!r}")
        Fingerprint.from_dict(meta["fingerprint"]).check(lm.fingerprint)
        mem = cls(lm, cls.config_cls.from_dict(meta["config"]), path=path)
        weights = path / MEMORY_WEIGHTS_NAME
        if not weights.is_file():
            raise MemoryFormatError(f"{weights} is missing")
        if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
            raise MemoryFormatError(f"{weights} is corrupted (checksum differs from {MEMORY_CONFIG_NAME})")
        try:
            state = load_file(str(weights), device=str(lm.device))
        except Exception as e:
            raise MemoryFormatError(f"{weights} cannot be read: {e}") from e
        mem.load_state_dict(state)
        mem.load_extra_state(meta.get("state", {}))
        return mem


def read_memory_config(path: Path) -> dict[str, Any]:
    """Read and validate ``memory_config.json`` of a memory folder."""
    cfg_file = Path(path) / MEMORY_CONFIG_NAME
    if not cfg_file.is_file():
        raise MemoryFormatError(f"{path} is not a nativemem memory folder (no {MEMORY_CONFIG_NAME})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MemoryFormatError(f"{cfg_file} is corrupted: {e}") from e
    missing = [k for k in ("format_version", "kind", "fingerprint", "config") if k not in meta]
    if missing:
        raise MemoryFormatError(f"{cfg_file} lacks {missing}")
    if meta["format_version"] > FORMAT_VERSION:
        raise MemoryFormatError(f"{cfg_file} has format version {meta['format_version']}; this nativemem reads "
                                f"up to {FORMAT_VERSION}: upgrade nativemem")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class RecordLifecycle:
    """``items``, ``get``, ``reset``, ``export`` and ``import_file`` for kinds that keep one record per stored item
    (pkm: one per fact; side_ffn: one per add). A kind supplies :meth:`_records` (oldest first), :meth:`_item`
    (a record as the export format's item) and :meth:`_import` (train the items in, all or nothing).

    Users: the records say who added each item and these operations are per user, as for activation memory;
    what the model *answers* is not: these memories are trained into shared weights (a user's own parametric
    memory lives in a folder of its own, as the server's consolidated memories do).
    """

    def _records(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _item(self, rec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _import(self, items: list[dict[str, Any]]) -> Receipt:
        raise NotImplementedError

    @staticmethod
    def _owner(user_id: str | None) -> str:
        if user_id is not None and (not isinstance(user_id, str) or not user_id.strip()):
            raise InputError(f"user_id must be a non-empty string or None, got {user_id!r}")
        return user_id or ""

    def _mine(self, user_id: str | None) -> list[dict[str, Any]]:
        owner = self._owner(user_id)
        return [r for r in self._records() if (r.get("user_id") or "") == owner]

    def items(self, *, user_id: str | None = None, limit: int = 100, offset: int = 0,
              source_id: str | None = None) -> list[dict[str, Any]]:
        if limit < 1 or offset < 0:
            raise InputError(f"limit must be >= 1 and offset >= 0, got {limit} and {offset}")
        mine = [r for r in self._mine(user_id) if source_id is None or r.get("source_id") == source_id]
        return [self._item(r) for r in mine[offset: offset + limit]]

    def count(self, *, user_id: str | None = None) -> int:
        return len(self._mine(user_id))

    def get(self, memory_id: str, *, user_id: str | None = None) -> dict[str, Any] | None:
        rec = next((r for r in self._mine(user_id) if r["id"] == str(memory_id)), None)
        return self._item(rec) if rec is not None else None

    def reset(self, user_id: str | None) -> Receipt:
        start = time.perf_counter()
        ids = [r["id"] for r in self._mine(user_id)]
        for memory_id in ids:
            self.delete(memory_id)
        return Receipt(self.kind, "reset", ids=ids, elapsed_s=time.perf_counter() - start,
                       details={"user_id": self._owner(user_id)})

    def export(self, path: str | os.PathLike, *, user_id: str | None = None, force: bool = False) -> Receipt:
        from .export import write_export

        start = time.perf_counter()
        records = self._records() if user_id is None else self._mine(user_id)
        items = [self._item(r) for r in records]
        kept = [i for i in items if str(i.get("text") or "").strip()]
        n = write_export(path, kept, kind=self.kind, model=self.fingerprint.name, user_id=user_id, force=force)
        notes = [] if len(kept) == len(items) else [
            f"{len(items) - len(kept)} item(s) have no stored text (trained by streaming, not by add) and were "
            "left out"]
        return Receipt(self.kind, "export", ids=[i["id"] for i in kept], elapsed_s=time.perf_counter() - start,
                       notes=notes, details={"items": n, "path": str(path)})

    def import_file(self, path: str | os.PathLike) -> Receipt:
        from .export import read_export

        header, items = read_export(path)
        known = {r["id"] for r in self._records()}
        fresh = [i for i in items if str(i["id"]) not in known]
        start = time.perf_counter()
        receipt = self._import(fresh) if fresh else Receipt(self.kind, "import")
        receipt.op = "import"
        receipt.elapsed_s = time.perf_counter() - start
        receipt.details.update(imported=len(fresh), duplicates=len(items) - len(fresh), from_model=header.get("model"),
                               users=len({i.get("user_id") or "" for i in fresh}))
        return receipt


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- registry
def register_memory(cls: type[Memory] | None = None, *, replace: bool = False):
    """Register a Memory subclass under ``cls.kind`` (usable as a decorator)."""

    def _register(c: type[Memory]) -> type[Memory]:
        for attr in ("kind", "param_prefix"):
            if not getattr(c, attr, None):
                raise ValueError(f"{c.__name__} must set the class attribute {attr!r}")
        owner = _PREFIXES.get(c.param_prefix)
        if owner is not None and owner != c.kind and not replace:
            raise ValueError(f"param_prefix {c.param_prefix!r} is already used by kind {owner!r}")
        _KINDS.register(c.kind, c, replace=replace)
        _PREFIXES[c.param_prefix] = c.kind
        return c

    return _register(cls) if cls is not None else _register


def memory_kinds() -> list[str]:
    return _KINDS.names()


def get_memory_class(kind: str) -> type[Memory]:
    return _KINDS.get(kind)


def open_memory(path: str | os.PathLike, lm, kind: str | None = None, **config) -> Memory:
    """Open the memory folder at ``path``, or create a new memory of ``kind`` there.

    Raises:
        FingerprintMismatchError: the folder holds a memory built for another model.
        MemoryFormatError: the folder is corrupted, or holds another kind than ``kind``.
    """
    path = Path(path)
    if (path / MEMORY_CONFIG_NAME).is_file():
        meta = read_memory_config(path)
        if kind is not None and kind != meta["kind"]:
            raise MemoryFormatError(f"{path} holds a {meta['kind']!r} memory, not {kind!r}")
        if config:
            raise InputError(f"{path} already exists: its config is fixed, do not pass {sorted(config)}")
        return get_memory_class(meta["kind"]).open(path, lm)
    if kind is None:
        raise InputError(f"{path} is not a memory folder; pass kind= to create one ({', '.join(memory_kinds())})")
    cls = get_memory_class(kind)
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, n=1)) else repr(u)
                 for u in unknown]
        raise InputError(f"unknown {kind} option(s) {', '.join(hints)}; valid: {', '.join(sorted(known))}")
    mem = cls(lm, cls.config_cls(**config), path=path)
    mem.save(path)
    return mem


__all__ += ["read_memory_config", "FingerprintMismatchError"]
