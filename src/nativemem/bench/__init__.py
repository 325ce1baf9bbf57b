"""Benchmark harness: tasks x arms on one model, with paired statistics and cost figures.

Typical use::

    import nativemem as nm
    from nativemem.bench import run_task, report

    lm = nm.load_model()
    run_task("squad", lm, arms=["none", "rag_bm25", "activation"], limit=100, out="runs/squad")
    print(report(["runs/squad"]))

Every task is in :mod:`.catalog` (``TASKS``: its name, what it scores, its arms); :func:`run_task` runs any of
them, as ``nativemem bench TASK`` does. QA tasks (``squad``, ``triviaqa``, ``needle``) go through
:func:`run_benchmark` with the arms of :mod:`.arms`; other modules add their own with :func:`register_task`
and :func:`register_arm`.
"""

from .arms import Arm, ArmOutput, RetrievalArm, get_arm, list_arms, register_arm
from .catalog import TASKS, run_task
from .report import report
from .runner import merge_runs, run_benchmark
from .tasks import Chunk, QAItem, Task, TaskData, get_task, list_tasks, register_task

__all__ = [
    "run_task",
    "TASKS",
    "run_benchmark",
    "merge_runs",
    "report",
    "list_tasks",
    "list_arms",
    "register_task",
    "register_arm",
    "get_task",
    "get_arm",
    "Task",
    "TaskData",
    "QAItem",
    "Chunk",
    "Arm",
    "RetrievalArm",
    "ArmOutput",
]
