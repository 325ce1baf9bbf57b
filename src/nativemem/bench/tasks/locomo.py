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

:func:`run_locomo` runs conversation by conversation (so each memory or LoRA is trained on its own
conversation only) and writes ``results.json`` and ``items.jsonl`` with ``f1`` overall and
``f1_<category>`` per category, bootstrap intervals and paired comparisons.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from ..stats import mean_or_none, means_with_ci, median_or_none, paired_comparisons
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
    """LoCoMo QA items; a conversation is one source document."""

    version = VERSION
    default_path = "locomo/locomo8.json"
    retrieval_scope = "source"  # a question is asked about its own conversation

    def __init__(self, data: str | Path | None = None, *, chunk_words: int = 200) -> None:
        super().__init__(data)
        if chunk_words < 10:
            raise InputError(f"chunk_words must be >= 10, got {chunk_words}")
        self.chunk_words = chunk_words

    def load(self, path: Path) -> TaskData:
        return load_locomo(path, chunk_words=self.chunk_words)

    def options(self) -> dict[str, Any]:
        return {"chunk_words": self.chunk_words}

    def score_answer(self, prediction: str, item: QAItem) -> dict[str, float]:
        """Per-item metrics in place of the SQuAD ones (for a runner that asks the task)."""
        return score_item(prediction, item)

    @classmethod
    def run(cls, lm, **kwargs) -> dict[str, Any]:
        return run_locomo(lm, **kwargs)


def _run_conversation(arm, name: str, sid: str, lm, pool, items, task, k: int, c: dict[str, Any],
                      scores: dict[str, dict[str, float] | None], progress: bool) -> list[dict[str, Any]]:
    """Prepare ``arm`` on one conversation and answer its questions; adds to its cost ``c`` and ``scores``,
    returns the item records."""
    from tqdm.auto import tqdm

    from ..metrics import hit_at_k

    t0 = time.perf_counter()
    arm.prepare(pool, lm, items=items, task=task)
    c["prepare_s"] += time.perf_counter() - t0
    c["extra_params"] = max(c["extra_params"], int(getattr(arm, "extra_params", 0)))
    c["train_steps"] += sum(r.get("steps", 0) for r in getattr(arm, "receipts", {}).values())
    c["notes"] += [f"{sid}: {n}" for r in getattr(arm, "receipts", {}).values() for n in r.get("notes", [])]
    records = []
    t0 = time.perf_counter()
    for item in tqdm(items, desc=f"locomo/{sid}/{name}", disable=not progress, leave=False):
        out_ = arm.answer(item)
        info = dict(getattr(arm, "last_info", {}) or {})
        s = None
        if not out_.skipped:
            s = score_item(out_.text, item)
            if arm.uses_retrieval and item.gold_chunk_ids:
                s[f"hit@{k}"] = hit_at_k([cid for cid, _ in out_.retrieved], item.gold_chunk_ids, k)
            c["ttft"].append(out_.ttft_s)
            c["prompt_tokens"].append(out_.prompt_tokens)
        if "context_truncated" in info:
            c["with_context"] += 1
            c["truncated"] += int(info["context_truncated"])
        scores[item.id] = s
        records.append({"arm": name, "item_id": item.id, "conversation": sid, "question": item.question,
                        "answers": item.answers, "category": item.meta["category"], "output": out_.text,
                        "raw_output": out_.raw_text, "skipped": out_.skipped, "skip_reason": out_.skip_reason,
                        "skip_detail": out_.skip_detail, "metrics": s, "ttft_s": out_.ttft_s,
                        "total_s": out_.total_s, "prompt_tokens": out_.prompt_tokens,
                        "retrieved": [cid for cid, _ in out_.retrieved],
                        "gold_chunk_ids": item.gold_chunk_ids, **info})
    c["answer_s"] += time.perf_counter() - t0
    c["bytes_stored"] += int(arm.bytes_stored())
    return records


def _summarise(scores: dict[str, dict[str, float] | None], c: dict[str, Any], seed: int) -> dict[str, Any]:
    """An arm's metrics with bootstrap intervals, per-category counts and costs."""
    from ..runner import peak_rss_bytes

    per_item = list(scores.values())
    metrics, ci95 = means_with_ci(scores, seed=seed)
    scored = [s for s in per_item if s is not None]
    skipped = len(per_item) - len(scored)
    return {
        "n": len(per_item), "scored": len(scored), "skipped": skipped,
        "skipped_reasons": {"context_overflow": skipped} if skipped else {},
        "metrics": metrics, "ci95": ci95,
        "n_per_category": {CATEGORIES[cat]: sum(1 for s in scored if f"f1_{CATEGORIES[cat]}" in s)
                           for cat in CATEGORIES},
        "cost": {"prepare_s": c["prepare_s"], "wall_s": c["prepare_s"] + c["answer_s"],
                 "ttft_median_s": median_or_none(c["ttft"]), "prompt_tokens_mean": mean_or_none(c["prompt_tokens"]),
                 "prompt_tokens_median": median_or_none(c["prompt_tokens"]), "peak_rss_bytes": peak_rss_bytes(),
                 "bytes_stored": c["bytes_stored"], "extra_params": c["extra_params"],
                 "train_steps": c["train_steps"], "context_truncated_items": c["truncated"],
                 "context_items": c["with_context"]},
        "notes": c["notes"],
    }


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
    from ..arms import get_arm
    from ..results import save_run

    arms = [arms] if isinstance(arms, str) else list(dict.fromkeys(arms))
    if not arms:
        raise InputError("at least one arm is needed")
    arm_classes = {a: get_arm(a) for a in arms}
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens), ("limit", limit),
                        ("conversations", conversations)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    task = LocomoTask(data, chunk_words=chunk_words)
    convs: dict[str, list[QAItem]] = {}
    for item in task.data.items:
        convs.setdefault(item.meta["sample_id"], []).append(item)
    selected = list(convs)[:conversations]
    records: list[dict[str, Any]] = []
    scores: dict[str, dict[str, dict[str, float] | None]] = {a: {} for a in arms}
    cost: dict[str, dict[str, Any]] = {a: {"prepare_s": 0.0, "answer_s": 0.0, "ttft": [], "prompt_tokens": [],
                                           "truncated": 0, "with_context": 0, "bytes_stored": 0, "extra_params": 0,
                                           "train_steps": 0, "notes": []} for a in arms}
    for sid in selected:
        items = list(convs[sid])
        random.Random(seed).shuffle(items)
        items = items[:limit]
        pool = [task.data.chunks[cid] for cid in items[0].source_chunk_ids]
        for name in arms:
            arm = arm_classes[name](k=k, max_new_tokens=max_new_tokens, progress=progress, options={
                "max_prompt_tokens": max_prompt_tokens, "side_ffn": memory_config, "lora": lora_config})
            records += _run_conversation(arm, name, sid, lm, pool, items, task, k, cost[name], scores[name], progress)
    arm_results = {name: _summarise(scores[name], cost[name], seed) for name in arms}
    comparisons = paired_comparisons({a: scores[a] for a in arms}, seed=seed,
                                     binary=lambda m: m == "f1_adversarial" or m.startswith("hit@"))
    config = {"arms": arms, "conversations": selected, "limit_per_conversation": limit, "k": k,
              "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "chunk_words": chunk_words,
              "data": str(task.path.resolve()), "memory_config": memory_config or {}, "lora_config": lora_config or {},
              "max_context": lm.max_context, "decoding": "greedy",
              "scoring": "official LoCoMo F1 (Porter-stemmed tokens, category rules)"}
    return save_run(out, lm, task="locomo", task_version=VERSION, n=len(scores[arms[0]]), seed=seed, config=config,
                    arms=arm_results, comparisons=comparisons, records=records)
