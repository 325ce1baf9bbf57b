"""Answer and retrieval metrics on hand-checked cases."""

from __future__ import annotations

import math

import pytest

from nativemem.bench.metrics import (
    contains,
    exact_match,
    hit_at_k,
    is_binary_metric,
    normalize_answer,
    per_query_retrieval,
    perplexity,
    retrieval_scores,
    token_f1,
)


def test_normalize_answer_squad_rules():
    assert normalize_answer("  The  Denver-Broncos! ") == "denverbroncos"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("Theory of the case") == "theory of case"  # only whole-word articles


def test_exact_match_takes_max_over_references():
    assert exact_match("the Denver Broncos.", ["Broncos", "Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Broncos", "Denver Broncos"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_token_f1_hand_values():
    # pred {denver, broncos, team}, ref {denver, broncos}: P=2/3, R=1 -> F1=0.8
    assert token_f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over refs: "team" alone scores 2*(1/3*1)/(1/3+1)=0.5 against ["team"]
    assert token_f1("Denver Broncos team", ["team", "Carolina"]) == pytest.approx(0.5)
    assert token_f1("", ["x"]) == 0.0
    assert token_f1("Carolina", ["Denver Broncos"]) == 0.0


def test_token_f1_counts_repeated_tokens_once_each():
    # pred "x y y" vs ref "y": one common token, P=1/3, R=1 -> F1=0.5
    assert token_f1("x y y", ["y"]) == pytest.approx(0.5)


def test_contains_on_token_boundaries():
    assert contains("It was founded in 1850 by traders", ["1850"]) == 1.0
    assert contains("In 18500 BC", ["1850"]) == 0.0
    assert contains("Glimmerwick!", ["The Glimmerwick", "nope"]) == 1.0
    assert contains("something", ["the", "a"]) == 0.0  # references normalising to "" never match


def test_hit_at_k():
    assert hit_at_k(["c", "b", "a"], ["a"], 3) == 1.0
    assert hit_at_k(["c", "b", "a"], ["a"], 2) == 0.0
    assert hit_at_k([], ["a"], 3) == 0.0


def test_ndcg_and_recall_hand_example():
    qrels = {"q1": {"d2": 1}, "q2": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.1}, "q2": {"d1": 0.5}}
    # q1: gold at rank 2 -> DCG = 1/log2(3), IDCG = 1; q2: gold not retrieved -> 0
    per_query = per_query_retrieval(qrels, run, 3)
    assert per_query["q1"]["ndcg@3"] == pytest.approx(1 / math.log2(3))
    assert per_query["q2"]["ndcg@3"] == 0.0
    scores = retrieval_scores(qrels, run, 3)
    assert scores["ndcg@3"] == pytest.approx(1 / math.log2(3) / 2)
    assert scores["recall@3"] == pytest.approx(0.5)
    assert retrieval_scores(qrels, run, 1)["recall@1"] == 0.0


def test_query_missing_from_run_counts_zero():
    scores = retrieval_scores({"q1": {"d1": 1}, "q2": {"d1": 1}}, {"q1": {"d1": 1.0}}, 3)
    assert scores["ndcg@3"] == pytest.approx(0.5)


def test_perplexity():
    assert perplexity([math.log(4.0)] * 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity([])


def test_binary_metric_names():
    assert is_binary_metric("em") and is_binary_metric("contains") and is_binary_metric("hit@3")
    assert not is_binary_metric("f1") and not is_binary_metric("ndcg@3")
