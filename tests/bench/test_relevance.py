"""The relevance benchmark end to end on a tiny model and a small synthetic SQuAD-format file."""

import json
from pathlib import Path

import pytest

from nativemem.bench.relevance import ARMS, run_relevance
from nativemem.bench.results import read_items, validate_results
from nativemem.errors import InputError

MMLU = Path(__file__).parent / "data" / "mmlu"
THINGS = ["lamp", "kettle", "violin", "garden", "bridge", "harbour"]
PLACES = ["Tollen", "Brisk", "Orrin", "Velm", "Quell", "Saltmarrow", "Amber", "Delac"]


def synthetic_squad(path: Path) -> Path:
    data = []
    for a, thing in enumerate(THINGS):
        paragraphs = []
        for p in range(4):
            place, year = PLACES[(a + p) % len(PLACES)], 1900 + 7 * a + p
            context = (f"The {thing} number {p} of article {a} was built in {place} in {year}. "
                       f"It is painted {['red', 'blue', 'green', 'white'][p]}.")
            qas = [{"id": f"{a}-{p}-0", "question": f"Where was the {thing} number {p} built?",
                    "answers": [{"text": place, "answer_start": 0}]},
                   {"id": f"{a}-{p}-1", "question": f"When was the {thing} number {p} built?",
                    "answers": [{"text": str(year), "answer_start": 0}]}]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"The {thing}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"data": data}), encoding="utf-8")
    return path


def test_relevance_run_answers_like_none_whenever_a_gated_arm_injects_nothing(tiny_model, tmp_path):
    data = synthetic_squad(tmp_path / "squad.json")
    res = run_relevance(tiny_model, out=tmp_path / "out", data=data, mmlu=MMLU, limit=8, k=2, max_new_tokens=3,
                        pool_articles=2, fit_articles=2, fit_pairs=16, progress=False)
    validate_results(res)
    assert res["counts"] == {"answerable": 4, "other_article": 2, "general": 2} and set(res["arms"]) == set(ARMS)
    m = {arm: block["metrics"] for arm, block in res["arms"].items()}
    assert m["none"]["agree_none_unanswerable"] == 1.0 and m["none"]["inject_rate_answerable"] == 0.0
    assert m["activation"]["inject_rate_answerable"] == 1.0 == m["activation"]["inject_rate_unanswerable"]
    assert m["activation_gated"]["inject_rate_unanswerable"] <= m["activation"]["inject_rate_unanswerable"]
    assert 0.0 <= res["config"]["gate_threshold"] <= 1.0 and res["relevance_fit"]["pairs"] == 16
    assert res["calibration_test"]["hits"] == 8 * 2 and 0.0 <= res["calibration_test"]["ece"] <= 1.0
    records = read_items(tmp_path / "out")
    assert len(records) == 8
    for rec in records:
        for arm in ("activation_gated", "rag_bm25_gated"):
            if rec["arms"][arm]["injected"] == 0:  # nothing passed: the closed-book answer, token for token
                assert rec["arms"][arm]["raw_output"] == rec["arms"]["none"]["raw_output"], (arm, rec["id"])
        gated = rec["arms"]["activation_gated"]
        assert gated["injected"] == sum(h["injected"] for h in gated["hits"])
        assert all(h["injected"] == (h["relevance"] >= res["config"]["gate_threshold"]) for h in gated["hits"])
    with pytest.raises(InputError, match="unknown relevance arms"):
        run_relevance(tiny_model, out=tmp_path / "x", data=data, mmlu=MMLU, arms=["activation", "lora"])
    with pytest.raises(InputError, match="lower --limit"):
        run_relevance(tiny_model, out=tmp_path / "x", data=data, mmlu=MMLU, limit=400, pool_articles=2,
                      fit_articles=2)


def test_relevance_with_the_poisoning_set_reports_what_went_in_and_out(tiny_model, tmp_path):
    data = synthetic_squad(tmp_path / "squad.json")
    res = run_relevance(tiny_model, out=tmp_path / "out", data=data, mmlu=MMLU, limit=8, k=2, max_new_tokens=3,
                        pool_articles=2, fit_articles=2, fit_pairs=16, arms=["none", "activation", "rag_bm25"],
                        poison=True, progress=False)
    assert res["config"]["poison"] is True
    assert res["arms"]["none"]["metrics"]["poison_injected_rate"] == 0.0  # nothing goes in without memory
    items = read_items(tmp_path / "out")
    for item in items:
        for arm, a in item["arms"].items():
            went_in = [h for h in a["hits"] or [] if h.get("injected", True)][: a["injected"]]
            assert a["poison_injected"] == float(any(str(h.get("source_id") or h["id"]).startswith("poison:")
                                                     for h in went_in))
    # the ungated memory injects its top k for every question: with 12 poisoning notes among 8 paragraphs, some go in
    assert res["arms"]["activation"]["metrics"]["poison_injected_rate"] > 0
