"""SQuAD task: questions answered from Wikipedia paragraphs.

Reads the official SQuAD JSON schema
``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}``
(default ``squad/squad-v1.1-dev.json`` under the data root; pass ``data=PATH`` for your own file).

- Every question is an item; its ``answers`` are all reference texts (deduplicated, in order), and
  its gold chunk is the paragraph it was asked on.
- Chunk ids are ``f"{article_idx}:{para_idx}"`` (0-based, file order).
- The **pool** for a run holds every paragraph of every article that a selected question comes from,
  and each question is asked against that whole pool.
- The **source** of a question (``long_context`` arm) is its own article: all its paragraphs, in order.
- Questions without answers (SQuAD 2.0 unanswerable ones) cannot be scored and are left out; their
  count is ``TaskData.skipped``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import DataError
from . import Chunk, QAItem, Task, TaskData, register_task

__all__ = ["SquadTask", "load_squad", "read_json"]


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a :class:`DataError` naming the file.

    Args:
        path: File to read.

    Raises:
        DataError: If the file is missing, unreadable, not UTF-8 or not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None


def _expect(value: Any, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{path}: {where} should be a {names}, found {type(value).__name__}")
    return value


def _field(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if key not in obj:
        raise DataError(f"{path}: {where} has no {key!r} field (SQuAD format expected)")
    return _expect(obj[key], kind, path, f"{where}.{key}")


def load_squad(path: Path) -> TaskData:
    """Read a SQuAD-format JSON file.

    Args:
        path: The JSON file.

    Returns:
        Items in file order and all paragraphs as chunks.

    Raises:
        DataError: If the file is missing, not JSON, or not in SQuAD format (the message says where).
    """
    raw = _expect(read_json(path), dict, path, "the top level")
    articles = _field(raw, "data", list, path, "the top level")
    items: list[QAItem] = []
    chunks: dict[str, Chunk] = {}
    seen: set[str] = set()
    skipped = 0
    for a_idx, article in enumerate(articles):
        where = f"data[{a_idx}]"
        _expect(article, dict, path, where)
        title = str(_field(article, "title", (str, int, float), path, where)).replace("_", " ")
        paragraphs = _field(article, "paragraphs", list, path, where)
        source = tuple(f"{a_idx}:{p_idx}" for p_idx in range(len(paragraphs)))
        for p_idx, para in enumerate(paragraphs):
            p_where = f"{where}.paragraphs[{p_idx}]"
            _expect(para, dict, path, p_where)
            cid = source[p_idx]
            chunks[cid] = Chunk(cid, _field(para, "context", str, path, p_where), title, str(a_idx))
            for q_idx, qa in enumerate(_field(para, "qas", list, path, p_where)):
                q_where = f"{p_where}.qas[{q_idx}]"
                _expect(qa, dict, path, q_where)
                qid = str(_field(qa, "id", (str, int), path, q_where))
                question = _field(qa, "question", str, path, q_where).strip()
                answers = []
                for n_idx, ans in enumerate(_field(qa, "answers", list, path, q_where)):
                    text = _field(_expect(ans, dict, path, f"{q_where}.answers[{n_idx}]"), "text", str, path,
                                  f"{q_where}.answers[{n_idx}]")
                    if text.strip() and text not in answers:
                        answers.append(text)
                if qid in seen:
                    raise DataError(f"{path}: {q_where} repeats question id {qid!r}")
                seen.add(qid)
                if not answers or not question:
                    skipped += 1
                    continue
                items.append(QAItem(qid, question, tuple(answers), (cid,), source, {"title": title}))
    return TaskData(tuple(items), chunks, skipped)


@register_task("squad")
class SquadTask(Task):
    """SQuAD v1.1-style extractive QA, asked open-book against the paragraphs of the selected articles."""

    version = "1"
    default_path = "squad/squad-v1.1-dev.json"

    def load(self, path: Path) -> TaskData:
        """Read the SQuAD file (see :func:`load_squad`)."""
        return load_squad(path)
