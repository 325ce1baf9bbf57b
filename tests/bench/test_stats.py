"""Paired tests and bootstrap intervals."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from nativemem.bench.stats import bootstrap_mean_ci, compare_paired, mcnemar_exact, paired_bootstrap_ci


def test_mcnemar_matches_hand_computed_binomial():
    # 8 items only a right, 2 items only b right, 5 both right, 5 both wrong
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 5
    res = mcnemar_exact(a, b)
    expected = 2 * sum(comb(10, i) for i in range(3)) / 2**10  # two-sided, = 0.109375
    assert (res.n_ab, res.n_ba) == (8, 2)
    assert res.p_value == pytest.approx(expected)
    assert mcnemar_exact(b, a).p_value == pytest.approx(expected)


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0


def test_bootstrap_ci_contains_true_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(0.7, 0.1, size=400)
    b = a - 0.2 + rng.normal(0, 0.05, size=400)
    low, high = paired_bootstrap_ci(a, b, seed=3)
    assert low < 0.2 < high
    assert high - low < 0.05
    assert paired_bootstrap_ci(a, b, seed=3) == (low, high)  # seeded


def test_bootstrap_ci_zero_width_for_identical_arms():
    a = [1, 0, 1, 1, 0.5]
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)


def test_bootstrap_mean_ci_empty():
    low, high = bootstrap_mean_ci([])
    assert np.isnan(low) and np.isnan(high)


def test_compare_paired_fields():
    comp = compare_paired([1, 1, 0, 1], [0, 1, 0, 0], binary=True)
    assert comp["n"] == 4 and comp["diff"] == pytest.approx(0.5) and comp["test"] == "mcnemar_exact"
    assert comp["p_value"] == pytest.approx(0.5)  # 2 discordant, both for a: 2 * 0.25
    cont = compare_paired([0.5, 0.7, 0.9], [0.5, 0.2, 0.1], binary=False)
    assert cont["test"] == "wilcoxon" and 0 < cont["p_value"] <= 1
    assert compare_paired([], [], binary=True)["p_value"] is None
    with pytest.raises(ValueError):
        compare_paired([1], [1, 0], binary=True)


def test_paired_comparisons_pair_the_items_both_arms_scored_on_the_metrics_both_have():
    from nativemem.bench.stats import means_with_ci, paired_comparisons

    a = {"q1": {"em": 1.0, "f1": 0.5}, "q2": {"em": 0.0, "f1": 0.25}, "q3": None, "q4": {"em": 1.0, "f1": 1.0}}
    b = {"q1": {"em": 0.0}, "q2": {"em": 0.0}, "q3": {"em": 1.0}}  # no f1; q4 not asked
    rows = paired_comparisons({"a": a, "b": b}, binary=lambda m: m == "em")
    assert [(r["a"], r["b"], r["metric"], r["n"], r["test"]) for r in rows] == [("a", "b", "em", 2, "mcnemar_exact")]
    assert rows[0]["diff"] == 0.5 and rows[0]["n_ab"] == 1
    back = paired_comparisons({"a": a, "b": b}, pairs=[("b", "a")], binary=lambda m: False, metrics=("f1", "em"))
    assert [(r["a"], r["metric"], r["test"]) for r in back] == [("b", "em", "wilcoxon")]
    means, ci = means_with_ci(a, metrics=("em", "f1", "hit@1"))
    assert means == {"em": 2 / 3, "f1": 1.75 / 3, "hit@1": None} and ci["hit@1"] is None
    assert ci["em"][0] <= 2 / 3 <= ci["em"][1]
