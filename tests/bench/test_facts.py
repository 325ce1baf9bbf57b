"""The facts benchmark on fixtures: a tiny model, a tiny data folder written per test, every arm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testing import tiny_lm

from nativemem.bench import list_tasks, run_benchmark
from nativemem.bench.arms import get_arm, list_arms
from nativemem.bench.results import load_results, read_items
from nativemem.bench.tasks.facts import (FactsTask, forward_overhead, mmlu_items, neutral_passages,
                                         run_facts_benchmark)
from nativemem.errors import DataError, InputError, UnknownNameError
from nativemem.hooks import count_hooks
from nativemem.memories.pkm import generate_facts, save_facts

TINY_PKM = dict(layers=[0, 1], num_keys=16, heads=2, top_k=4, key_dim=16, lr=0.1, batch_size=4, max_epochs=40,
                gate_steps=50, phrasings=1)  # a random width-32 model does not hold several phrasings of its facts
PROSE = ("The harbour was quiet in the early morning and the boats rocked gently against the pier while gulls "
         "circled above the market square. ")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """PG-19 (with licence header/footer), haystack essays and MMLU dev/test, a few records each."""
    root = tmp_path / "data"
    (root / "pg19").mkdir(parents=True)
    header = "The Project Gutenberg eBook of Nothing\n\n*** START OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\n"
    footer = "\n*** END OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\nLicence text that must not be scored.\n"
    (root / "pg19" / "1.txt").write_text(header + " ".join(f"Day {i}. {PROSE}" for i in range(12)) + footer)
    (root / "haystack").mkdir()
    for name in ("a", "b", "c"):
        (root / "haystack" / f"{name}.txt").write_text(" ".join(f"Essay {name}, part {i}. {PROSE}" for i in range(6)))
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True)
        rows = ["question,choice0,choice1,choice2,choice3,answer"]
        rows += [f"What is {i} plus {i}?,{2 * i},{i},{3 * i},0,0" for i in range(1, 7)]
        (root / "mmlu" / split / f"arithmetic_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(initializer_range=0.2)


def test_data_helpers_split_and_validate(data_dir):
    eval_p = neutral_passages(data_dir, words=20, count=4, split="eval")
    gate_p = neutral_passages(data_dir, words=20, count=4, split="gate")
    assert len(eval_p) == 4 and {p["source"] for p in eval_p} == {"pg19", "haystack"}
    assert not {p["text"] for p in eval_p} & {p["text"] for p in gate_p}  # disjoint splits
    assert not {p["id"] for p in eval_p} & {p["id"] for p in gate_p}
    assert all("Licence" not in p["text"] and "Gutenberg" not in p["text"] for p in eval_p + gate_p)
    items = mmlu_items(data_dir, split="test", limit=4)
    assert len(items) == 4 and all(len(q["choices"]) == 4 and q["answer"] == 0 for q in items)
    with pytest.raises(DataError):
        mmlu_items(data_dir / "nowhere")
    with pytest.raises(DataError):
        neutral_passages(data_dir / "nowhere")


def test_facts_registers_a_qa_task_that_the_generic_runner_runs(lm, tmp_path):
    assert "facts" in list_tasks()
    task = FactsTask(num_facts=6, paraphrases=1)
    assert len(task.data.items) == 12 and len(task.data.chunks) == 6
    res = run_benchmark("facts", lm, arms=["none", "rag_bm25"], limit=4, out=tmp_path / "qa", progress=False,
                        num_facts=6, paraphrases=1)
    assert res["n"] == 4 and set(res["arms"]) == {"none", "rag_bm25"}
    assert res["arms"]["rag_bm25"]["metrics"]["hit@3"] is not None


def test_run_facts_benchmark_end_to_end(lm, data_dir, tmp_path):
    out = tmp_path / "run"
    res = run_facts_benchmark(lm, arms=["pkm", "pkm_gated", "rag_bm25"], num_facts=4, out=out, data_dir=data_dir,
                              paraphrase_limit=2, ppl_passages=2, passage_words=20, mmlu_limit=3, gate_passages=2,
                              gate_questions=4, max_new_tokens=40, memory_options=TINY_PKM, progress=False)
    assert res["config"]["arms"] == ["none", "pkm", "pkm_gated", "rag_bm25"]
    arms = load_results(out)["arms"]
    none, pkm, gated = arms["none"]["metrics"], arms["pkm"]["metrics"], arms["pkm_gated"]["metrics"]
    assert none["recall"] == 0.0 and none["ppl_drift"] == 0.0 and none["qa_drift"] == 0.0 and none["mmlu_agree"] == 1.0
    assert pkm["recall"] == 1.0  # trained until recalled; greedy generation reproduces every answer
    for m in (pkm, gated):
        assert set(m) >= {"recall", "recall_contains", "recall_paraphrase", "ppl", "ppl_drift", "mmlu_acc",
                          "mmlu_agree", "qa_drift"}
    cost = arms["pkm"]["cost"]
    assert cost["train_s_per_fact"] > 0 and cost["bytes_per_fact"] > 0 and cost["pool_slots"] == 256
    assert cost["forward_overhead_512"]["tokens"] == 512
    assert arms["pkm_gated"]["cost"]["train_s"] == cost["train_s"]  # one training, shared
    assert arms["rag_bm25"]["cost"]["bytes_stored"] > 0
    metrics = {(c["a"], c["b"], c["metric"]) for c in res["comparisons"]}
    assert ("pkm", "none", "recall") in metrics and ("pkm_gated", "pkm", "mmlu_acc") in metrics
    assert ("pkm_gated", "none", "passage_nll") in metrics
    items = read_items(out)
    kinds = {(r["arm"], r["kind"]) for r in items}
    assert ("pkm", "recall") in kinds and ("pkm_gated", "ppl") in kinds and ("rag_bm25", "mmlu") in kinds
    asked = [r for r in items if r["arm"] == "none" and r["kind"] == "recall"]
    assert [sum(r["phrasing"] == p for r in asked) for p in ("training", "paraphrase")] == [4, 2]
    reverse = [r for r in asked if r["phrasing"] == "reverse"]  # the paraphrased facts with a reverse question
    assert len(reverse) == sum(1 for r in asked if r["phrasing"] == "paraphrase" and r["item_id"] in
                               {f.id for f in generate_facts(4) if "reverse" in f.meta})
    assert "recall_reverse" in pkm
    assert count_hooks(lm.model) == 0


def test_a_facts_file_and_unknown_arms(lm, data_dir, tmp_path):
    path = save_facts(generate_facts(3, seed=8), tmp_path / "f.jsonl")
    with pytest.raises(UnknownNameError, match="pkm"):
        run_facts_benchmark(lm, arms=["pkn"], out=tmp_path / "x", data_dir=data_dir, progress=False)
    res = run_facts_benchmark(lm, arms=["rag_bm25"], num_facts=2, data=path, out=tmp_path / "f", data_dir=data_dir,
                              paraphrase_limit=0, ppl_passages=2, passage_words=20, mmlu_limit=2, gate_passages=0,
                              gate_questions=0, overhead=False, progress=False)
    assert res["n"] == 2 and res["arms"]["rag_bm25"]["metrics"]["recall_paraphrase"] is None
    assert json.loads((tmp_path / "f" / "results.json").read_text())["config"]["data"] == str(path)


def test_the_side_ffn_and_lora_arms_take_their_options(lm, data_dir, tmp_path):
    common = dict(num_facts=2, data_dir=data_dir, paraphrase_limit=1, ppl_passages=1, passage_words=20, mmlu_limit=1,
                  gate_passages=0, gate_questions=0, max_new_tokens=4, overhead=False, progress=False,
                  memory_options={"phrasings": 2, "max_epochs": 2, "batch_size": 4})
    sizes = []
    for width, rank in ((2, 1), (4, 2)):
        res = run_facts_benchmark(lm, arms=["side_ffn", "lora"], out=tmp_path / f"w{width}", baseline_lr=0.05,
                                  side_ffn_options={"width": width, "layers": [1]}, lora_rank=rank, **common)
        side, lora = res["arms"]["side_ffn"]["cost"], res["arms"]["lora"]["cost"]
        assert side["phrasings"] == lora["phrasings"] == 2 and side["epochs"] <= 2
        sizes.append((side["parameters"], lora["parameters"]))
    assert sizes[1][0] == 2 * sizes[0][0] and sizes[1][1] == 2 * sizes[0][1]  # width and rank reached the arms
    assert count_hooks(lm.model) == 0


def test_forward_overhead_reports_both_times(lm):
    from nativemem.memories.pkm import PKMConfig, PKMMemory

    mem = PKMMemory(lm, PKMConfig(**{**TINY_PKM, "max_epochs": 2}))
    mem.add(generate_facts(1))
    r = forward_overhead(lm, mem, tokens=64, reps=2)
    assert r["bare_s"] > 0 and r["memory_s"] > 0 and r["tokens"] == 64


def test_optional_arms_are_registered_when_their_kinds_exist():
    assert {"none", "pkm", "pkm_gated", "rag_bm25"} <= set(list_arms())
    with pytest.raises(UnknownNameError):
        get_arm("nope")


def test_one_arm_interface_serves_the_facts_task_in_the_qa_runner(lm, tmp_path):
    # the pkm and lora arms the facts benchmark uses answer the QA runner on the same facts
    res = run_benchmark("facts", lm, arms=["pkm_gated", "lora"], limit=3, out=tmp_path / "qa", progress=False,
                        num_facts=3, memory_options={**TINY_PKM, "max_epochs": 3})
    assert set(res["arms"]) == {"pkm_gated", "lora"} and res["arms"]["pkm_gated"]["scored"] == 3
    assert count_hooks(lm.model) == 0 and not [n for n, _ in lm.model.named_parameters() if "lora_" in n]
    with pytest.raises(InputError, match="facts task"):  # pkm learns facts, not documents
        get_arm("pkm")().prepare([], lm, items=[], task=object())
