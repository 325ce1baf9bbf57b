"""Calibrated relevance and the injection gate of the activation memory (tiny random model)."""

import json
import warnings

import numpy as np
import pytest
import torch
from activation_helpers import fast_dir  # noqa: F401
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import InputError
from nativemem.memories.activation.relevance import (GENERIC_QA, GENERIC_UNANSWERABLE, RelevanceWarning,
                                                     choose_threshold, expected_calibration_error)
from nativemem.prompting import build_messages

NOTES = ["My cat is named Pixel and she likes boxes.", "My locker code at the gym is 4312.",
         "I was born in Lyon in 1990.", "My sister works as a nurse in Oslo.", "The wifi password is blue-otter-7."]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def fitted(lm, folder, **config):
    mem = nm.open_memory(folder, lm, kind="activation", top_k=3, **config)
    mem.fit_relevance(GENERIC_QA[:30], unanswerable=GENERIC_UNANSWERABLE[:10])
    mem.add(NOTES, user_id="u")
    return mem


def test_fit_stores_a_calibrator_that_survives_reopening(lm, fast_dir):
    mem = fitted(lm, fast_dir / "m")
    state = mem.config.relevance
    assert state["pairs"] == 30 and state["unanswerable"] == 10 and state["variant"] == mem.config.variant
    assert 0.0 <= state["heldout_ece"] <= 1.0 and len(state["coef"]) == len(state["features"])
    hits = mem.search("What is my locker code?", k=3, user_id="u")
    raw = mem.search("What is my locker code?", k=3, user_id="u", relevance=False)
    assert [h.id for h in hits] == [h.id for h in raw] and all(h.relevance is None for h in raw)
    assert all(0.0 <= h.relevance <= 1.0 for h in hits)
    mem.close()
    again = nm.open_memory(fast_dir / "m", lm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelevanceWarning)  # fitted: no refit on reopening
        hits2 = again.search("What is my locker code?", k=3, user_id="u")
    assert [(h.id, h.relevance) for h in hits2] == [(h.id, h.relevance) for h in hits]


def test_the_gate_injects_exactly_the_hits_that_pass(lm, fast_dir):
    mem = fitted(lm, fast_dir / "m")
    question = "Where was I born?"
    rel = sorted(h.relevance for h in mem.search(question, k=3, user_id="u"))
    mem.config.gate_threshold = (rel[0] + rel[1]) / 2  # between the lowest and the middle hit
    chosen = mem.select(question, user_id="u")
    considered = mem.last_selection["hits"]
    assert len(considered) == 3 and len(chosen) == 2
    assert {p["memory_id"] for p in chosen} == {h["id"] for h in considered if h["injected"]}
    for h in considered:
        assert h["injected"] == (h["relevance"] >= mem.config.gate_threshold)
        assert h["injected"] or h["reason"] == "below_threshold"
    mem.config.gate_threshold = 0.0  # 0: every top_k hit, no relevance computed
    assert len(mem.select(question, user_id="u")) == 3
    assert all(h["relevance"] is None for h in mem.last_selection["hits"])


def test_nothing_relevant_gives_the_logits_of_no_memory_bit_for_bit(lm, fast_dir):
    mem = fitted(lm, fast_dir / "m", gate_threshold=1.0)  # no probability reaches 1: nothing passes
    question = "What is the capital of France?"
    ids = lm.chat_ids(build_messages(question))
    with torch.inference_mode():
        bare = lm.logits(ids)
        gated = lm.logits(ids, memory=mem, user_id="u", query=question)
    assert torch.equal(bare, gated)
    assert mem.last_selection["hits"] and not any(h["injected"] for h in mem.last_selection["hits"])
    g = lm.generate(ids, max_new_tokens=5, memory=mem, user_id="u", query=question)
    assert g.prefix_tokens == 0 and g.token_ids == lm.generate(ids, max_new_tokens=5).token_ids
    mem.config.gate_threshold = 0.0  # the same question with the gate off does inject, and changes the logits
    with torch.inference_mode():
        assert not torch.equal(bare, lm.logits(ids, memory=mem, user_id="u", query=question))


def test_an_unfitted_memory_says_it_uses_the_generic_set_and_how_to_fit(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(NOTES, user_id="u")
    with pytest.warns(RelevanceWarning, match=r"built-in generic set.*fit_relevance.*nativemem fit --pairs"):
        hits = mem.search("What is my locker code?", k=2, user_id="u")
    assert all(h.relevance is not None for h in hits)
    assert mem.config.relevance["source"] == "built-in generic set"
    assert mem.config.relevance["pairs"] == len(GENERIC_QA)
    saved = json.loads((fast_dir / "m" / "memory_config.json").read_text())
    assert saved["config"]["relevance"]["source"] == "built-in generic set" if "config" in saved else \
        saved["relevance"]["source"] == "built-in generic set"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelevanceWarning)
        mem.search("What is my locker code?", k=2, user_id="u")


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", True, float("nan")])
def test_a_threshold_outside_0_1_is_refused(lm, fast_dir, value):
    with pytest.raises(InputError, match="gate_threshold must be a number in \\[0, 1\\]"):
        nm.open_memory(fast_dir / "m", lm, kind="activation", gate_threshold=value)


def test_bad_queries_and_too_few_pairs_are_refused(lm, fast_dir):
    mem = fitted(lm, fast_dir / "m")
    for query in ("", "   \n"):
        with pytest.raises(InputError, match="query"):
            mem.search(query, user_id="u")
    with pytest.raises(InputError, match="at least 8"):
        mem.fit_relevance(GENERIC_QA[:3])
    before = mem.config.relevance
    assert mem.config.relevance is before  # a refused fit leaves the calibrator alone


def test_calibration_error_and_threshold_choice():
    p = np.array([0.1] * 10 + [0.9] * 10)
    y = np.array([0] * 9 + [1] + [1] * 9 + [0])
    assert expected_calibration_error(p, y) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9], [0, 0]) == pytest.approx(0.9)
    # question 0 answerable (gold hit 0 scores 0.8), 1 unanswerable (best 0.4), 2 unanswerable (best 0.6)
    t, value = choose_threshold([[0.8, 0.3], [0.4, 0.1], [0.6, 0.2]], [0, -1, -1])
    assert 0.6 < t <= 0.8 and value == pytest.approx(1.0)


def test_a_write_the_disk_cannot_hold_is_refused_before_anything_is_written(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", gate_threshold=0.0)
    mem.add(NOTES[:1], user_id="u")
    mem.config.min_free_bytes = 2**60  # more than any disk has free
    with pytest.raises(InputError, match="not enough free disk space.*MiB free"):
        mem.add(NOTES[1:], user_id="u")
    assert mem.stats()["chunks"] == 1 and len(list((fast_dir / "m" / "segments").iterdir())) == 1
    mem.config.min_free_bytes = 0
    assert len(mem.add(NOTES[1:], user_id="u").ids) == len(NOTES) - 1


def test_stats_say_how_relevance_was_fitted(lm, fast_dir):
    mem = fitted(lm, fast_dir / "m")
    stats = mem.stats()
    assert stats["gate_threshold"] == mem.config.gate_threshold == 0.7 and stats["relevance"]["pairs"] == 30
    assert stats["relevance"]["source"] == "caller's pairs" and 0 <= stats["relevance"]["heldout_ece"] <= 1


def test_an_unknown_option_names_the_valid_ones(lm, fast_dir):
    with pytest.raises(InputError, match=r"unknown activation option\(s\) 'topk' \(did you mean 'top_k'\?\).*valid:"):
        nm.open_memory(fast_dir / "m", lm, kind="activation", topk=3)
    assert not (fast_dir / "m" / "memory_config.json").exists()


def test_the_strict_threshold_rejects_the_share_of_unanswerable_questions_asked():
    from nativemem.memories.activation.relevance import strict_threshold

    # 20 unanswerable questions whose best hits score 0.00 .. 0.95; answerable gold hits at 0.3 and 0.99
    scores = [[i / 20, 0.0] for i in range(20)] + [[0.3, 0.1], [0.99, 0.2]]
    gold = [-1] * 20 + [0, 0]
    t, passing = strict_threshold(scores, gold, reject=0.95)
    assert 0.9 < t <= 0.95 + 1e-9 and sum(max(s) < t for s in scores[:20]) >= 19 and passing == 0.5
    assert strict_threshold(scores, gold, reject=1.0)[0] > 0.95
