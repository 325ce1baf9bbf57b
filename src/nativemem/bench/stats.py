"""Paired significance tests and bootstrap intervals for comparing benchmark arms.

Two arms answer the same items, so every comparison is *paired*:

- Binary metrics (``em``, ``contains``, ``hit@k``): the exact McNemar test, i.e. a two-sided
  binomial test with p = 0.5 on the discordant pairs (items one arm got right and the other wrong).
- Continuous metrics (``f1``, ``ndcg@k``): the Wilcoxon signed-rank test on the per-item
  differences (1.0 when every difference is zero).
- Both: a seeded paired percentile bootstrap of the mean difference (default 2000 resamples, 95%).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

__all__ = [
    "McNemarResult",
    "mcnemar_exact",
    "wilcoxon_p",
    "paired_bootstrap_ci",
    "bootstrap_mean_ci",
    "compare_paired",
    "means_with_ci",
    "paired_comparisons",
    "mean_or_none",
    "median_or_none",
    "N_RESAMPLES",
]

N_RESAMPLES = 2000
"""Default number of bootstrap resamples."""


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of an exact McNemar test.

    Attributes:
        n_ab: Items where ``a`` is right and ``b`` wrong.
        n_ba: Items where ``b`` is right and ``a`` wrong.
        p_value: Two-sided exact p-value (1.0 with no discordant pairs).
    """

    n_ab: int
    n_ba: int
    p_value: float


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    return x, y


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> McNemarResult:
    """Exact (binomial) McNemar test on paired binary outcomes.

    Args:
        a: Per-item outcomes of arm ``a`` (truthy = correct).
        b: Per-item outcomes of arm ``b``, same items in the same order.

    Returns:
        The discordant counts and the two-sided p-value.
    """
    from scipy.stats import binomtest

    x, y = _paired(a, b)
    xa, yb = x > 0.5, y > 0.5
    n_ab = int(np.sum(xa & ~yb))
    n_ba = int(np.sum(~xa & yb))
    if n_ab + n_ba == 0:
        return McNemarResult(n_ab, n_ba, 1.0)
    p = binomtest(n_ab, n_ab + n_ba, 0.5, alternative="two-sided").pvalue
    return McNemarResult(n_ab, n_ba, float(min(1.0, p)))


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired continuous outcomes.

    Args:
        a: Per-item scores of arm ``a``.
        b: Per-item scores of arm ``b``.

    Returns:
        The p-value; 1.0 when all differences are zero.
    """
    from scipy.stats import wilcoxon

    x, y = _paired(a, b)
    if not np.any(x != y):
        return 1.0
    return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a - b)``, resampling items (pairs kept together).

    Args:
        a: Per-item scores of arm ``a``.
        b: Per-item scores of arm ``b``, same items in the same order.
        n_resamples: Number of bootstrap resamples.
        seed: Seed of the resampling generator.
        confidence: Interval coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for empty input.
    """
    x, y = _paired(a, b)
    return bootstrap_mean_ci(x - y, n_resamples=n_resamples, seed=seed, confidence=confidence)


def bootstrap_mean_ci(
    values: Sequence[float], *, n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean.

    Args:
        values: Per-item scores.
        n_resamples: Number of bootstrap resamples.
        seed: Seed of the resampling generator.
        confidence: Interval coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for empty input.
    """
    d = np.asarray(values, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def compare_paired(
    a: Sequence[float],
    b: Sequence[float],
    *,
    binary: bool,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, object]:
    """Everything reported for one (arm a, arm b, metric) comparison.

    Args:
        a: Per-item scores of arm ``a`` on the items both arms scored.
        b: Per-item scores of arm ``b`` on the same items.
        binary: Use McNemar (binary metric) instead of Wilcoxon.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``{"n", "mean_a", "mean_b", "diff", "p_value", "ci95", "test"}`` (plus discordant counts for
        McNemar). ``diff`` is ``mean(a) - mean(b)``; ``p_value`` is None when ``n`` is 0.
    """
    x, y = _paired(a, b)
    out: dict[str, object] = {"n": int(x.size), "test": "mcnemar_exact" if binary else "wilcoxon"}
    if x.size == 0:
        out.update(mean_a=None, mean_b=None, diff=None, p_value=None, ci95=None)
        return out
    out.update(mean_a=float(x.mean()), mean_b=float(y.mean()), diff=float((x - y).mean()))
    if binary:
        res = mcnemar_exact(x, y)
        out.update(p_value=res.p_value, n_ab=res.n_ab, n_ba=res.n_ba)
    else:
        out["p_value"] = wilcoxon_p(x, y)
    out["ci95"] = list(paired_bootstrap_ci(x, y, n_resamples=n_resamples, seed=seed))
    return out


Scores = Mapping[Hashable, "Mapping[str, float] | None"]
"""One arm's per-item scores: item id -> {metric: value}, None for a skipped item."""


def means_with_ci(scores: Scores, *, seed: int = 0,
                  metrics: Sequence[str] | None = None) -> tuple[dict[str, float | None], dict[str, list | None]]:
    """Mean and bootstrap 95 % interval of each metric over the items that have it.

    ``metrics``: which, in this order (default: every metric any item has, sorted).
    """
    rows = [s for s in scores.values() if s is not None]
    names = list(metrics) if metrics is not None else sorted({m for s in rows for m in s})
    means, ci95 = {}, {}
    for name in names:
        values = [s[name] for s in rows if name in s]
        means[name] = float(np.mean(values)) if values else None
        ci95[name] = list(bootstrap_mean_ci(values, seed=seed)) if values else None
    return means, ci95


def paired_comparisons(per_arm: Mapping[str, Scores], *, binary: Callable[[str], bool] | None = None, seed: int = 0,
                       pairs: Iterable[tuple[str, str]] | None = None, metrics: Sequence[str] | None = None,
                       always: Sequence[str] = ()) -> list[dict[str, object]]:
    """:func:`compare_paired` of arm ``a`` against arm ``b`` on every metric both scored, over the items both scored.

    Args:
        per_arm: arm -> its per-item scores (the same item ids across arms).
        binary: whether a metric is binary (McNemar) or continuous (Wilcoxon); None: binary when its name says
            so (:func:`~.metrics.is_binary_metric`) or every compared value is 0 or 1 (e.g. LoCoMo's adversarial F1).
        pairs: (a, b) arm pairs (default: every pair, in ``per_arm`` order).
        metrics: which metrics, in this order (default: every metric both arms have, sorted).
        always: metrics compared first and even when an arm scored none of them (then with n = 0).
    """
    from .metrics import is_binary_metric

    out: list[dict[str, object]] = []
    for a, b in (combinations(list(per_arm), 2) if pairs is None else pairs):
        sa, sb = per_arm[a], per_arm[b]
        have = [{m for s in arm.values() if s for m in s} for arm in (sa, sb)]
        names = [m for m in (metrics if metrics is not None else sorted(have[0] & have[1]))
                 if m in have[0] and m in have[1] and m not in always]
        for metric in (*always, *names):
            both = [(sa[i][metric], sb[i][metric]) for i in sa
                    if sa[i] and sb.get(i) and metric in sa[i] and metric in sb[i]]
            xs, ys = [x for x, _ in both], [y for _, y in both]
            is_binary = binary(metric) if binary is not None else (
                is_binary_metric(metric) or all(v in (0.0, 1.0) for v in (*xs, *ys)))
            out.append({"a": a, "b": b, "metric": metric, **compare_paired(xs, ys, binary=is_binary, seed=seed)})
    return out


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return float(statistics.fmean(values)) if len(values) else None


def median_or_none(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return float(statistics.median(values)) if len(values) else None
