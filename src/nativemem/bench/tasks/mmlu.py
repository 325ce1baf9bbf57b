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

Arms: ``none`` (the bare model), ``side_ffn`` and ``lora``, each after streaming a whole book through
the same score-then-train loop (or loaded from the states a PG-19 run saved with ``save_dir``).
Reported: accuracy per arm with a bootstrap interval, the drift of each arm against ``none`` as a
paired difference (McNemar p, paired bootstrap interval), and the mean log-probability of the correct
letter (a continuous, more sensitive drift measure).
"""

from __future__ import annotations

import copy
import csv
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import DataError, InputError
from . import data_root

__all__ = ["MMLUItem", "load_mmlu", "select_items", "build_prompt", "run_mmlu", "read_mmlu_csv", "MMLU_ARMS"]

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


def _evaluate(lm, items: Sequence[MMLUItem], dev: dict[str, list[MMLUItem]], shots: int, memory, progress: bool,
              desc: str) -> list[dict[str, Any]]:
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    scorer = _Scorer(lm)
    out = []
    scope = memory.active(lm=lm) if memory is not None else nullcontext()
    with scope:
        for item in tqdm(sorted(items, key=lambda i: i.subject), desc=desc, disable=not progress, leave=False):
            used = dev[item.subject][:shots]
            while True:  # drop shots from the front until the prompt fits (recorded)
                prefix, question = build_prompt(item, used)
                n = len(lm.tokenizer(prefix + question)["input_ids"])
                if n <= lm.max_context or not used:
                    break
                used = used[1:]
            if n > lm.max_context:
                out.append({"id": item.id, "subject": item.subject, "skipped": True, "prompt_tokens": n})
                continue
            lp = scorer.letter_logprobs(prefix, question)
            pred = int(lp.argmax())
            out.append({"id": item.id, "subject": item.subject, "answer": item.answer, "prediction": pred,
                        "correct": float(pred == item.answer), "logprob_correct": float(lp[item.answer]),
                        "shots": len(used), "prompt_tokens": n, "skipped": False})
    return out


# ---------------------------------------------------------------------- memorising the book
def _book_ids(lm, book: str | Path | None, max_tokens: int | None) -> list[int]:
    from .pg19 import load_books

    if book is None:
        raise InputError("side_ffn and lora arms need book=PATH (a text to memorise) or saved states")
    books = load_books(book)
    if len(books) != 1:
        raise InputError(f"book= must name one text file, got {len(books)} books")
    ids = lm.tokenizer(books[0].text, add_special_tokens=False)["input_ids"]
    if lm.tokenizer.bos_token_id is not None:
        ids = [lm.tokenizer.bos_token_id, *ids]
    return ids[: max_tokens + 1] if max_tokens else ids


def run_mmlu(lm, *, arms: Sequence[str] = MMLU_ARMS, out: str | Path, data: str | Path | None = None,
             per_subject: int = 2, shots: int = 5, seed: int = 0, book: str | Path | None = None,
             side_ffn_memory: str | Path | None = None, lora_state: str | Path | None = None,
             book_max_tokens: int | None = None, window: int = 512, context: int = 512, steps: int = 1,
             width: int = 12, lr: float = 1e-2, lora_rank: int = 8, lora_lr: float = 1e-3,
             limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy before/after memorising a book; writes ``results.json`` and ``items.jsonl`` to ``out``.

    Args:
        lm: the LanguageModel.
        arms: ``none`` plus any of ``side_ffn``, ``lora``.
        out: output folder.
        data: an MMLU folder with ``dev/`` and ``test/`` (default: the shared one).
        per_subject: test questions per subject in the fixed seeded subset.
        shots: dev examples per prompt (5).
        seed: subset seed (also the bootstrap seed).
        book: the text (a Gutenberg file is cut at its markers) streamed into side_ffn and lora.
        side_ffn_memory: a saved side_ffn memory folder to use instead of training on ``book``.
        lora_state: a folder written by :func:`save_lora_state` to use instead of training.
        book_max_tokens: stream only the first N tokens of the book (None: the whole book).
        window, context, steps, width, lr, lora_rank, lora_lr: the streaming options (as in pg19).
        limit: keep only the first N items of the subset (quick runs).
        progress: progress bars.
    """
    from ...memories import open_memory
    from ..lora import LoRABaseline, load_lora_state
    from ..streaming import stream_trained
    arms = [arms] if isinstance(arms, str) else list(dict.fromkeys(arms))
    bad = [a for a in arms if a not in MMLU_ARMS]
    if bad or not arms:
        raise InputError(f"unknown mmlu arms {bad}; use {', '.join(MMLU_ARMS)}")
    path = Path(data) if data is not None else data_root() / DEFAULT_PATH
    dev, test = load_mmlu(path)
    items = select_items(test, per_subject, seed)[:limit]
    per_arm: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, dict[str, Any]] = {}
    ids = None
    stream_opts = {"window": window, "context": context, "steps": steps}
    base_params = sum(p.numel() for p in lm.model.parameters())
    for arm in arms:
        t0, cpu0 = time.perf_counter(), time.process_time()
        block: dict[str, Any] = {}
        if arm == "none":
            per_arm[arm] = _evaluate(lm, items, dev, shots, None, progress, "mmlu/none")
        elif arm == "side_ffn" and side_ffn_memory is not None:
            mem = open_memory(side_ffn_memory, lm)
            st = mem.stats()
            block.update(source=str(side_ffn_memory), book_tokens=st["tokens_trained"], steps=st["steps"],
                         extra_params=mem.num_parameters)
            per_arm[arm] = _evaluate(lm, items, dev, shots, mem, progress, "mmlu/side_ffn")
        elif arm == "lora" and lora_state is not None:
            meta, state = load_lora_state(lm, lora_state)
            with LoRABaseline(lm, rank=meta["rank"], alpha=meta["alpha"], target_modules=meta["target_modules"],
                              seed=meta.get("seed", 0)) as lora:
                lora.restore(state)
                block.update(source=str(lora_state), extra_params=lora.num_parameters)
                per_arm[arm] = _evaluate(lm, items, dev, shots, None, progress, "mmlu/lora")
        else:  # learn the book as pg19 streams it, then ask
            ids = ids or _book_ids(lm, book, book_max_tokens)
            with stream_trained(arm, lm, ids, stream=stream_opts, lr=lr, lora_lr=lora_lr, seed=seed,
                                side_ffn={"width": width}, lora={"rank": lora_rank}, source=str(book)) as done:
                res = done.result
                block.update(source=str(book), book_tokens=res.tokens, book_ppl=res.ppl, steps=res.steps,
                             stopped=res.stopped, train_cpu_s=time.process_time() - cpu0,
                             extra_params=done.parameters)
                per_arm[arm] = _evaluate(lm, items, dev, shots, done.memory, progress, f"mmlu/{arm}")
        block.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0)
        block["extra_params_pct"] = 100.0 * block.get("extra_params", 0) / base_params
        info[arm] = block
    return _write(lm, arms, items, per_arm, info, out, path, seed, per_subject, shots, stream_opts)


def _write(lm, arms, items, per_arm, info, out, path, seed, per_subject, shots, opts) -> dict[str, Any]:
    from ..results import save_run
    from ..stats import means_with_ci, paired_comparisons

    arm_blocks, records = {}, []
    scores = {a: {r["id"]: None if r["skipped"] else {"accuracy": r["correct"], "logprob_correct": r["logprob_correct"]}
                  for r in per_arm[a]} for a in arms}
    for a in arms:
        skipped = sum(1 for r in per_arm[a] if r["skipped"])
        metrics, ci95 = means_with_ci(scores[a], seed=seed, metrics=("accuracy", "logprob_correct"))
        arm_blocks[a] = {
            "n": len(per_arm[a]), "scored": len(per_arm[a]) - skipped, "skipped": skipped,
            "skipped_reasons": {"context_overflow": skipped} if skipped else {}, "metrics": metrics, "ci95": ci95,
            "cost": {k: v for k, v in info[a].items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "memory": info[a],
        }
        records += [{"arm": a, **r} for r in per_arm[a]]
    comparisons = paired_comparisons(scores, pairs=[(a, "none") for a in arms if a != "none" and "none" in arms],
                                     binary=lambda m: m == "accuracy", seed=seed, metrics=("accuracy", "logprob_correct"))
    drift = {c["a"]: {"points": 100 * c["diff"], "ci95_points": [100 * x for x in c["ci95"]] if c["ci95"] else None,
                      "p_value": c["p_value"]} for c in comparisons if c["metric"] == "accuracy"}
    config = {"arms": list(arms), "data": str(Path(path).resolve()), "per_subject": per_subject, "shots": shots,
              "subjects": len({i.subject for i in items}), "window": opts["window"], "context": opts["context"],
              "steps": opts["steps"], "answer_by": "argmax of the next-token logits of ' A', ' B', ' C', ' D'"}
    return save_run(out, lm, task="mmlu", task_version=VERSION, n=len(items), seed=seed, config=config,
                    arms=arm_blocks, comparisons=comparisons, records=records, drift_vs_none=drift)
