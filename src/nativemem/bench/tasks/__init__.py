"""Benchmark tasks: the item/chunk data model, the :class:`Task` base class and the task registry.

A task turns a data file into

- **items**: questions with every accepted answer, the ids of their gold chunks (when known) and
  the ids of the chunks that make up their *source* (used by the ``long_context`` arm), and
- a **pool** of chunks that every retrieval arm searches.

:meth:`Task.select` applies ``limit`` the same way for every task: the items are shuffled with
``random.Random(seed)`` and the first ``limit`` are kept, in that order. The pool is then built from
the selected items only (:meth:`Task.pool_for`).

Adding a task::

    @register_task("mytask")
    class MyTask(Task):
        default_path = "mytask/file.json"
        def load(self, path): ...

Default data paths are relative to the data root: ``$NATIVEMEM_DATA`` when set, else
``../shared/data`` relative to the working directory (or to the repository root).
"""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import DataError, InputError
from ...registry import Registry
from ...retrieval import Chunk
from ..metrics import ANSWER_METRICS, answer_scores

__all__ = [
    "Chunk",
    "QAItem",
    "TaskData",
    "Task",
    "register_task",
    "get_task",
    "list_tasks",
    "data_root",
    "DATA_ENV",
]

DATA_ENV = "NATIVEMEM_DATA"
"""Environment variable that overrides the data root."""

_REPO_ROOT = Path(__file__).resolve().parents[4]


def data_root() -> Path:
    """Folder that default data paths are relative to.

    Returns:
        ``$NATIVEMEM_DATA`` if set; else ``./../shared/data`` if it exists; else
        ``<repo root>/../shared/data``.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    cwd_root = Path.cwd() / ".." / "shared" / "data"
    if cwd_root.is_dir():
        return cwd_root
    return _REPO_ROOT / ".." / "shared" / "data"


@dataclass(frozen=True)
class QAItem:
    """One question of a QA task.

    Attributes:
        id: Unique item id.
        question: The question text.
        answers: Every accepted answer (metrics take the max over them).
        gold_chunk_ids: Pool chunks that contain the answer, if known (empty otherwise).
        source_chunk_ids: Chunks forming the item's whole source, in document order.
        meta: Extra task-specific fields (title, ...), written to ``items.jsonl``.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    gold_chunk_ids: tuple[str, ...] = ()
    source_chunk_ids: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskData:
    """Everything a task read from its file.

    Attributes:
        items: All answerable items, in file order.
        chunks: All chunks, keyed by id, in file order.
        skipped: Number of file records that were not usable as items (e.g. unanswerable).
    """

    items: tuple[QAItem, ...]
    chunks: dict[str, Chunk]
    skipped: int = 0


class Task(ABC):
    """Base class of a benchmark task.

    Subclasses set ``name`` (through :func:`register_task`), ``version`` and ``default_path`` and
    implement :meth:`load`. The default :meth:`pool_for` returns every chunk of every selected
    item's source, which is what SQuAD and TriviaQA need.

    Args:
        data: The user's own file in the task's format; None for the default file.
        **options: Options of a subclass that does not declare any; passing one raises InputError.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    default_path: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ANSWER_METRICS
    """The answer metrics :meth:`score_answer` gives every scored item (reported even when none is scored)."""

    def __init__(self, data: str | Path | None = None, **options: Any) -> None:
        if options:
            raise InputError(f"task {self.name!r} has no option(s) {', '.join(sorted(options))}")
        self.path = Path(data).expanduser() if data is not None else data_root() / self.default_path
        self._data: TaskData | None = None

    @abstractmethod
    def load(self, path: Path) -> TaskData:
        """Read and validate the task's file.

        Args:
            path: The data file.

        Raises:
            DataError: If the file is missing or malformed (message names the file and the problem).
        """

    @property
    def data(self) -> TaskData:
        """The loaded data (read on first access)."""
        if self._data is None:
            if not self.path.exists():
                raise DataError(f"{self.path}: data file not found for task {self.name!r} (pass data=PATH to use your own file)")
            self._data = self.load(self.path)
            if not self._data.items:
                raise DataError(f"{self.path}: no usable items for task {self.name!r}")
        return self._data

    def options(self) -> dict[str, Any]:
        """Task options to record in ``results.json`` (none by default)."""
        return {}

    def select(self, limit: int | None, seed: int) -> list[QAItem]:
        """The first ``limit`` items in the seeded order (all items, shuffled, if ``limit`` is None).

        Args:
            limit: Number of items to keep, or None for all.
            seed: Seed of ``random.Random`` used for the shuffle.

        Returns:
            The selected items, in seeded order.
        """
        if limit is not None and limit < 1:
            raise InputError(f"limit must be a positive number of items, got {limit}")
        items = list(self.data.items)
        random.Random(seed).shuffle(items)
        return items if limit is None else items[:limit]

    def pool_for(self, items: Sequence[QAItem]) -> list[Chunk]:
        """The retrieval pool for the selected items: the chunks of all their sources.

        Args:
            items: Selected items.

        Returns:
            Unique chunks in file order.
        """
        wanted = {cid for item in items for cid in item.source_chunk_ids}
        return [chunk for cid, chunk in self.data.chunks.items() if cid in wanted]

    def source_of(self, item: QAItem) -> list[Chunk]:
        """The chunks of an item's whole source, in document order."""
        return [self.data.chunks[cid] for cid in item.source_chunk_ids]

    def groups(self, items: Sequence[QAItem]) -> list[tuple[list[Chunk], list[QAItem]]]:
        """``(pool, items)`` pairs an arm is prepared on and asked in turn: one pool for all by default
        (:meth:`pool_for`); a task of separate documents (LoCoMo's conversations) gives one per document."""
        return [(self.pool_for(items), list(items))]

    def ask(self, arm: Any, item: QAItem) -> Any:
        """Put ``item`` to a prepared ``arm`` and return its :class:`~nativemem.bench.arms.ArmOutput` (default: the
        arm generates an answer; a task that scores log-likelihoods reads the arm's model through
        :meth:`~nativemem.bench.arms.Arm.scoring`)."""
        return arm.answer(item)

    def score_answer(self, prediction: str, item: QAItem) -> dict[str, float]:
        """Metrics of one answer (default: SQuAD EM, F1 and contains, max over the accepted answers)."""
        return answer_scores(prediction, item.answers)


_TASKS: Registry[type[Task]] = Registry("task")
register_task = _TASKS.decorator
"""Class decorator registering a :class:`Task` subclass under a lower-case snake_case name (``replace=True``
replaces one registered under that name; another class under a taken name is a ValueError)."""
get_task = _TASKS.get
"""The task class registered under a name (UnknownNameError suggests the closest)."""
list_tasks = _TASKS.names
"""Names of every registered task, sorted."""


from . import squad, triviaqa  # noqa: E402,F401  (registers the built-in tasks)

# tasks with heavier modules: registered lazily, so that `get_task("needle")` works without importing them first
for _name, _target in {"needle": "needle:NeedleTask", "locomo": "locomo:LocomoTask", "mmlu": "mmlu:MMLUTask"}.items():
    if _name not in _TASKS.names():
        _TASKS.register(_name, f"nativemem.bench.tasks.{_target}")
