"""LoCoMo long-dialogue QA: full context vs BM25 vs side-FFN memory vs LoRA, official F1 per category.

Data: ``locomo/locomo8.json`` (the official ``locomo10.json`` format). Each conversation's sessions are
put in date order and rendered as in the official evaluation, ``DATE: <date>`` / ``CONVERSATION:`` /
``<speaker> said, "<text>"`` (``[shares <caption>]`` for images), then cut on turn boundaries into
chunks of at most ``chunk_words`` words, each starting with its session's date header. A conversation
is one source document: ``full_context`` puts its chunks in the prompt (the oldest dropped until it
fits; truncation is recorded per item), ``rag_bm25`` retrieves ``k`` of them, ``side_ffn``/``lora``
train on them in order before the questions.

Questions follow the official rules: category 2 gets "Use DATE of CONVERSATION to answer with an
approximate date."; category 5 (adversarial, no gold answer) becomes a choice between the trap answer
and "Not mentioned in the conversation" in a per-item seeded order, and a bare letter answer is mapped
to its option. Scoring is :mod:`.locomo_metric` (stemmed token F1, category rules). The prompt itself
is the harness's shared prompt (:mod:`nativemem.bench.prompts`), identical for every arm.

The task gives the runner one group per conversation (:meth:`LocomoTask.groups`), so each arm is prepared on
its own conversation only (each memory or LoRA trained on it, BM25 indexing it); :func:`run_locomo` runs it
through :func:`~nativemem.bench.runner.run_benchmark` and writes ``results.json`` and ``items.jsonl`` with
``f1`` overall and ``f1_<category>`` per category, bootstrap intervals and paired comparisons.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from . import Chunk, QAItem, Task, TaskData, register_task
from .locomo_metric import CATEGORIES, NOT_MENTIONED, locomo_score, resolve_option

__all__ = ["LocomoTask", "load_locomo", "run_locomo", "DEFAULT_ARMS", "score_item"]

DEFAULT_ARMS = ("full_context", "rag_bm25", "side_ffn", "side_ffn_ctx", "lora")
VERSION = "1"
TEMPORAL_SUFFIX = " Use DATE of CONVERSATION to answer with an approximate date."


def _parse_date(text: str) -> datetime | None:
    for fmt in ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y"):
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            pass
    return None


def _turn_text(turn: dict) -> str:
    text = f"{turn['speaker']} said, \"{turn['text']}\""
    if turn.get("blip_caption"):
        text += f" [shares {turn['blip_caption']}]"
    return text


def _sessions(conv: dict, where: str) -> list[tuple[int, str, list[dict]]]:
    """(number, date, turns) of every non-empty session, in date order (session number on ties)."""
    out = []
    for key, turns in conv.items():
        if key.startswith("session_") and key[8:].isdigit() and isinstance(turns, list) and turns:
            n = int(key[8:])
            date = conv.get(f"session_{n}_date_time")
            if not isinstance(date, str):
                raise DataError(f"{where}: session_{n} has no session_{n}_date_time")
            out.append((n, date, turns))
    if not out:
        raise DataError(f"{where}: no sessions")
    return sorted(out, key=lambda s: (_parse_date(s[1]) or datetime.min, s[0]))


def load_locomo(path: Path, *, chunk_words: int = 200) -> TaskData:
    """Items and chunks of a LoCoMo file (see the module docstring).

    Raises:
        DataError: not JSON, or not the LoCoMo format (the message names the conversation and field).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable LoCoMo JSON file ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of conversations")
    items, chunks, skipped = [], {}, 0
    for ci, sample in enumerate(data):
        where = f"{path}: conversation {ci}"
        if not isinstance(sample, dict) or "conversation" not in sample or "qa" not in sample:
            raise DataError(f"{where}: needs 'conversation' and 'qa'")
        sid = str(sample.get("sample_id", f"conv-{ci}"))
        conv_chunks, dia_to_chunk = [], {}
        for n, date, turns in _sessions(sample["conversation"], where):
            header = f"DATE: {date}\nCONVERSATION:\n"
            part, words, parts = [], 0, []
            for turn in turns:
                text = _turn_text(turn)
                w = len(text.split())
                if part and words + w > chunk_words:
                    parts.append(part)
                    part, words = [], 0
                part.append((turn.get("dia_id"), text))
                words += w
            if part:
                parts.append(part)
            for pi, part in enumerate(parts):
                cid = f"{sid}:S{n}:{pi}"
                chunks[cid] = Chunk(cid, header + "\n".join(t for _, t in part), title=f"session {n}, {date}",
                                    doc_id=sid)
                conv_chunks.append(cid)
                for dia, _ in part:
                    dia_to_chunk[dia] = cid
        for qi, qa in enumerate(sample["qa"]):
            category = qa.get("category")
            if category not in CATEGORIES or "question" not in qa:
                skipped += 1
                continue
            iid = f"{sid}:q{qi}"
            meta = {"sample_id": sid, "category": category, "category_name": CATEGORIES[category],
                    "evidence": list(qa.get("evidence") or [])}
            question = str(qa["question"]).strip()
            if category == 5:
                trap = qa.get("adversarial_answer", qa.get("answer"))
                if trap is None:
                    skipped += 1
                    continue
                first_is_trap = random.Random(iid).random() < 0.5
                options = ({"a": str(trap), "b": NOT_MENTIONED} if first_is_trap
                           else {"a": NOT_MENTIONED, "b": str(trap)})
                question += f" Select the correct answer: (a) {options['a']} (b) {options['b']}."
                answers: tuple[str, ...] = (NOT_MENTIONED,)
                meta.update(options=options, adversarial_answer=str(trap))
            else:
                if qa.get("answer") is None:
                    skipped += 1
                    continue
                answers = (str(qa["answer"]),)
                if category == 2:
                    question += TEMPORAL_SUFFIX
            gold = tuple(dict.fromkeys(dia_to_chunk[d] for d in meta["evidence"] if d in dia_to_chunk))
            items.append(QAItem(iid, question, answers, gold_chunk_ids=gold, source_chunk_ids=tuple(conv_chunks),
                                meta=meta))
    return TaskData(tuple(items), chunks, skipped)


def score_item(prediction: str, item: QAItem) -> dict[str, float]:
    """Official LoCoMo score of one answer: ``f1`` and ``f1_<category>``."""
    category = item.meta["category"]
    if category == 5:
        prediction = resolve_option(prediction, item.meta["options"])
    s = locomo_score(prediction, item.answers[0], category)
    return {"f1": s, f"f1_{CATEGORIES[category]}": s}


@register_task("locomo")
class LocomoTask(Task):
    """LoCoMo QA items; a conversation is one source document and one group of the run.

    Args:
        data: a LoCoMo-format JSON file (default: the shared ``locomo8.json``).
        chunk_words: words per dialogue chunk.
        conversations: the first N conversations (file order); None for all. ``limit`` counts questions per
            conversation (the first N in seeded order).
    """

    version = VERSION
    default_path = "locomo/locomo8.json"
    retrieval_scope = "source"  # a question is asked about its own conversation
    metrics = ("f1",)

    def __init__(self, data: str | Path | None = None, *, chunk_words: int = 200,
                 conversations: int | None = None) -> None:
        super().__init__(data)
        if chunk_words < 10:
            raise InputError(f"chunk_words must be >= 10, got {chunk_words}")
        if conversations is not None and (not isinstance(conversations, int) or conversations < 1):
            raise InputError(f"conversations must be a positive integer, got {conversations!r}")
        self.chunk_words, self.conversations = chunk_words, conversations

    def load(self, path: Path) -> TaskData:
        return load_locomo(path, chunk_words=self.chunk_words)

    def options(self) -> dict[str, Any]:
        return {"chunk_words": self.chunk_words, "conversations": self.conversations}

    def select(self, limit: int | None, seed: int) -> list[QAItem]:
        """Per conversation (the first ``conversations``), its first ``limit`` questions in seeded order."""
        if limit is not None and limit < 1:
            raise InputError(f"limit must be a positive number of items, got {limit}")
        convs: dict[str, list[QAItem]] = {}
        for item in self.data.items:
            convs.setdefault(item.meta["sample_id"], []).append(item)
        out = []
        for sid in list(convs)[:self.conversations]:
            items = list(convs[sid])
            random.Random(seed).shuffle(items)
            out += items[:limit]
        return out

    def groups(self, items: Sequence[QAItem]) -> list[tuple[list[Chunk], list[QAItem]]]:
        """One group per conversation: its chunks in order, its questions."""
        convs: dict[str, list[QAItem]] = {}
        for item in items:
            convs.setdefault(item.meta["sample_id"], []).append(item)
        return [([self.data.chunks[cid] for cid in its[0].source_chunk_ids], its) for its in convs.values()]

    def score_answer(self, prediction: str, item: QAItem) -> dict[str, float]:
        return score_item(prediction, item)


def run_locomo(lm, *, arms: Sequence[str] = DEFAULT_ARMS, out: str | Path, data: str | Path | None = None,
               conversations: int | None = None, limit: int | None = None, seed: int = 0, k: int = 3,
               max_new_tokens: int = 32, max_prompt_tokens: int | None = None, chunk_words: int = 200,
               memory_config: dict[str, Any] | None = None, lora_config: dict[str, Any] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run LoCoMo conversation by conversation and write ``results.json`` + ``items.jsonl`` to ``out``.

    Args:
        lm: the LanguageModel.
        arms: registered arm names (default: full_context, rag_bm25, side_ffn, side_ffn_ctx, lora).
        out: output folder.
        data: a LoCoMo-format JSON file (default: the shared ``locomo8.json``).
        conversations: the first N conversations (file order); None for all.
        limit: questions per conversation (the first N in seeded order); None for all.
        seed: seed of the question order and of the bootstrap.
        k: chunks retrieved by retrieval arms.
        max_new_tokens: generation cap.
        max_prompt_tokens: cap on the prompt of context arms (default: the model's window); prompts
            are cut by dropping the oldest chunks, and every cut is recorded.
        chunk_words: words per dialogue chunk.
        memory_config: SideFFNConfig fields for side_ffn arms (and the windows/steps LoRA reuses).
        lora_config: rank, alpha, lr, target_modules for lora arms.
        progress: progress bars.
    """
    from ..runner import run_benchmark

    return run_benchmark("locomo", lm, arms=[arms] if isinstance(arms, str) else list(arms), limit=limit, out=out,
                         seed=seed, data=data, k=k, max_new_tokens=max_new_tokens, progress=progress,
                         arm_options={"max_prompt_tokens": max_prompt_tokens, "side_ffn": memory_config,
                                      "lora": lora_config},
                         chunk_words=chunk_words, conversations=conversations)
