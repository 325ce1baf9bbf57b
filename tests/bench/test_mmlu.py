"""MMLU drift: the fixed seeded subset, 5-shot prompts, letter logits, before/after a memorised book."""

import json
from pathlib import Path

import pytest
import torch
from testing import tiny_lm

from nativemem.bench.tasks.mmlu import _Scorer, build_prompt, load_mmlu, run_mmlu, select_items
from nativemem.bench.tasks.pg19 import run_pg19
from nativemem.errors import DataError, FingerprintMismatchError, InputError

DATA = Path(__file__).parent / "data" / "mmlu"
BOOK = ("The keeper of the lighthouse wrote in his log every night. The ships passed, the wind turned, and the "
        "lamp burned until dawn. ") * 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(BOOK)
    return path


def test_subset_is_fixed_and_prompts_are_standard():
    dev, test = load_mmlu(DATA)
    assert sorted(test) == ["toy_colors", "toy_numbers"]  # a subject without dev questions is left out
    a, b = select_items(test, 2, seed=3), select_items(test, 2, seed=3)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 4
    prefix, question = build_prompt(test["toy_numbers"][2], dev["toy_numbers"])
    assert prefix.startswith("The following are multiple choice questions (with answers) about toy numbers.\n\n")
    assert prefix.count("Answer: ") == 5 and "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n" in prefix
    assert question == "What is 8 + 8, written in digits?\nA. 15\nB. 17\nC. 16\nD. 18\nAnswer:"
    with pytest.raises(DataError, match="dev/ and test/"):
        load_mmlu(DATA / "dev")


def test_prefix_cache_gives_the_same_letter_logits():
    lm = tiny_lm(max_context=2048)
    dev, test = load_mmlu(DATA)
    prefix, question = build_prompt(test["toy_colors"][0], dev["toy_colors"])
    cached = _Scorer(lm)
    cached.letter_logprobs(prefix, "Dummy question?\nAnswer:")  # fills the prefix cache
    fresh = _Scorer(lm)
    fresh_lp = torch.log_softmax(lm.model(**lm.tokenizer(prefix + question, return_tensors="pt")).logits[0, -1]
                                 [fresh.letter_ids], dim=-1)
    assert torch.allclose(cached.letter_logprobs(prefix, question), fresh_lp.detach(), atol=1e-4)


def test_run_mmlu_before_and_after_a_book(tmp_path, book):
    lm = tiny_lm(max_context=300)
    res = run_mmlu(lm, out=tmp_path / "run", data=DATA, per_subject=3, book=book, window=32, context=32, width=2,
                   lr=1e-2, lora_rank=2, lora_lr=1e-2, progress=False)
    assert res["n"] == 6 and set(res["arms"]) == {"none", "side_ffn", "lora"}
    for a in ("side_ffn", "lora"):  # each learnt the book, and its answers are scored like the bare model's
        cost = res["arms"][a]["cost"]
        assert cost["train_steps"] > 0 and cost["train_tokens"] > 0 and cost["extra_params"] > 0
        assert set(res["arms"][a]["metrics"]) == {"accuracy", "logprob_correct"}
    items = [json.loads(line) for line in (tmp_path / "run" / "items.jsonl").read_text().splitlines()]
    assert any(r["shots"] < 5 for r in items) and all(r["prompt_tokens"] <= 300 for r in items)  # shots dropped
    assert all(r["output"] in "ABCD" and r["metrics"]["accuracy"] == float(r["output"] == r["answers"][0])
               for r in items)
    # the none arm's log-probabilities are those of the bare model, the memory arms' are not
    dev, test = load_mmlu(DATA)
    first = next(r for r in items if r["arm"] == "none")
    q = next(q for q in test[first["meta"]["subject"]] if q.id == first["item_id"])
    lp = _Scorer(lm).letter_logprobs(*build_prompt(q, dev[q.subject][5 - first["shots"]:]))
    assert first["metrics"]["logprob_correct"] == pytest.approx(float(lp[q.answer]), abs=1e-5)
    by_arm = {a: [r["metrics"]["logprob_correct"] for r in items if r["arm"] == a] for a in res["arms"]}
    assert by_arm["side_ffn"] != by_arm["none"] and by_arm["lora"] != by_arm["none"]
    comp = {(c["a"], c["b"], c["metric"]): c for c in res["comparisons"]}
    assert comp[("none", "side_ffn", "accuracy")]["test"] == "mcnemar_exact"
    assert comp[("none", "side_ffn", "accuracy")]["n"] == 6


def test_states_saved_by_pg19_are_reused(tmp_path, book):
    lm = tiny_lm()
    pg = run_pg19(lm, out=tmp_path / "pg", data=book, arms=["side_ffn", "lora"], window=32, context=32, width=2,
             lora_rank=2, progress=False, save_dir=str(tmp_path / "states"))
    res = run_mmlu(lm, out=tmp_path / "mm", data=DATA, per_subject=1, arms=["none", "side_ffn", "lora"],
                   side_ffn_memory=tmp_path / "states" / "side_ffn-book", lora_state=tmp_path / "states" / "lora-book",
                   progress=False)
    assert res["config"]["arm_options"]["side_ffn_memory"].endswith("side_ffn-book")
    # the saved memory knows what it was trained on (the steps and tokens pg19 reported)
    assert res["arms"]["side_ffn"]["cost"]["train_steps"] == pg["arms"]["side_ffn"]["cost"]["steps"] > 0
    assert res["arms"]["side_ffn"]["cost"]["train_tokens"] == pg["books"][0]["tokens"]
    assert res["arms"]["lora"]["cost"]["extra_params"] == pg["arms"]["lora"]["cost"]["extra_params"] > 0
    with pytest.raises(FingerprintMismatchError):
        run_mmlu(tiny_lm(seed=3), out=tmp_path / "x", data=DATA, per_subject=1, arms=["lora"],
                 lora_state=tmp_path / "states" / "lora-book", progress=False)
    with pytest.raises(InputError, match="book=PATH"):
        run_mmlu(lm, out=tmp_path / "y", data=DATA, per_subject=1, arms=["side_ffn"], progress=False)


def test_the_runner_runs_mmlu_and_memory_arms_without_a_book_say_what_is_missing(tmp_path):
    from nativemem.bench import run_benchmark

    lm = tiny_lm(max_context=2048)
    res = run_benchmark("mmlu", lm, arms=["none"], limit=3, out=tmp_path / "r", data=DATA, per_subject=2,
                        progress=False)
    assert res["n"] == 3 and res["config"]["task_options"] == {"per_subject": 2, "shots": 5, "book": None}
    assert res["arms"]["none"]["scored"] == 3 and res["arms"]["none"]["metrics"]["logprob_correct"] < 0
    with pytest.raises(InputError, match="documents or facts"):
        run_benchmark("mmlu", lm, arms=["side_ffn"], limit=1, out=tmp_path / "s", data=DATA, progress=False)
