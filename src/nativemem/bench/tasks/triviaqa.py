"""TriviaQA task, reading the official reading-comprehension (``rc``) release.

The question file is the official JSON (e.g. ``qa/wikipedia-dev.json``)::

    {"Data": [{"Question", "QuestionId",
               "Answer": {"Value", "Aliases", "NormalizedAliases", ...},
               "EntityPages": [{"Filename", "Title", ...}],
               "SearchResults": [{"Filename", "Title", ...}]}],
     "Domain", "Version", ...}

Evidence text files live in an ``evidence/`` folder: ``evidence/wikipedia/<Filename>`` for entity
pages and ``evidence/web/<Filename>`` for search results. The folder is looked for beside the JSON
file, then beside its parent (the official layout has ``qa/`` and ``evidence/`` side by side), or
given with the ``evidence_dir`` option.

- Accepted answers are ``Value`` plus all ``Aliases`` and ``NormalizedAliases``. Questions without an
  ``Answer`` (the unlabelled test split) are left out.
- Each evidence document is split into paragraphs (non-empty lines); consecutive short lines are
  merged and long ones cut so that a chunk has at most ``max_chunk_words`` words. Chunk ids are
  ``f"{folder}/{Filename}:{i}"``.
- The **pool** for a run holds all chunks of the evidence documents of the selected questions; the
  **source** of a question is all its evidence documents, in the order the file lists them.
- The release has no gold paragraph, so items have no gold chunk ids and no ``hit@k`` is scored.
- Evidence files are read lazily, only for the selected questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError
from . import Chunk, QAItem, Task, TaskData, register_task
from .squad import read_json

__all__ = ["TriviaQATask", "load_triviaqa", "split_paragraphs"]

_DOC_LISTS = (("EntityPages", "wikipedia"), ("SearchResults", "web"))


def split_paragraphs(text: str, max_words: int) -> list[str]:
    """Split a document into paragraph chunks of at most ``max_words`` words.

    Args:
        text: Document text (paragraphs separated by line breaks).
        max_words: Maximum words per chunk.

    Returns:
        Non-empty chunks in document order.
    """
    chunks: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        while len(words) > max_words:  # one very long paragraph: cut it into windows
            if current:
                chunks.append(" ".join(current))
                current = []
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        chunks.append(" ".join(current))
    return chunks


def load_triviaqa(path: Path) -> TaskData:
    """Read a TriviaQA rc question file (evidence is read later, see :class:`TriviaQATask`).

    Args:
        path: The JSON file.

    Returns:
        Items in file order (``meta["docs"]`` lists their evidence as ``(folder, Filename, Title)``);
        ``chunks`` is empty.

    Raises:
        DataError: If the file is missing, not JSON, or not in the TriviaQA rc format.
    """
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("Data"), list):
        raise DataError(f"{path}: expected a JSON object with a 'Data' list (TriviaQA rc format)")
    items: list[QAItem] = []
    seen: set[str] = set()
    skipped = 0
    for i, rec in enumerate(raw["Data"]):
        where = f"Data[{i}]"
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {where} should be an object, found {type(rec).__name__}")
        for key in ("Question", "QuestionId"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError(f"{path}: {where} has no {key!r} string")
        qid = rec["QuestionId"]
        if qid in seen:
            raise DataError(f"{path}: {where} repeats QuestionId {qid!r}")
        seen.add(qid)
        answer = rec.get("Answer")
        if answer is None:
            skipped += 1
            continue
        if not isinstance(answer, dict) or not isinstance(answer.get("Value"), str):
            raise DataError(f"{path}: {where}.Answer should be an object with a 'Value' string")
        answers: list[str] = []
        for alias in [answer["Value"], *answer.get("Aliases", []), *answer.get("NormalizedAliases", [])]:
            if not isinstance(alias, str):
                raise DataError(f"{path}: {where}.Answer has a non-string alias {alias!r}")
            if alias.strip() and alias not in answers:
                answers.append(alias)
        docs: list[tuple[str, str, str]] = []
        for key, folder in _DOC_LISTS:
            pages = rec.get(key) or []
            if not isinstance(pages, list):
                raise DataError(f"{path}: {where}.{key} should be a list")
            for j, page in enumerate(pages):
                if not isinstance(page, dict) or not isinstance(page.get("Filename"), str):
                    raise DataError(f"{path}: {where}.{key}[{j}] has no 'Filename' string")
                doc = (folder, page["Filename"], str(page.get("Title", "")))
                if doc not in docs:
                    docs.append(doc)
        if not docs:
            raise DataError(f"{path}: {where} lists no evidence (EntityPages or SearchResults)")
        items.append(QAItem(qid, rec["Question"].strip(), tuple(answers), meta={"docs": docs}))
    return TaskData(tuple(items), {}, skipped)


@register_task("triviaqa")
class TriviaQATask(Task):
    """TriviaQA rc: trivia questions answered from their Wikipedia / web evidence documents.

    Args:
        data: A TriviaQA rc JSON file (there is no default copy in this project's data folder).
        evidence_dir: Folder holding ``wikipedia/`` and ``web/``; found beside the file if None.
        max_chunk_words: Maximum words per pool chunk.
    """

    version = "1"
    default_path = "triviaqa/qa/wikipedia-dev.json"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        evidence_dir: str | Path | None = None,
        max_chunk_words: int = 150,
    ) -> None:
        super().__init__(data)
        if int(max_chunk_words) < 1:
            raise ValueError(f"max_chunk_words must be positive, got {max_chunk_words}")
        self.max_chunk_words = int(max_chunk_words)
        self._evidence_dir = Path(evidence_dir).expanduser() if evidence_dir is not None else None
        self._doc_chunks: dict[tuple[str, str], list[Chunk]] = {}

    def options(self) -> dict[str, Any]:
        """Options recorded in ``results.json``."""
        return {"evidence_dir": str(self.evidence_dir), "max_chunk_words": self.max_chunk_words}

    def load(self, path: Path) -> TaskData:
        """Read the question file (see :func:`load_triviaqa`)."""
        return load_triviaqa(path)

    @property
    def evidence_dir(self) -> Path:
        """The evidence folder (explicit, beside the file, or beside the file's folder)."""
        if self._evidence_dir is not None:
            return self._evidence_dir
        for candidate in (self.path.parent / "evidence", self.path.parent.parent / "evidence"):
            if candidate.is_dir():
                return candidate
        return self.path.parent / "evidence"

    def _chunks_of(self, folder: str, filename: str, title: str) -> list[Chunk]:
        key = (folder, filename)
        if key not in self._doc_chunks:
            file = self.evidence_dir / folder / filename
            try:
                text = file.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise DataError(f"{file}: evidence file not found (listed in {self.path})") from None
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{file}: cannot read evidence file ({e})") from None
            doc_id = f"{folder}/{filename}"
            parts = split_paragraphs(text, self.max_chunk_words)
            self._doc_chunks[key] = [Chunk(f"{doc_id}:{i}", p, title, doc_id) for i, p in enumerate(parts)]
        return self._doc_chunks[key]

    def source_of(self, item: QAItem) -> list[Chunk]:
        """All chunks of the item's evidence documents, in the order the file lists them."""
        return [c for doc in item.meta["docs"] for c in self._chunks_of(*doc)]

    def pool_for(self, items: Sequence[QAItem]) -> list[Chunk]:
        """All chunks of the selected items' evidence documents (each document once)."""
        pool: dict[str, Chunk] = {}
        for item in items:
            for chunk in self.source_of(item):
                pool.setdefault(chunk.id, chunk)
        return list(pool.values())
