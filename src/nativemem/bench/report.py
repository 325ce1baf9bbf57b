"""Markdown report and plots from one or more benchmark run folders.

:func:`report` reads ``results.json`` from each folder and writes, into ``out``:

- ``report.md``: the runs (a run on a ``random:NAME`` model is marked: its quality metrics are
  meaningless), one table with a row per task x arm (n, scored, skipped, every metric, cost),
  then, per run, the paired comparisons (difference, 95% bootstrap interval, p-value, paired n);
- ``<task>-<model>-metrics.png`` per run: one bar chart per metric, a bar per arm with its 95%
  bootstrap interval;
- ``<task>-<model>-cost.png`` per run: median time to first token and mean prompt tokens per arm.

Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import ANSWER_METRICS
from .results import has_random_weights, load_results

__all__ = ["report", "REPORT_NAME"]

REPORT_NAME = "report.md"
RANDOM_WEIGHTS_NOTE = ("quality metrics of this run are meaningless "
                       "(random weights: timings, bytes and throughput only)")

_COST_COLUMNS = (
    ("ttft_median_s", "TTFT med (s)"),
    ("search_median_s", "search med (s)"),
    ("end_to_end_median_s", "search+TTFT med (s)"),
    ("prompt_tokens_mean", "prompt tok mean"),
    ("prompt_tokens_median", "prompt tok med"),
    ("wall_s", "wall (s)"),
    ("peak_rss_bytes", "peak RSS (MiB)"),
    ("bytes_stored", "stored (KiB)"),
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cost_cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "peak_rss_bytes":
        return f"{value / 2**20:.0f}"
    if key == "bytes_stored":
        return f"{value / 2**10:.1f}"
    if key.startswith("prompt_tokens"):
        return f"{value:.0f}"
    return _fmt(float(value), 3)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _metric_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Answer metrics first (em, f1, contains), then the others sorted."""
    names = {name for res in runs for block in res["arms"].values() for name in block["metrics"]}
    first = [m for m in ANSWER_METRICS if m in names]
    return first + sorted(names - set(first))


def _arm_names(res: dict[str, Any]) -> list[str]:
    """Arms in run order (``config.arms``), falling back to the order in the file."""
    order = [a for a in res.get("config", {}).get("arms", []) if a in res["arms"]]
    return order + [a for a in res["arms"] if a not in order]


def _table(runs: Sequence[dict[str, Any]]) -> list[str]:
    metrics = _metric_names(runs)
    header = ["task", "model", "arm", "n", "scored", "skipped", *metrics, *(label for _, label in _COST_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in runs:
        for arm in _arm_names(res):
            block = res["arms"][arm]
            reasons = ", ".join(f"{r}: {c}" for r, c in block.get("skipped_reasons", {}).items())
            skipped = f"{block['skipped']} ({reasons})" if reasons else str(block["skipped"])
            row = [res["task"], res.get("model_name", "?"), arm, str(block["n"]),
                   str(block.get("scored", block["n"] - block["skipped"])), skipped]
            row += [_fmt(block["metrics"].get(m)) for m in metrics]
            row += [_cost_cell(key, block["cost"].get(key)) for key, _ in _COST_COLUMNS]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _comparisons(res: dict[str, Any]) -> list[str]:
    if not res["comparisons"]:
        return []
    lines = [
        f"### {res['task']} · {res.get('model_name', '?')}: paired comparisons",
        "",
        "| a | b | metric | paired n | diff (a−b) | 95% CI | p | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["comparisons"]:
        ci = c.get("ci95")
        ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"
        lines.append(
            f"| {c['a']} | {c['b']} | {c['metric']} | {c.get('n', '–')} | {_fmt(c['diff'])} | {ci_text} "
            f"| {_fmt(c['p_value'], 4)} | {c.get('test', '')} |"
        )
    return [*lines, ""]


def _plot_metrics(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arm_names(res)
    metrics = _metric_names([res])
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 + cols * (1.0 + 0.7 * len(arms)), 0.6 + 3.0 * rows),
                             squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        means, lows, highs = [], [], []
        for arm in arms:
            block = res["arms"][arm]
            mean = block["metrics"].get(metric)
            ci = (block.get("ci95") or {}).get(metric)
            means.append(mean if mean is not None else math.nan)
            lows.append(mean - ci[0] if ci and mean is not None else 0.0)
            highs.append(ci[1] - mean if ci and mean is not None else 0.0)
        ax.bar(range(len(arms)), means, yerr=[lows, highs], capsize=4, color=[f"C{i}" for i in range(len(arms))])
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(metric)
    fig.suptitle(f"{res['task']} · {res.get('model_name', '?')} (95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cost(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arm_names(res)
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 2 * len(arms), 3.4))
    panels = (("ttft_median_s", "median TTFT (s)"), ("prompt_tokens_mean", "mean prompt tokens"))
    for ax, (key, label) in zip(axes, panels):
        values = [res["arms"][a]["cost"].get(key) for a in arms]
        ax.bar(range(len(arms)), [v if v is not None else math.nan for v in values],
               color=[f"C{i}" for i in range(len(arms))])
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(label)
    fig.suptitle(f"{res['task']} · {res.get('model_name', '?')}: cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Write ``report.md`` and plots for benchmark runs.

    Args:
        dirs: Run folders (each with a ``results.json``), or ``results.json`` files.
        out: Folder for the report and plots; the first run folder if None.

    Returns:
        The Markdown text (also written to ``out/report.md``).

    Raises:
        DataError: If a folder has no valid ``results.json``.
        ValueError: If ``dirs`` is empty.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    if not dirs:
        raise ValueError("report() needs at least one run folder")
    runs = [load_results(d) for d in dirs]
    first = Path(dirs[0])
    folder = Path(out) if out is not None else (first if first.is_dir() else first.parent)
    folder.mkdir(parents=True, exist_ok=True)

    lines = ["# nativemem benchmark report", ""]
    for d, res in zip(dirs, runs):
        cfg = res.get("config", {})
        lines.append(
            f"- `{d}`: task `{res['task']}`, model `{res.get('model_name', '?')}`, n={res['n']}, seed={res['seed']}, "
            f"k={cfg.get('k', '?')}, max_new_tokens={cfg.get('max_new_tokens', '?')}, created {res['created']}"
        )
        if has_random_weights(res):
            lines.append(f"  - **{RANDOM_WEIGHTS_NOTE}**")
    lines += ["", "## Results", "", *_table(runs), "",
              "Metrics are means over scored items; skipped items did not fit the model's window.", ""]

    plots: list[str] = []
    used: set[str] = set()
    for res in runs:
        stem = _slug(f"{res['task']}-{res.get('model_name', 'model')}")
        base, i = stem, 2
        while stem in used:
            stem, i = f"{base}-{i}", i + 1
        used.add(stem)
        for suffix, plot in (("metrics", _plot_metrics), ("cost", _plot_cost)):
            name = f"{stem}-{suffix}.png"
            plot(res, folder / name)
            plots.append(name)

    lines += ["## Comparisons", ""]
    for res in runs:
        lines += _comparisons(res)
    lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    text = "\n".join(lines)
    (folder / REPORT_NAME).write_text(text, encoding="utf-8")
    return text
