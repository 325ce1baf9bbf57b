"""Run a task with several arms on one model and write ``results.json`` + ``items.jsonl``.

:func:`run_benchmark` is the whole pipeline:

1. look up the task and arms (unknown names raise :class:`~nativemem.errors.UnknownNameError`
   suggesting the closest), load the data and select the first ``limit`` items in seeded order;
2. build the chunk pool from the selected items;
3. for each arm: ``prepare`` once, ``answer`` every item, score the post-processed answers (EM, F1,
   contains; plus hit@k, nDCG@k and Recall@k for retrieval arms on items with a known gold chunk)
   and measure cost;
4. compare every pair of arms on every metric they share, over the items both scored;
5. write both files to ``out`` and return the results mapping.

Items whose prompt does not fit the model's window are skipped for that arm and counted; metrics
are means over the scored items only.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .arms import Arm, ArmOutput, get_arm
from .metrics import ANSWER_METRICS, hit_at_k, per_query_retrieval
from ..prompting import build_messages
from .results import save_run, to_jsonable, write_items, write_results
from .stats import mean_or_none, means_with_ci, median_or_none, paired_comparisons
from .tasks import QAItem, Task, get_task

__all__ = ["run_benchmark", "merge_runs", "peak_rss_bytes"]


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far, in bytes (None if it cannot be measured)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
    except ImportError:  # Windows
        try:
            import psutil
        except ImportError:
            return None
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def _warm_up(lm: Any) -> None:
    """One untimed one-token generation, so the first arm's TTFT does not include one-time setup."""
    ids = lm.chat_ids(build_messages("Is this a warm-up?"))
    if ids.shape[-1] + 1 <= int(lm.max_context):
        lm.generate(ids, max_new_tokens=1)


def _library_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nativemem")
    except PackageNotFoundError:
        return str(getattr(sys.modules.get("nativemem"), "__version__", "unknown"))


def _cuda_device(lm: Any) -> Any:
    """The CUDA device the model runs on, or None (then no GPU memory is reported)."""
    import torch

    device = getattr(lm, "device", None)
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.device(device)
    return None


def _score(arm: Arm, items: Sequence[QAItem], outputs: Sequence[ArmOutput], k: int,
           task: Task) -> list[dict[str, float] | None]:
    """Per-item metrics (None for skipped items)."""
    scores: list[dict[str, float] | None] = []
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for item, out in zip(items, outputs):
        if out.skipped:
            scores.append(None)
            continue
        s = {**task.score_answer(out.text, item), **out.scores}
        if arm.uses_retrieval and item.gold_chunk_ids:
            s[f"hit@{k}"] = hit_at_k([cid for cid, _ in out.retrieved], item.gold_chunk_ids, k)
            qrels[item.id] = dict.fromkeys(item.gold_chunk_ids, 1)
            run[item.id] = {cid: score for cid, score in out.retrieved}
        scores.append(s)
    if qrels:
        per_query = per_query_retrieval(qrels, run, k)
        for item, s in zip(items, scores):
            if s is not None and item.id in per_query:
                s.update(per_query[item.id])
    return scores


def _summarise(outputs: Sequence[ArmOutput], scores: Sequence[dict[str, float] | None], cost: dict[str, Any],
               seed: int, first: Sequence[str]) -> dict[str, Any]:
    """The per-arm block of results.json (``first``: the task's answer metrics, listed first)."""
    scored = [o for o in outputs if not o.skipped]
    names: list[str] = list(first)
    for s in scores:
        for name in s or ():
            if name not in names:
                names.append(name)
    metrics, ci95 = means_with_ci(dict(enumerate(scores)), seed=seed, metrics=names)
    cost.update(
        ttft_median_s=median_or_none([o.ttft_s for o in scored if o.ttft_s is not None]),
        prompt_tokens_mean=mean_or_none([o.prompt_tokens for o in scored]),
        prompt_tokens_median=median_or_none([o.prompt_tokens for o in scored]),
        new_tokens_mean=mean_or_none([o.new_tokens for o in scored]),
        generate_s_total=float(sum(o.total_s or 0.0 for o in scored)),
    )
    searched = [o for o in scored if o.search_s is not None and o.ttft_s is not None]
    if searched:  # retrieval arms: what a user waits for is the search and then the first token
        cost.update(search_median_s=median_or_none([o.search_s for o in searched]),
                    end_to_end_median_s=median_or_none([o.search_s + o.ttft_s for o in searched]))
    reasons = Counter(o.skip_reason for o in outputs if o.skipped)
    return {
        "n": len(outputs),
        "scored": len(scored),
        "skipped": len(outputs) - len(scored),
        "skipped_reasons": dict(sorted(reasons.items())),
        "metrics": metrics,
        "ci95": ci95,
        "n_per_metric": {m: sum(1 for x in scores if x is not None and m in x) for m in names},
        "cost": dict(sorted(cost.items())),
    }


def _compare(arm_names: Sequence[str], scores: dict[str, list[dict[str, float] | None]], seed: int,
             first: Sequence[str] = ANSWER_METRICS) -> list[dict[str, Any]]:
    """Paired comparisons of every pair of arms on every metric both have (``first``: the task's answer
    metrics, compared even when one arm scored nothing)."""
    return paired_comparisons({a: dict(enumerate(scores[a])) for a in arm_names}, seed=seed, always=first)


def _check_task_options(task: str, task_cls: type, options: dict[str, Any]) -> None:
    accepted = sorted(name for name, p in inspect.signature(task_cls).parameters.items()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"task {task!r} has no option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted) or 'none'}")


def _resolve_arms(arms: Sequence[str]) -> list[tuple[str, type[Arm]]]:
    if isinstance(arms, str):
        arms = [arms]
    if not arms:
        raise InputError("at least one arm is needed")
    names = list(dict.fromkeys(arms))  # de-duplicate, keep order
    return [(name, get_arm(name)) for name in names]


def _run_arm(make, label: str, lm, groups, task_obj, cuda, progress: bool) -> tuple[Arm, list, list, dict[str, Any]]:
    """Prepare a fresh arm (``make()``) on each group's pool and answer its items; returns the last arm, the
    outputs, what each answer left in the arm's ``last_info``, and the arm's cost."""
    from tqdm.auto import tqdm

    if cuda is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(cuda)
    start = time.perf_counter()
    outputs, infos = [], []
    cost: dict[str, Any] = {"prepare_s": 0.0, "bytes_stored": 0}
    for pool, items in groups:
        arm = make()
        t0 = time.perf_counter()
        arm.prepare(pool, lm, items=items, task=task_obj)
        cost["prepare_s"] += time.perf_counter() - t0
        for item in tqdm(items, desc=label, disable=not progress, leave=len(groups) == 1):
            outputs.append(task_obj.ask(arm, item))
            infos.append(dict(getattr(arm, "last_info", None) or {}))
        cost["bytes_stored"] += int(arm.bytes_stored())
        receipts = list(getattr(arm, "receipts", {}).values())  # arms that train per document
        if receipts or hasattr(arm, "extra_params"):
            cost["extra_params"] = max(cost.get("extra_params", 0), int(getattr(arm, "extra_params", 0)))
            cost["train_steps"] = cost.get("train_steps", 0) + sum(r.get("steps", 0) for r in receipts)
            cost["train_tokens"] = cost.get("train_tokens", 0) + sum(r.get("tokens", 0) for r in receipts)
        cost.update(arm.cost)
    with_context = [i for i in infos if "context_truncated" in i]
    if with_context:
        cost.update(context_items=len(with_context), context_truncated_items=sum(
            int(i["context_truncated"]) for i in with_context))
    cost.update(wall_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())
    if cuda is not None:
        cost["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(cuda))
    return arm, outputs, infos, cost


def _item_record(arm: str, rank: int, item, output, scores: dict[str, float] | None,
                 info: dict[str, Any]) -> dict[str, Any]:
    """One line of ``items.jsonl``: the question, what the arm answered and retrieved, its scores and costs
    (and what the arm noted about the answer, e.g. how much context it kept)."""
    return {"arm": arm, "rank": rank, "item_id": item.id, "question": item.question, "answers": item.answers,
            "gold_chunk_ids": item.gold_chunk_ids, "output": output.text, "raw_output": output.raw_text,
            "skipped": output.skipped, "skip_reason": output.skip_reason, "skip_detail": output.skip_detail,
            "metrics": scores, "ttft_s": output.ttft_s, "search_s": output.search_s, "total_s": output.total_s,
            "prompt_tokens": output.prompt_tokens, "new_tokens": output.new_tokens,
            "prefix_tokens": output.prefix_tokens, "retrieved": [cid for cid, _ in output.retrieved],
            "retrieved_scores": [score for _, score in output.retrieved], "meta": item.meta, **info}


def run_benchmark(
    task: str,
    lm: Any,
    *,
    arms: Sequence[str],
    limit: int | None,
    out: str | Path,
    seed: int = 0,
    data: str | Path | None = None,
    k: int = 3,
    max_new_tokens: int = 32,
    progress: bool = True,
    memory_options: dict[str, Any] | None = None,
    arm_options: dict[str, Any] | None = None,
    **task_options: Any,
) -> dict[str, Any]:
    """Run ``task`` with every arm in ``arms`` on ``lm`` and write the results to ``out``.

    Args:
        task: Registered task name (see :func:`~nativemem.bench.list_tasks`).
        lm: A ``nativemem`` ``LanguageModel``.
        arms: Registered arm names (see :func:`~nativemem.bench.list_arms`), run in this order.
        limit: Number of items (the first ``limit`` in seeded order), or None for all.
        out: Output folder for ``results.json`` and ``items.jsonl`` (created if needed).
        seed: Seed of the item order and of the bootstrap.
        data: The user's own data file in the task's format; None for the task's default file.
        k: Passages retrieved per question by retrieval arms (also the cut-off of hit/nDCG/Recall).
        max_new_tokens: Generation cap per answer.
        progress: Show progress bars.
        memory_options: Config overrides of the memory that memory arms build (e.g. ``{"kv_dtype": "int8"}``).
        arm_options: What the arm families read (:class:`~nativemem.bench.arms.Arm`'s ``options``: e.g.
            ``max_prompt_tokens``, ``side_ffn``, ``lora``).
        **task_options: Task-specific options (e.g. ``evidence_dir`` for ``triviaqa``).

    Returns:
        The results mapping, as written to ``results.json``.

    Raises:
        UnknownNameError: For an unknown task or arm (the message suggests the closest name).
        DataError: If the data file is missing or malformed.
        InputError: For non-positive ``limit``, ``k`` or ``max_new_tokens``, no arms, or an option the
            task does not have.
    """
    task_cls = get_task(task)
    arm_classes = _resolve_arms(arms)
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    _check_task_options(task, task_cls, task_options)
    task_obj = task_cls(data=data, **task_options)
    items = task_obj.select(limit, seed)
    groups = task_obj.groups(items)
    items = [item for _, group in groups for item in group]
    cuda = _cuda_device(lm)
    _warm_up(lm)

    records: list[dict[str, Any]] = []
    arm_results: dict[str, Any] = {}
    all_scores: dict[str, list[dict[str, float] | None]] = {}
    for name, cls in arm_classes:
        def make(cls=cls):
            return cls(k=k, max_new_tokens=max_new_tokens, progress=progress, memory_options=memory_options,
                       options=arm_options)

        arm, outputs, infos, cost = _run_arm(make, f"{task}/{name}", lm, groups, task_obj, cuda, progress)
        scores = _score(arm, items, outputs, k, task_obj)
        all_scores[name] = scores
        arm_results[name] = _summarise(outputs, scores, cost, seed, task_obj.metrics)
        records += [_item_record(name, rank, *row) for rank, row in enumerate(zip(items, outputs, scores, infos))]

    arm_names = [name for name, _ in arm_classes]
    config = {"arms": arm_names, "limit": limit, "k": k, "max_new_tokens": max_new_tokens,
              "data": str(task_obj.path.resolve()), "task_options": task_obj.options(),
              "pool_size": sum(len(pool) for pool, _ in groups), "arm_options": dict(arm_options or {}),
              "max_context": int(getattr(lm, "max_context", 0)) or None, "decoding": "greedy",
              "memory_options": dict(memory_options or {}), "version": _library_version()}
    return save_run(out, lm, task=task, task_version=task_cls.version, n=len(items), seed=seed, config=config,
                    arms=arm_results, comparisons=_compare(arm_names, all_scores, seed, task_obj.metrics),
                    records=records)


_SAME_IN_MERGE = ("task", "task_version", "n", "seed")
_SAME_CONFIG_IN_MERGE = ("limit", "k", "max_new_tokens", "data", "task_options", "pool_size", "decoding")


def merge_runs(dirs: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Merge runs of the same task, items and settings that ran different arms (e.g. in parallel processes).

    The arms' blocks are kept as they were measured; the paired comparisons are recomputed over every arm
    of the merged run from the per-item scores in ``items.jsonl``.

    Raises:
        InputError: fewer than two folders, runs that differ in task, model, items or settings, or an arm
            that appears in two of them with the same memory options (with other options, the later one is
            kept as ``arm[key=value]``).
    """
    from .results import load_results, read_items

    if len(dirs) < 2:
        raise InputError("merge needs at least two run folders")
    runs = [load_results(d) for d in dirs]
    items_by_run = [read_items(d) for d in dirs]
    first = runs[0]
    arms: dict[str, Any] = {}
    arms_options: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    order: list[str] | None = None
    for d, res, items in zip(dirs, runs, items_by_run):
        for key in _SAME_IN_MERGE:
            if res.get(key) != first.get(key):
                raise InputError(f"cannot merge {d}: {key} is {res.get(key)!r} there but {first.get(key)!r} in {dirs[0]}")
        if res.get("model") != first.get("model"):
            raise InputError(f"cannot merge {d}: it was run on another model")
        for key in _SAME_CONFIG_IN_MERGE:
            if res["config"].get(key) != first["config"].get(key):
                raise InputError(f"cannot merge {d}: config {key} is {res['config'].get(key)!r} there but "
                                 f"{first['config'].get(key)!r} in {dirs[0]}")
        options = res["config"].get("memory_options") or {}
        for name in res["config"].get("arms") or list(res["arms"]):
            block = res["arms"][name]
            label = name
            if name in arms and options != (arms_options.get(name) or {}):
                # the same arm with another memory config (e.g. kv_dtype): kept apart under a labelled name
                label = f"{name}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"
            if label in arms:
                raise InputError(f"cannot merge {d}: arm {name!r} is also in another run")
            arms[label] = block
            arms_options[label] = options
            mine = [{**r, "arm": label} for r in sorted((r for r in items if r["arm"] == name),
                                                        key=lambda r: r["rank"])]
            ids = [r["item_id"] for r in mine]
            if order is None:
                order = ids
            elif ids != order:
                raise InputError(f"cannot merge {d}: arm {name!r} answered other items, or in another order")
            records.extend(mine)
    scores = {name: [r["metrics"] if not r.get("skipped") else None for r in records if r["arm"] == name]
              for name in arms}
    merged = dict(first)
    merged["arms"] = arms
    merged["config"] = {**first["config"], "arms": list(arms), "merged_from": [str(Path(d)) for d in dirs],
                        "memory_options_by_arm": {a: o for a, o in arms_options.items() if o}}
    merged["higher_is_better"] = {m: True for block in arms.values() for m in block["metrics"]}
    merged["comparisons"] = _compare(list(arms), scores, int(first["seed"]))
    merged = to_jsonable(merged)
    write_results(out, merged)
    write_items(out, records)
    return merged
