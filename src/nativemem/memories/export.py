"""The portable export format: what a memory was built from, with no model-bound tensors.

A JSON Lines file. The first line is a header ``{"format": "nativemem-export/1", "kind", "model", "exported",
"items", "user_id"}``; every further line is one item ``{"id", "user_id", "text", "source_id", "chunk_index",
"created", "seq", "metadata"}`` (``seq``: the position in its add), and, for items that are facts (pkm),
``"fact": {"prompt", "answer", "chat"}`` (``text`` then holds the fact as one sentence). Any memory for any model
can import it (:meth:`Memory.import_file`): the items are encoded again (texts) or trained again (facts) by the
importing model. ``nativemem export``, ``import`` and ``reencode`` use it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError

__all__ = ["EXPORT_FORMAT", "dumps_export", "write_export", "read_export", "loads_export"]

EXPORT_FORMAT = "nativemem-export/1"
_ITEM_FIELDS = {"id": str, "user_id": str, "text": str, "source_id": str, "chunk_index": int, "created": (int, float),
                "seq": int, "metadata": dict, "fact": dict}
_OPTIONAL = ("source_id", "metadata", "created", "chunk_index", "seq", "fact")


def dumps_export(items: Iterable[dict[str, Any]], *, kind: str, model: str, user_id: str | None) -> str:
    """The export file's text: the header line, then one line per item."""
    items = [{k: item.get(k) for k in _ITEM_FIELDS if k != "fact" or item.get(k) is not None} for item in items]
    header = {"format": EXPORT_FORMAT, "kind": kind, "model": model, "exported": time.time(), "items": len(items),
              "user_id": user_id}
    return "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in (header, *items))


def write_export(path: str | os.PathLike, items: Iterable[dict[str, Any]], *, kind: str, model: str,
                 user_id: str | None, force: bool = False) -> int:
    """Write items atomically (a temp file renamed into place); refuses an existing file unless ``force``.
    Returns the number of items."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; choose another file or pass force=True (--force)")
    from .base import _atomic_write

    text = dumps_export(items, kind=kind, model=model, user_id=user_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return text.count("\n") - 1


def read_export(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and items of an export file, every line checked before anything is returned.

    Raises:
        DataError: unreadable file, another or newer format, or a malformed line (its number is named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the export file ({e})") from None
    return loads_export(text, where=str(path))


def loads_export(text: str, *, where: str = "export") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`read_export` of a text already read (``where`` names it in errors)."""
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{where}: empty file, not a nativemem export")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    fmt = header.get("format") if isinstance(header, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("nativemem-export/"):
        raise DataError(f"{where}: line 1 is not a nativemem export header")
    if fmt != EXPORT_FORMAT:
        raise DataError(f"{where}: format {fmt!r} is not {EXPORT_FORMAT!r} (written by a newer nativemem?); "
                        "upgrade nativemem to import it")
    items = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: line {n} is not JSON ({e})") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: line {n} is not a JSON object")
        for key, typ in _ITEM_FIELDS.items():
            value = item.get(key)
            if key in _OPTIONAL and value is None:
                continue
            if not isinstance(value, typ) or isinstance(value, bool):
                raise DataError(f"{where}: line {n}: field {key!r} should be {getattr(typ, '__name__', 'a number')}, "
                                f"got {type(value).__name__}")
        if not item["text"].strip():
            raise DataError(f"{where}: line {n}: empty text")
        fact = item.get("fact")
        if fact is not None and not (isinstance(fact.get("prompt"), str) and isinstance(fact.get("answer"), str)
                                     and fact["answer"].strip()):
            raise DataError(f"{where}: line {n}: a fact needs a string prompt and a non-empty answer")
        items.append(item)
    if isinstance(header.get("items"), int) and header["items"] != len(items):
        raise DataError(f"{where}: the header says {header['items']} items but the file has {len(items)} "
                        "(truncated?)")
    return header, items
