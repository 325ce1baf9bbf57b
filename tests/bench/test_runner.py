"""End-to-end runs with the tiny random model: files, schema, skips, comparisons, report."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import SQUAD, TRIVIAQA_FILE

from nativemem.bench import ArmOutput, report, run_benchmark
from nativemem.bench.results import ITEMS_NAME, RESULTS_NAME, load_results, read_items
from nativemem.errors import DataError, InputError, UnknownNameError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """One run shared by the schema tests: 4 items, three arms."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "squad.json"
    data.write_text(json.dumps(SQUAD))
    out = root / "run"
    run_benchmark("squad", tiny_model, arms=["none", "rag_bm25", "long_context"], limit=4, out=out, data=data,
                  max_new_tokens=4, progress=False)
    return out


def test_results_schema(run_dir, tiny_model):
    res = json.loads((run_dir / RESULTS_NAME).read_text())
    for key in ("task", "model", "created", "n", "seed", "arms", "comparisons", "config"):
        assert key in res
    assert res["task"] == "squad" and res["n"] == 4 and res["seed"] == 0
    assert res["model"] == json.loads(json.dumps(tiny_model.fingerprint.to_dict()))
    cfg = res["config"]
    assert cfg["limit"] == 4 and cfg["k"] == 3 and cfg["max_new_tokens"] == 4
    assert cfg["arms"] == ["none", "rag_bm25", "long_context"] and cfg["data"].endswith("squad.json")
    assert cfg["version"]
    for arm in cfg["arms"]:
        block = res["arms"][arm]
        assert block["n"] == 4 and block["skipped"] == 0 and block["skipped_reasons"] == {}
        for metric in ("em", "f1", "contains"):
            assert 0.0 <= block["metrics"][metric] <= 1.0
            low, high = block["ci95"][metric]
            assert low <= block["metrics"][metric] <= high
        for key in ("ttft_median_s", "prompt_tokens_mean", "prompt_tokens_median", "peak_rss_bytes", "wall_s",
                    "bytes_stored"):
            assert block["cost"][key] is not None
    assert res["arms"]["none"]["cost"]["bytes_stored"] == 0
    assert res["arms"]["rag_bm25"]["cost"]["bytes_stored"] > 0
    # retrieval metrics only for the retrieval arm; the tiny pool is retrieved from perfectly
    assert "hit@3" in res["arms"]["rag_bm25"]["metrics"] and "hit@3" not in res["arms"]["none"]["metrics"]
    assert "ndcg@3" in res["arms"]["rag_bm25"]["metrics"]
    # prompts with context are longer than the question alone
    cost = {a: res["arms"][a]["cost"]["prompt_tokens_mean"] for a in cfg["arms"]}
    assert cost["none"] < cost["rag_bm25"] and cost["none"] < cost["long_context"]


def test_comparisons_cover_every_pair_and_metric(run_dir):
    res = load_results(run_dir)
    pairs = {(c["a"], c["b"], c["metric"]) for c in res["comparisons"]}
    for a, b in (("none", "rag_bm25"), ("none", "long_context"), ("rag_bm25", "long_context")):
        for metric in ("em", "f1", "contains"):
            assert (a, b, metric) in pairs
    assert not any(c["metric"].startswith("hit@") for c in res["comparisons"])  # only one arm has it
    for c in res["comparisons"]:
        assert c["n"] == 4 and 0.0 <= c["p_value"] <= 1.0 and len(c["ci95"]) == 2


def test_items_jsonl(run_dir):
    records = read_items(run_dir)
    assert len(records) == 12
    first = records[0]
    for key in ("arm", "item_id", "question", "answers", "output", "raw_output", "metrics", "ttft_s",
                "prompt_tokens", "skipped", "retrieved"):
        assert key in first
    bm25 = [r for r in records if r["arm"] == "rag_bm25"]
    assert all(len(r["retrieved"]) == 3 for r in bm25)
    # items appear in the seeded order, the same for each arm
    order = [r["item_id"] for r in records if r["arm"] == "none"]
    assert order == [r["item_id"] for r in bm25]


def test_report_writes_markdown_and_png(run_dir, tmp_path):
    text = report([run_dir], out=tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    assert "| squad | tiny-llama | rag_bm25 | 4 |" in text
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f"]({p.name})" in text for p in pngs)


def test_report_rejects_folder_without_results(tmp_path):
    with pytest.raises(DataError, match="no results file"):
        report([tmp_path])


def test_prompts_that_do_not_fit_are_skipped_and_counted(squad_file, tmp_path, tiny_model):
    from testing import tiny_lm

    from nativemem.prompting import build_messages
    from nativemem.bench.tasks.squad import SquadTask

    # a window that fits every question alone but no whole article (measured with the same tokenizer)
    task = SquadTask(squad_file)
    items = task.select(3, seed=0)
    closed = max(tiny_model.chat_ids(build_messages(i.question)).shape[1] for i in items)
    full = min(tiny_model.chat_ids(build_messages(i.question, [c.text for c in task.source_of(i)])).shape[1]
               for i in items)
    assert closed < full
    window = closed + 4
    lm = tiny_lm(max_context=window)
    res = run_benchmark("squad", lm, arms=["none", "long_context"], limit=3, out=tmp_path, data=squad_file,
                        max_new_tokens=4, progress=False)
    long_ctx = res["arms"]["long_context"]
    assert long_ctx["skipped"] == 3 and long_ctx["skipped_reasons"] == {"context_overflow": 3}
    assert long_ctx["scored"] == 0 and long_ctx["metrics"]["em"] is None
    assert res["arms"]["none"]["skipped"] == 0 and res["arms"]["none"]["scored"] == 3
    skipped = [r for r in read_items(tmp_path) if r["arm"] == "long_context"]
    assert all(r["skipped"] and f"window of {window} tokens" in r["skip_detail"] for r in skipped)
    assert all(r["prompt_tokens"] + 4 > window for r in skipped)
    em = next(c for c in res["comparisons"] if c["metric"] == "em")
    assert em["n"] == 0 and em["p_value"] is None  # paired only over items both arms scored


def test_paired_n_counts_items_scored_by_both(squad_file, tmp_path, tiny_model):
    from nativemem.bench.arms import NoContextArm

    def flaky(self, item):  # skip one chosen item
        if item.id == "b1":
            return ArmOutput(skip_reason="test_reason", skip_detail="skipped on purpose")
        return NoContextArm.answer(self, item)

    from nativemem.bench import register_arm
    from nativemem.bench.arms import _ARMS

    register_arm("flaky_test", replace=True)(type("FlakyArm", (NoContextArm,), {"answer": flaky}))
    try:
        res = run_benchmark("squad", tiny_model, arms=["none", "flaky_test"], limit=None, out=tmp_path,
                            data=squad_file, max_new_tokens=2, progress=False)
    finally:
        _ARMS.unregister("flaky_test")
    assert res["arms"]["flaky_test"]["skipped_reasons"] == {"test_reason": 1}
    assert all(c["n"] == 5 for c in res["comparisons"])  # 6 items, one skipped by flaky_test


def test_unknown_arm_and_bad_arguments(squad_file, tmp_path, tiny_model):
    with pytest.raises(UnknownNameError, match="Did you mean 'long_context'"):
        run_benchmark("squad", tiny_model, arms=["none", "long_contxt"], limit=1, out=tmp_path, data=squad_file)
    with pytest.raises(UnknownNameError, match="squad"):
        run_benchmark("squat", tiny_model, arms=["none"], limit=1, out=tmp_path, data=squad_file)
    with pytest.raises(InputError):
        run_benchmark("squad", tiny_model, arms=["none"], limit=1, out=tmp_path, data=squad_file, k=0)
    with pytest.raises(InputError, match="evidence_dir"):
        run_benchmark("triviaqa", tiny_model, arms=["none"], limit=1, out=tmp_path, data=TRIVIAQA_FILE, evidnce=1)
    with pytest.raises(DataError):
        run_benchmark("squad", tiny_model, arms=["none"], limit=1, out=tmp_path, data=tmp_path / "missing.json")
    assert not (tmp_path / RESULTS_NAME).exists() and not (tmp_path / ITEMS_NAME).exists()


def test_triviaqa_end_to_end(tmp_path, tiny_model):
    res = run_benchmark("triviaqa", tiny_model, arms=["none", "rag_bm25"], limit=None, out=tmp_path,
                        data=TRIVIAQA_FILE, max_new_tokens=2, progress=False, max_chunk_words=40)
    assert res["n"] == 2 and res["config"]["task_options"]["max_chunk_words"] == 40
    assert "hit@3" not in res["arms"]["rag_bm25"]["metrics"]  # no gold paragraphs in TriviaQA


def test_dense_arm_with_real_minilm(squad_file, tmp_path, tiny_model):
    res = run_benchmark("squad", tiny_model, arms=["rag_dense"], limit=3, out=tmp_path, data=squad_file, k=1,
                        max_new_tokens=2, progress=False)
    block = res["arms"]["rag_dense"]
    assert block["cost"]["bytes_stored"] == res["config"]["pool_size"] * 384 * 4  # float32 MiniLM embeddings
    assert 0.0 <= block["metrics"]["hit@1"] <= 1.0


def test_memory_arms_are_known_without_importing_their_modules():
    import subprocess
    import sys

    code = ("from nativemem.bench import get_arm, list_arms; import sys; "
            "assert 'nativemem.bench.arms_activation' not in sys.modules; "
            "names = list_arms(); assert {'activation', 'text_same_order', 'side_ffn', 'lora'} <= set(names), names; "
            "cls = get_arm('text_same_order'); print(cls.__module__, cls.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nativemem.bench.arms_activation", "text_same_order"]


def test_merging_runs_of_other_arms_equals_one_run_of_all_arms(run_dir, tiny_model, tmp_path):
    """Arms run in separate processes, merged: same arm blocks, and the same paired comparisons as the
    run that had every arm (they are recomputed from the per-item scores)."""
    from nativemem.bench import merge_runs

    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD))
    whole = load_results(run_dir)
    parts = []
    for arms in (["none"], ["rag_bm25", "long_context"]):
        parts.append(tmp_path / "+".join(arms))
        run_benchmark("squad", tiny_model, arms=arms, limit=4, out=parts[-1], data=run_dir.parent / "squad.json",
                      max_new_tokens=4, progress=False)
    merged = merge_runs(parts, tmp_path / "merged")
    assert list(merged["arms"]) == ["none", "rag_bm25", "long_context"]
    for arm in merged["arms"]:
        assert merged["arms"][arm]["metrics"] == whole["arms"][arm]["metrics"]
    assert merged["comparisons"] == whole["comparisons"]
    assert {r["arm"] for r in read_items(tmp_path / "merged")} == set(merged["arms"])
    assert "| none |" in report([tmp_path / "merged"])

    run_benchmark("squad", tiny_model, arms=["none"], limit=3, out=tmp_path / "three",
                  data=data, max_new_tokens=4, progress=False)
    with pytest.raises(InputError, match="cannot merge"):  # other items
        merge_runs([parts[1], tmp_path / "three"], tmp_path / "bad")
    with pytest.raises(InputError, match="also in another run"):
        merge_runs([parts[0], parts[0]], tmp_path / "bad")


def test_merging_one_arm_run_with_two_memory_configs_keeps_both(tiny_model, tmp_path):
    """The same memory arm under two memory configs (e.g. payload precisions) merges as two arms."""
    from nativemem.bench import merge_runs
    from nativemem.bench.arms_activation import _SHARED

    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD))
    runs = []
    for kv in ("float32", "int4"):
        _SHARED.clear()
        runs.append(tmp_path / kv)
        run_benchmark("squad", tiny_model, arms=["activation"], limit=3, out=runs[-1], data=data, k=1,
                      max_new_tokens=3, progress=False, memory_options={"kv_dtype": kv})
    _SHARED.clear()
    merged = merge_runs(runs, tmp_path / "merged")
    assert list(merged["arms"]) == ["activation", "activation[kv_dtype=int4]"]
    assert merged["config"]["memory_options_by_arm"] == {"activation": {"kv_dtype": "float32"},
                                                         "activation[kv_dtype=int4]": {"kv_dtype": "int4"}}
    assert {c["a"] for c in merged["comparisons"]} | {c["b"] for c in merged["comparisons"]} == set(merged["arms"])
    assert {r["arm"] for r in read_items(tmp_path / "merged")} == set(merged["arms"])
