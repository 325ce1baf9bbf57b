"""Schema, writing and reading of benchmark results.

A run writes two files into its ``--out`` folder:

- ``results.json`` (:class:`Results`): configuration, model fingerprint, per-arm metrics with 95%
  bootstrap intervals, skip counts and cost figures, and paired comparisons of every pair of arms on
  every metric they share, and ``"random_weights": true`` when the model was a ``random:NAME`` model
  (real shape, random weights: its quality metrics are meaningless). Written with sorted keys; NaN is
  written as ``null``.
- ``items.jsonl``: one record per (arm, item) with the question, references, raw and post-processed
  output, per-item metrics, timing, prompt size, retrieved chunk ids and any skip reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ..errors import DataError

__all__ = [
    "RESULTS_NAME",
    "ITEMS_NAME",
    "SCHEMA_VERSION",
    "ArmResult",
    "Comparison",
    "Results",
    "write_results",
    "write_items",
    "load_results",
    "read_items",
    "read_jsonl",
    "validate_results",
    "to_jsonable",
    "has_random_weights",
    "save_run",
]

RESULTS_NAME = "results.json"
ITEMS_NAME = "items.jsonl"
SCHEMA_VERSION = 1


class ArmResult(TypedDict):
    """Per-arm block of ``results.json``.

    ``metrics`` holds the mean of each metric over the scored items (plus ``ndcg@k``/``recall@k``
    for retrieval arms), ``ci95`` a bootstrap interval per metric. ``cost`` holds ``ttft_median_s``,
    ``prompt_tokens_mean``, ``prompt_tokens_median``, ``new_tokens_mean``, ``generate_s_total``,
    ``prepare_s``, ``wall_s``, ``peak_rss_bytes`` (process high-water mark when the arm finished) and
    ``bytes_stored``.
    """

    n: int
    scored: int
    skipped: int
    skipped_reasons: dict[str, int]
    metrics: dict[str, float | None]
    ci95: dict[str, list[float] | None]
    cost: dict[str, float | int | None]


class Comparison(TypedDict):
    """One paired comparison: ``diff = mean(a) - mean(b)`` over the ``n`` items both arms scored."""

    a: str
    b: str
    metric: str
    n: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    p_value: float | None
    ci95: list[float] | None
    test: str


class Results(TypedDict):
    """Top level of ``results.json``."""

    schema_version: int
    task: str
    task_version: str
    model: dict[str, Any]
    model_name: str
    created: str
    n: int
    seed: int
    config: dict[str, Any]
    higher_is_better: dict[str, bool]
    arms: dict[str, ArmResult]
    comparisons: list[Comparison]
    random_weights: NotRequired[bool]  # present (true) only for runs on a random:NAME model


_REQUIRED = ("task", "model", "created", "n", "seed", "arms", "comparisons")
_ARM_REQUIRED = ("n", "skipped", "skipped_reasons", "metrics", "cost")


def to_jsonable(value: Any) -> Any:
    """Recursively convert tuples, paths, numpy scalars and NaN/inf into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` into ``out`` (created if needed).

    Args:
        out: Output folder.
        results: The results mapping.

    Returns:
        The written file.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_NAME
    path.write_text(json.dumps(to_jsonable(results), indent=2, sort_keys=True, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


def write_items(out: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``items.jsonl`` into ``out``, one JSON object per line.

    Args:
        out: Output folder.
        records: Per-(arm, item) records.

    Returns:
        The written file.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ITEMS_NAME
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(to_jsonable(rec), sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def save_run(out: str | Path, lm: Any, *, task: str, task_version: str, n: int, seed: int, config: dict[str, Any],
             arms: dict[str, Any], comparisons: list[Any], records: Iterable[Mapping[str, Any]] | None = None,
             higher_is_better: dict[str, bool] | None = None, **extra: Any) -> dict[str, Any]:
    """Write a run's ``results.json`` (the common header of :class:`Results`, then the task's own blocks in
    ``extra``) and, with ``records``, its ``items.jsonl``; returns the results as written.

    ``higher_is_better`` defaults to True for every metric of every arm.
    """
    from datetime import datetime, timezone

    fingerprint = getattr(lm, "fingerprint", None)
    results = {
        "schema_version": SCHEMA_VERSION, "task": task, "task_version": str(task_version),
        "model": fingerprint.to_dict() if fingerprint is not None else {"name": getattr(lm, "name", "unknown")},
        "model_name": str(getattr(lm, "name", "unknown")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n": n, "seed": seed,
        "config": config, "arms": arms, "comparisons": comparisons,
        "higher_is_better": higher_is_better if higher_is_better is not None else {
            m: True for block in arms.values() for m in block.get("metrics", {})},
        **extra,
    }
    if getattr(lm, "random_weights", False):  # a random:NAME model: only timings and sizes mean anything
        results["random_weights"] = True
    results = to_jsonable(results)
    write_results(out, results)
    if records is not None:
        write_items(out, records)
    return results


def has_random_weights(results: Mapping[str, Any]) -> bool:
    """Whether a run used a ``random:NAME`` model (random weights: only timings, bytes and throughput count).

    True when the results say ``random_weights``, or when the model fingerprint's revision is
    ``random-init:...`` (results written by task runners that do not set the flag).
    """
    model = results.get("model")
    revision = model.get("revision", "") if isinstance(model, Mapping) else ""
    return bool(results.get("random_weights")) or str(revision).startswith("random-init:")


def validate_results(results: Any, source: str | Path = "results") -> dict[str, Any]:
    """Check the required structure of a results mapping.

    Args:
        results: Parsed ``results.json``.
        source: Name used in error messages.

    Returns:
        ``results`` unchanged.

    Raises:
        DataError: Naming the first missing or mistyped field.
    """
    if not isinstance(results, dict):
        raise DataError(f"{source}: expected a JSON object, found {type(results).__name__}")
    for key in _REQUIRED:
        if key not in results:
            raise DataError(f"{source}: missing field {key!r}")
    if not isinstance(results["arms"], dict):
        raise DataError(f"{source}: 'arms' should be an object")
    for arm, block in results["arms"].items():
        if not isinstance(block, dict):
            raise DataError(f"{source}: arms.{arm} should be an object")
        for key in _ARM_REQUIRED:
            if key not in block:
                raise DataError(f"{source}: arms.{arm} is missing field {key!r}")
    if not isinstance(results["comparisons"], list):
        raise DataError(f"{source}: 'comparisons' should be a list")
    for i, comp in enumerate(results["comparisons"]):
        for key in ("a", "b", "metric", "diff", "p_value", "ci95"):
            if not isinstance(comp, dict) or key not in comp:
                raise DataError(f"{source}: comparisons[{i}] is missing field {key!r}")
    return results


def load_results(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``results.json`` from a run folder (or the file itself).

    Raises:
        DataError: If the file is missing, not JSON or not a results file.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no results file (run the benchmark with --out pointing here first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid results file ({e})") from None
    return validate_results(data, path)


def read_items(folder: str | Path) -> list[dict[str, Any]]:
    """Read ``items.jsonl`` from a run folder (DataError if it is missing or a line is not JSON)."""
    return read_jsonl(Path(folder) / ITEMS_NAME)


def read_jsonl(path: Path, missing: str = "file not found") -> list[dict[str, Any]]:
    """The records of a JSON-lines file, blank lines skipped.

    Raises:
        DataError: ``path: missing`` when there is no such file, or naming the first line that is not JSON.
    """
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not JSON ({e.msg})") from None
    return records
