"""Benchmark harness: tasks x arms on one model, with paired statistics and cost figures.

Typical use::

    import nativemem as nm
    from nativemem.bench import run_benchmark, report

    lm = nm.load_model()
    run_benchmark("squad", lm, arms=["none", "rag_bm25", "long_context"], limit=100, out="runs/squad")
    print(report(["runs/squad"]))

Tasks (``list_tasks()``): ``squad``, ``triviaqa``. Arms (``list_arms()``): ``none``, ``rag_bm25``,
``rag_dense``, ``long_context``. Other modules add their own with :func:`register_task` and
:func:`register_arm`.
"""

from .arms import Arm, ArmOutput, RetrievalArm, get_arm, list_arms, register_arm
from .report import report
from .runner import merge_runs, run_benchmark
from .tasks import Chunk, QAItem, Task, TaskData, get_task, list_tasks, register_task

__all__ = [
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
