"""LoCoMo: loading (date order, chunks, category rules), the official F1, and a run with every arm."""

import json
from pathlib import Path

import pytest
from testing import tiny_lm

from nativemem.bench.tasks.locomo import load_locomo, run_locomo, score_item
from nativemem.bench.tasks.locomo_metric import f1_score, locomo_score, multi_answer_f1, normalize_answer, porter_stem
from nativemem.errors import DataError

FILE = Path(__file__).parent / "data" / "locomo" / "locomo-tiny.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_orders_sessions_by_date_and_applies_question_rules():
    data = load_locomo(FILE, chunk_words=20)
    assert data.skipped == 1 and len(data.items) == 7
    a = [c for c in data.chunks.values() if c.doc_id == "conv-a"]
    sessions = [c.title.split(",")[0] for c in a]
    assert sessions == ["session 1"] * 3 + ["session 2"] * 2  # date order (file order is 2, 1), 20-word chunks
    assert all(c.text.startswith("DATE: ") and "\nCONVERSATION:\n" in c.text for c in a)
    assert 'Anna said, "I adopted a grey cat' in a[3].text and "[shares a photo of a cello]" in a[4].text
    items = {i.question.split(" Use")[0].split(" Select")[0]: i for i in data.items}
    assert items["When did Anna adopt a cat?"].question.endswith("approximate date.")
    adv = items["What instrument did Anna start learning?"]
    assert adv.answers == ("Not mentioned in the conversation",) and "(a)" in adv.question
    assert set(adv.meta["options"].values()) == {"cello", "Not mentioned in the conversation"}
    assert items["Where did Anna move?"].gold_chunk_ids == ("conv-a:S1:0",)
    assert len(items["Where did Anna move?"].source_chunk_ids) == 5


def test_official_metric_rules():
    assert porter_stem("painting") == "paint" and porter_stem("counseling") == "counsel"
    assert normalize_answer("The cat, and a Dog!") == "cat dog"
    assert f1_score("paintings", "a painting") == 1.0
    assert f1_score("Lisbon, Portugal", "Lisbon") == pytest.approx(2 / 3)
    assert multi_answer_f1("baker, nurse", "nurse, baker") == 1.0
    assert multi_answer_f1("nurse", "nurse, baker") == 0.5
    assert locomo_score("psychology", "Psychology; counseling", 3) == 1.0  # only the text before ';'
    assert locomo_score("It is not mentioned.", "cello", 5) == 1.0
    assert locomo_score("cello", "cello", 5) == 0.0
    data = load_locomo(FILE)
    adv = next(i for i in data.items if i.meta["category"] == 5)
    letter = next(k for k, v in adv.meta["options"].items() if v.startswith("Not mentioned"))
    assert score_item(letter, adv) == {"f1": 1.0, "f1_adversarial": 1.0}
    assert score_item(f"({'b' if letter == 'a' else 'a'})", adv)["f1"] == 0.0


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversation": {}, "qa": []}]))
    with pytest.raises(DataError, match="conversation 0: no sessions"):
        load_locomo(bad)


def test_run_locomo_every_arm(tmp_path):
    lm = tiny_lm()
    arms = ["full_context", "rag_bm25", "side_ffn", "side_ffn_ctx", "lora"]
    res = run_locomo(lm, arms=arms, out=tmp_path, data=FILE, k=1, max_new_tokens=4, max_prompt_tokens=300,
                     chunk_words=20, memory_config={"width": 2, "window": 32, "context": 32, "lr": 1e-2},
                     lora_config={"rank": 2, "lr": 1e-2}, progress=False)
    assert res["n"] == 7 and set(res["arms"]) == set(arms)
    for a in arms:
        block = res["arms"][a]
        assert block["scored"] + block["skipped"] == 7
        assert "f1" in block["metrics"] and "f1_single_hop" in block["metrics"]
        assert block["n_per_metric"]["f1_single_hop"] + block["skipped"] >= 3
    assert res["arms"]["side_ffn"]["cost"]["train_steps"] > 0 and res["arms"]["lora"]["cost"]["train_steps"] > 0
    assert res["arms"]["side_ffn"]["cost"]["extra_params"] == 3 * 2 * 32 * 2
    assert "hit@1" in res["arms"]["rag_bm25"]["metrics"]
    assert res["arms"]["full_context"]["cost"]["context_truncated_items"] > 0  # 300-token cap: oldest dropped
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    fc = [r for r in items if r["arm"] == "full_context"]
    assert all(r["context_chunks_kept"] <= r["context_chunks_total"] for r in fc)
    assert any(r["context_truncated"] for r in fc)
    assert all(r["prompt_tokens"] + 4 <= 300 for r in fc if r["context_chunks_kept"])
    assert any(0 < r["context_chunks_kept"] < r["context_chunks_total"] for r in fc)
    assert {c["metric"] for c in res["comparisons"]} >= {"f1", "f1_single_hop"}
