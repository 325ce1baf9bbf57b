"""Every benchmark by name: what it scores, which arms it knows, and the one call that runs it.

``nativemem bench TASK`` and :func:`run_task` go through this table, so every task is listed by
``nativemem bench --list`` and runs the same way. A task is one of two shapes:

- a **QA task** (``driver`` is None): a :class:`~.tasks.Task` reads items and a chunk pool, and
  :func:`~.runner.run_benchmark` asks every arm of the :mod:`.arms` registry and scores the generated answers;
- a **driven task**: a function ``run_x(lm, *, arms, out, ...)`` in the task's module: either a thin wrapper
  that maps the task's own options onto the runner (LoCoMo; MMLU, whose task asks each arm's model for option
  log-likelihoods), or its own loop for what the runner cannot score (a perplexity stream scored before
  training, a ranking, facts trained into the model and checked for drift, timings). Either writes
  ``results.json`` with an ``arms`` block like the runner's.

Entries name their modules as strings: listing the tasks imports none of them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UnknownNameError

__all__ = ["SCORES", "TaskEntry", "TASKS", "task_entry", "task_arms", "check_task", "run_task", "QA_DEFAULT_ARMS"]

SCORES = {
    "answers": "generated answers against their references (exact match, F1, contains)",
    "loglik": "log-likelihood of answer options (accuracy, agreement with the bare model)",
    "perplexity": "perplexity of a token stream, each window scored before it is learnt",
    "ranking": "a retrieval ranking against judgements (nDCG@10, Recall@100)",
    "cost": "time, tokens and bytes (throughput, TTFT, storage), no quality score",
}
"""What a task can score, in the words ``nativemem bench --list`` prints."""

QA_DEFAULT_ARMS = ("none", "rag_bm25")


@dataclass(frozen=True)
class TaskEntry:
    """One benchmark task.

    Attributes:
        name: what ``nativemem bench NAME`` takes.
        scores: a key of :data:`SCORES`.
        summary: one line for ``--list``.
        driver: ``"module:function"`` of a driven task; None for a QA task (runs through ``run_benchmark``).
        arms: the arms a driven task knows (its function's ``arms`` default is what runs when none are named);
            None for a QA task (every arm of the registry).
    """

    name: str
    scores: str
    summary: str
    driver: str | None = None
    arms: tuple[str, ...] | None = None

    def function(self) -> Callable[..., dict[str, Any]]:
        module, _, attr = self.driver.partition(":")
        return getattr(importlib.import_module(f"nativemem.bench.{module}"), attr)


TASKS: dict[str, TaskEntry] = {e.name: e for e in (
    TaskEntry("squad", "answers", "SQuAD v2 answerable questions over their articles' paragraphs"),
    TaskEntry("triviaqa", "answers", "TriviaQA questions over their evidence documents"),
    TaskEntry("needle", "answers", "a needle sentence hidden at several depths of essays of several lengths"),
    TaskEntry("locomo", "answers", "LoCoMo long-dialogue QA, official F1 per category",
              "tasks.locomo:run_locomo", ("full_context", "rag_bm25", "side_ffn", "side_ffn_ctx", "lora", "lora_ctx")),
    TaskEntry("facts", "answers", "synthetic facts trained in: recall, held-out paraphrases, reverse, drift",
              "tasks.facts:run_facts_benchmark", ("none", "pkm", "pkm_gated", "side_ffn", "lora", "rag_bm25")),
    TaskEntry("relevance", "answers", "answerable and unanswerable questions mixed: is memory injected only "
              "when it helps", "relevance:run_relevance",
              ("none", "activation", "activation_gated", "rag_bm25", "rag_bm25_gated")),
    TaskEntry("conversation", "answers", "facts stated in one chat, asked in a new one",
              "conversation:run_conversation", ()),
    TaskEntry("mmlu", "loglik", "MMLU accuracy before and after memorising a book (forgetting)",
              "tasks.mmlu:run_mmlu", ("none", "side_ffn", "lora")),
    TaskEntry("pg19", "perplexity", "PG-19 whole books streamed: window only vs test-time training",
              "tasks.pg19:run_pg19", ("window_only", "side_ffn", "lora")),
    TaskEntry("scifact", "ranking", "BEIR SciFact retrieval: BM25, MiniLM and the model's own states",
              "tasks.scifact:run_scifact", ("bm25", "minilm", "pooled", "tokens", "hybrid", "hybrid_tokens")),
    TaskEntry("write", "cost", "activation memory write throughput against a plain forward pass",
              "write_speed:run_write", ()),
    TaskEntry("scale", "cost", "activation memory cost at one model shape: bytes, search, TTFT per tier",
              "scale:run_scale", ()),
    TaskEntry("boundary", "cost", "what encoding chunks apart costs at k > 1, and what recomputing buys back",
              "boundary:run_boundary", ()),
)}


def task_entry(name: str) -> TaskEntry:
    """The entry of task ``name``.

    Raises:
        UnknownNameError: no such task (the message suggests the closest name).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError(name, "task", TASKS) from None


def task_arms(name: str) -> list[str]:
    """The arms task ``name`` can run (for a QA task: every registered arm but those that learn facts only)."""
    entry = task_entry(name)
    if entry.arms is not None:
        return list(entry.arms)
    from .arms import get_arm, list_arms

    return [a for a in list_arms() if not get_arm(a).needs_facts]


_COMMON = ("arms", "out", "data", "limit", "seed", "k", "max_new_tokens", "progress")


def check_task(name: str, arms: Sequence[str], options: dict[str, Any], *, limit: int | None = None,
               data: str | Path | None = None) -> None:
    """Refuse unknown tasks, arms and options before a model is loaded.

    Raises:
        UnknownNameError / InputError / DataError: with the name or option at fault.
    """
    entry = task_entry(name)
    if entry.driver is None:
        from .arms import get_arm
        from .tasks import get_task

        for a in arms:
            if get_arm(a).needs_facts:
                raise InputError(f"the {a} arm learns facts: run it with `nativemem bench facts`, not on {name}")
        get_task(name)(data=data, **{k: v for k, v in options.items() if k != "memory_options"})
        return
    known = inspect.signature(entry.function()).parameters
    bad = sorted(set(options) - set(known))
    if any(p.kind is p.VAR_KEYWORD for p in known.values()):
        bad = []  # the task checks its own options (e.g. pg19's PG19Options)
    if bad:
        raise InputError(f"unknown {name} options {bad}; known: {sorted(set(known) - set(_COMMON) - {'lm'})}")
    unknown = [a for a in arms if a not in entry.arms]
    if unknown:
        raise InputError(f"unknown {name} arms {unknown}; use {', '.join(entry.arms) or '(this task takes no --arms)'}")
    if limit is not None and "limit" not in known:
        raise InputError(f"--limit does not apply to {name}; see its options")


def run_task(name: str, lm, *, arms: Sequence[str] = (), out: str | Path, data: str | Path | None = None,
             limit: int | None = None, seed: int = 0, k: int = 3, max_new_tokens: int = 32, progress: bool = False,
             **options: Any) -> dict[str, Any]:
    """Run benchmark task ``name`` on ``lm`` and write ``results.json`` to ``out``; returns the results.

    ``arms``: empty = the task's defaults (``none,rag_bm25`` for QA tasks). ``options``: the task's own
    (e.g. ``num_facts`` for facts, ``lengths`` for needle, ``memory_options`` for tasks that build a memory).
    """
    check_task(name, arms, options, limit=limit, data=data)
    entry = task_entry(name)
    if entry.driver is None:
        from .runner import run_benchmark

        return run_benchmark(name, lm, arms=list(arms) or list(QA_DEFAULT_ARMS), limit=limit, out=out, seed=seed,
                             data=data, k=k, max_new_tokens=max_new_tokens, progress=progress, **options)
    fn = entry.function()
    known = inspect.signature(fn).parameters
    given = {"arms": list(arms) or None, "out": out, "data": data, "limit": limit, "seed": seed, "k": k,
             "max_new_tokens": max_new_tokens, "progress": progress}
    kwargs = {key: value for key, value in given.items() if key in known and value is not None}
    return fn(lm, **kwargs, **options)
