"""MMLU forgetting check: accuracy before and after memorising a whole book (side-FFN vs LoRA).

Protocol: a fixed seeded subset of the MMLU test set
(``per_subject`` questions from every subject, chosen with ``random.Random(seed)``), 5-shot with the
subject's first five dev questions, in the usual layout::

    The following are multiple choice questions (with answers) about <subject>.

    <question>
    A. <choice 0>
    ...
    Answer: <letter>

The answer is the letter among `` A``/`` B``/`` C``/`` D`` with the highest next-token logit after the
final ``Answer:`` (no generation). When a prompt would not fit the window, shots are dropped from the
front and the number of shots is recorded per item.

Arms: ``none`` (the bare model), ``side_ffn`` and ``lora``, each after learning a whole book as the task's one
document (memorize, then the same score-then-train streaming loop as PG-19), or loaded from the states a
PG-19 run saved with ``save_dir``. The runner drives it (:class:`MMLUTask` asks each arm's model for the
letters' log-probabilities instead of generating). Reported: accuracy per arm with a bootstrap interval,
every pair of arms as a paired difference (McNemar p, paired bootstrap interval; against ``none`` it is the
drift), and the mean log-probability of the correct letter (a continuous, more sensitive drift measure).
"""

from __future__ import annotations

import copy
import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import DataError, InputError
from . import Chunk, QAItem, Task, TaskData, register_task

__all__ = ["MMLUItem", "MMLUTask", "load_mmlu", "select_items", "build_prompt", "run_mmlu", "read_mmlu_csv",
           "MMLU_ARMS"]

MMLU_ARMS = ("none", "side_ffn", "lora")
LETTERS = ("A", "B", "C", "D")
VERSION = "1"
DEFAULT_PATH = "mmlu"


@dataclass(frozen=True)
class MMLUItem:
    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-3


def read_mmlu_csv(path: Path) -> list[MMLUItem]:
    """The questions of one MMLU CSV (``question,choice0..choice3,answer``; subject = the file name before its last ``_``)."""
    subject = path.stem.rsplit("_", 1)[0]
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable MMLU CSV ({e})") from None
    for i, row in enumerate(rows):
        try:
            choices = tuple(str(row[f"choice{j}"]) for j in range(4))
            answer = int(row["answer"])
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{path}: row {i + 2} lacks question,choice0..choice3,answer (answer 0-3)") from None
        if not 0 <= answer <= 3:
            raise DataError(f"{path}: row {i + 2} has answer {answer}, expected 0-3")
        items.append(MMLUItem(f"{subject}:{i}", subject, str(row["question"]), choices, answer))
    return items


def load_mmlu(path: str | Path) -> tuple[dict[str, list[MMLUItem]], dict[str, list[MMLUItem]]]:
    """(dev, test) items per subject from ``path/dev/*_dev.csv`` and ``path/test/*_test.csv``.

    Raises:
        DataError: missing folders, no test subject with dev examples, or malformed rows.
    """
    path = Path(path)
    if not (path / "dev").is_dir() or not (path / "test").is_dir():
        raise DataError(f"{path}: expected MMLU folders dev/ and test/ with <subject>_dev.csv / <subject>_test.csv")
    dev = {p.stem.rsplit("_", 1)[0]: read_mmlu_csv(p) for p in sorted((path / "dev").glob("*_dev.csv"))}
    test = {p.stem.rsplit("_", 1)[0]: read_mmlu_csv(p) for p in sorted((path / "test").glob("*_test.csv"))}
    test = {s: items for s, items in test.items() if s in dev and items}
    if not test:
        raise DataError(f"{path}: no subject has both dev and test questions")
    return dev, test


def select_items(test: dict[str, list[MMLUItem]], per_subject: int, seed: int) -> list[MMLUItem]:
    """``per_subject`` questions of every subject, chosen with ``random.Random(seed)`` (a fixed subset)."""
    if per_subject < 1:
        raise InputError(f"per_subject must be >= 1, got {per_subject}")
    rng = random.Random(seed)
    out = []
    for subject in sorted(test):
        items = list(test[subject])
        rng.shuffle(items)
        out += items[:per_subject]
    return out


def _format(item: MMLUItem, with_answer: bool) -> str:
    lines = [item.question.strip(), *(f"{L}. {c}" for L, c in zip(LETTERS, item.choices))]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[item.answer]}\n\n" if with_answer else "")


def build_prompt(item: MMLUItem, shots: Sequence[MMLUItem]) -> tuple[str, str]:
    """(few-shot prefix, question part) of the 5-shot prompt."""
    head = f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"
    return head + "".join(_format(s, True) for s in shots), _format(item, False)


# ---------------------------------------------------------------------- scoring
class _Scorer:
    """Letter logits for prompts, reusing the few-shot prefix's KV cache when the tokens allow it."""

    def __init__(self, lm):
        self.lm = lm
        tok = lm.tokenizer
        self.letter_ids = []
        for L in LETTERS:
            ids = tok(f" {L}", add_special_tokens=False)["input_ids"]
            self.letter_ids.append(ids[-1])
        self._prefix: tuple[list[int], Any] | None = None

    def reset(self) -> None:
        self._prefix = None

    @torch.inference_mode()
    def letter_logprobs(self, prefix: str, question: str) -> torch.Tensor:
        """log-softmax over the four letters' next-token logits, (4,)."""
        tok, model = self.lm.tokenizer, self.lm.model
        full = tok(prefix + question)["input_ids"]
        pre = tok(prefix)["input_ids"]
        device = self.lm.device
        if full[: len(pre)] == pre and len(pre) < len(full):
            if self._prefix is None or self._prefix[0] != pre:
                out = model(input_ids=torch.tensor([pre], device=device), use_cache=True)
                self._prefix = (pre, out.past_key_values)
            cache = copy.deepcopy(self._prefix[1])
            logits = model(input_ids=torch.tensor([full[len(pre):]], device=device), past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[0, -1]
        else:
            logits = model(input_ids=torch.tensor([full], device=device), logits_to_keep=1).logits[0, -1]
        return torch.log_softmax(logits.float()[self.letter_ids], dim=-1).cpu()


@register_task("mmlu")
class MMLUTask(Task):
    """MMLU through the runner: the fixed seeded subset, 5-shot, answered by the best of the four letters' logits.

    The arms' pool is the ``book`` (one document) when one is given: ``side_ffn`` and ``lora`` learn it as they
    learn any document (memorize, then the streaming loop), or ask with a saved state (their ``side_ffn_memory``
    and ``lora_state`` options); ``none`` is the bare model. Metrics: ``accuracy`` and ``logprob_correct`` (the
    log-probability of the right letter among the four, a finer measure of drift). The shots a prompt kept are
    recorded per item.

    Args:
        data: an MMLU folder with ``dev/`` and ``test/`` (default: the shared one).
        per_subject: test questions per subject in the fixed subset.
        shots: dev examples per prompt, dropped from the front while a prompt does not fit.
        book: a text file (or a :class:`~.pg19.Book`) the memory arms learn.
    """

    version = VERSION
    default_path = DEFAULT_PATH
    metrics = ("accuracy", "logprob_correct")

    def __init__(self, data: str | Path | None = None, *, per_subject: int = 2, shots: int = 5,
                 book: str | Path | Any | None = None) -> None:
        super().__init__(data)
        if per_subject < 1 or shots < 0:
            raise InputError(f"per_subject must be >= 1 and shots >= 0, got {per_subject} and {shots}")
        self.per_subject, self.shots, self.book = per_subject, shots, book
        self._scorer: tuple[Any, _Scorer] | None = None

    def options(self) -> dict[str, Any]:
        book = getattr(self.book, "id", self.book)
        return {"per_subject": self.per_subject, "shots": self.shots, "book": None if book is None else str(book)}

    def load(self, path: Path) -> TaskData:
        from .pg19 import Book, load_books

        self.dev, self.test = load_mmlu(path)
        chunks: dict[str, Chunk] = {}
        if self.book is not None:
            books = [self.book] if isinstance(self.book, Book) else load_books(self.book)
            if len(books) != 1:
                raise InputError(f"book= must name one text file, got {len(books)} books")
            chunks["book"] = Chunk("book", books[0].text, title=books[0].title, doc_id=books[0].id)
        self.questions = {q.id: q for qs in self.test.values() for q in qs}
        items = tuple(QAItem(q.id, q.question, (LETTERS[q.answer],), source_chunk_ids=tuple(chunks),
                             meta={"subject": q.subject, "answer": q.answer}) for q in self.questions.values())
        return TaskData(items, chunks)

    def select(self, limit: int | None, seed: int) -> list[QAItem]:
        if limit is not None and limit < 1:
            raise InputError(f"limit must be a positive number of items, got {limit}")
        by_id = {item.id: item for item in self.data.items}
        return [by_id[q.id] for q in select_items(self.test, self.per_subject, seed)[:limit]]

    def ask(self, arm, item: QAItem):
        from contextlib import nullcontext

        from ..arms import SKIP_CONTEXT_OVERFLOW, ArmOutput

        lm, question_item = arm.lm, self.questions[item.id]
        used = self.dev[question_item.subject][: self.shots]
        while True:  # drop shots from the front until the prompt fits (recorded)
            prefix, question = build_prompt(question_item, used)
            n = len(lm.tokenizer(prefix + question)["input_ids"])
            if n <= lm.max_context or not used:
                break
            used = used[1:]
        arm.last_info = {"shots": len(used)}
        if n > lm.max_context:
            return ArmOutput(prompt_tokens=n, skip_reason=SKIP_CONTEXT_OVERFLOW,
                             skip_detail=f"{n} prompt tokens > window of {lm.max_context} tokens")
        if self._scorer is None or self._scorer[0] is not arm:  # a prefix cache per arm: each has its own model
            self._scorer = (arm, _Scorer(lm))
        with arm.scoring(item) as memory, memory.active(lm=lm) if memory is not None else nullcontext():
            lp = self._scorer[1].letter_logprobs(prefix, question)
        letter = LETTERS[int(lp.argmax())]
        return ArmOutput(text=letter, raw_text=letter, prompt_tokens=n,
                         scores={"logprob_correct": float(lp[question_item.answer])})

    def score_answer(self, prediction: str, item: QAItem) -> dict[str, float]:
        return {"accuracy": float(prediction == item.answers[0])}


def _book(lm, path: str | Path, max_tokens: int | None):
    """The one book at ``path``, cut after its first ``max_tokens`` tokens when set."""
    import dataclasses

    from .pg19 import load_books

    books = load_books(path)
    if len(books) != 1:
        raise InputError(f"book= must name one text file, got {len(books)} books")
    book = books[0]
    if max_tokens:
        offsets = lm.tokenizer(book.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > max_tokens:
            book = dataclasses.replace(book, text=book.text[: offsets[max_tokens][0]])
    return book


def run_mmlu(lm, *, arms: Sequence[str] = MMLU_ARMS, out: str | Path, data: str | Path | None = None,
             per_subject: int = 2, shots: int = 5, seed: int = 0, book: str | Path | None = None,
             side_ffn_memory: str | Path | None = None, lora_state: str | Path | None = None,
             book_max_tokens: int | None = None, window: int = 512, context: int = 512, steps: int = 1,
             width: int = 12, lr: float = 1e-2, lora_rank: int = 8, lora_lr: float = 1e-3,
             limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy before/after memorising a book, through the runner (:class:`MMLUTask`); writes ``results.json``
    and ``items.jsonl`` to ``out``.

    Args:
        lm: the LanguageModel.
        arms: ``none`` plus any of ``side_ffn``, ``lora``.
        out: output folder.
        data: an MMLU folder with ``dev/`` and ``test/`` (default: the shared one).
        per_subject: test questions per subject in the fixed seeded subset.
        shots: dev examples per prompt (5).
        seed: subset seed (also the bootstrap seed and the memories' seed).
        book: the text (a Gutenberg file is cut at its markers) side_ffn and lora learn.
        side_ffn_memory: a saved side_ffn memory folder to use instead of training on ``book``.
        lora_state: a folder written by :func:`~..lora.save_lora_state` to use instead of training.
        book_max_tokens: learn only the first N tokens of the book (None: the whole book).
        window, context, steps, width, lr, lora_rank, lora_lr: the streaming options (as in pg19).
        limit: keep only the first N items of the subset (quick runs).
        progress: progress bars.
    """
    from ..runner import run_benchmark

    arms = [arms] if isinstance(arms, str) else list(dict.fromkeys(arms))
    bad = [a for a in arms if a not in MMLU_ARMS]
    if bad or not arms:
        raise InputError(f"unknown mmlu arms {bad}; use {', '.join(MMLU_ARMS)}")
    saved = {"side_ffn": side_ffn_memory, "lora": lora_state}
    if book is None and any(a != "none" and saved[a] is None for a in arms):
        raise InputError("side_ffn and lora arms need book=PATH (a text to memorise) or saved states")
    options: dict[str, Any] = {
        "side_ffn": {"width": width, "lr": lr, "window": window, "context": context, "steps_per_window": steps,
                     "memorize_tokens": window + 1, "seed": seed},
        "lora": {"rank": lora_rank, "lr": lora_lr, "seed": seed}}
    options.update({f"{a}_{'memory' if a == 'side_ffn' else 'state'}": str(p) for a, p in saved.items() if p})
    return run_benchmark("mmlu", lm, arms=arms, limit=limit, out=out, seed=seed, data=data, progress=progress,
                         arm_options=options, per_subject=per_subject, shots=shots,
                         book=_book(lm, book, book_max_tokens) if book is not None else None)
