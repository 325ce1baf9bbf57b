"""Activation-memory benchmark arms and the needle / scifact tasks on tiny fixtures and a tiny model."""

import json

import pytest

from nativemem.bench import arms_activation  # noqa: F401  (registers the activation arms)
from nativemem.bench.arms_activation import answer_agreement, fit_texts
from nativemem.bench.results import read_items
from nativemem.bench.runner import run_benchmark
from nativemem.bench.tasks import get_task
from nativemem.bench.tasks.needle import NeedleTask, needle_heatmap, needle_table
from nativemem.bench.tasks.scifact import load_beir, run_scifact
from nativemem.errors import DataError, InputError

ARMS = ["none", "activation", "activation_oracle", "random_memory", "text_same_order"]


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory, tiny_model):
    from bench_fixtures import SQUAD

    root = tmp_path_factory.mktemp("squad")
    data = root / "squad.json"
    data.write_text(json.dumps(SQUAD))
    out = root / "run"
    res = run_benchmark("squad", tiny_model, arms=ARMS, limit=3, out=out, data=data, k=2, max_new_tokens=4,
                        progress=False)
    return res, out


def test_activation_arms_run_and_report_retrieval_and_cost(squad_run):
    res, out = squad_run
    assert list(res["arms"]) == ARMS
    act = res["arms"]["activation"]
    assert "hit@2" in act["metrics"] and act["cost"]["bytes_stored"] > 0
    assert "hit@2" in res["arms"]["text_same_order"]["metrics"]
    assert "hit@2" not in res["arms"]["activation_oracle"]["metrics"]
    records = [r for r in read_items(out) if r["arm"] == "activation"]
    assert all(r["prefix_tokens"] > 0 and len(r["retrieved"]) <= 2 for r in records)
    oracle = [r for r in read_items(out) if r["arm"] == "activation_oracle"]
    assert all(r["prefix_tokens"] > 0 for r in oracle)
    text = {r["item_id"]: r for r in read_items(out) if r["arm"] == "text_same_order"}
    for r in records:  # same retrieval, and the text arm prefills prefix + prompt
        assert text[r["item_id"]]["retrieved"] == r["retrieved"]
        assert text[r["item_id"]]["prompt_tokens"] == r["prompt_tokens"] + r["prefix_tokens"]
    # retrieval arms report their search time and search + TTFT; arms that do not search report neither
    assert all(r["search_s"] > 0 for r in records) and all(r["search_s"] is None for r in oracle)
    cost = act["cost"]
    assert cost["end_to_end_median_s"] >= cost["search_median_s"] > 0
    assert "search_median_s" not in res["arms"]["activation_oracle"]["cost"]


def test_text_same_order_answers_match_activation(squad_run):
    _, out = squad_run
    agreement = answer_agreement(out)
    assert agreement["n"] == 3 and agreement["rate"] == 1.0, agreement


def test_fit_set_is_disjoint_from_the_pool(squad_file):
    task = get_task("squad")(data=squad_file)
    items = task.select(2, 0)
    pool = task.pool_for(items)
    texts = fit_texts(task, pool)
    assert not set(texts) & {c.text for c in pool}


@pytest.fixture
def haystack(tmp_path):
    folder = tmp_path / "hay"
    folder.mkdir()
    for name, topic in (("a.txt", "gardens"), ("b.txt", "rivers"), ("c.txt", "mountains")):
        sentences = [f"Essay {name} sentence {i} is about {topic} and nothing secret." for i in range(40)]
        (folder / name).write_text(" ".join(sentences))
    return folder


def test_needle_items_hide_one_code_per_cell(haystack):
    task = NeedleTask(data=haystack, lengths=[100, 400], depths="0,0.5,1", chunk_chars=200, chars_per_token=4)
    items = task.data.items
    assert len(items) == 6 and {it.meta["length"] for it in items} == {100, 400}
    for it in items:
        gold = task.data.chunks[it.gold_chunk_ids[0]].text
        assert it.answers[0] in gold and f"{it.meta['city']} vault" in it.question
        assert it.gold_chunk_ids[0] in it.source_chunk_ids
        others = [task.data.chunks[c].text for c in it.source_chunk_ids if c != it.gold_chunk_ids[0]]
        assert not any(it.answers[0] in t for t in others)
        assert it.meta["haystack_chars"] >= it.meta["length"] * 4 * 0.8
    deep = next(it for it in items if it.meta["depth"] == 1.0 and it.meta["length"] == 400)
    assert deep.source_chunk_ids[-1] == deep.gold_chunk_ids[0]
    assert task.fit_texts(task.pool_for(items))  # filler beyond the longest haystack
    with pytest.raises(InputError):
        NeedleTask(data=haystack, depths=[1.5])
    with pytest.raises(DataError, match="does not fit"):
        NeedleTask(data=haystack, lengths=[10**6]).data


def test_needle_run_and_heatmap(haystack, tmp_path, tiny_model):
    out = tmp_path / "run"
    run_benchmark("needle", tiny_model, arms=["rag_bm25", "activation"], limit=None, out=out, data=haystack, k=1,
                  max_new_tokens=3, progress=False, lengths=[100, 200], depths=[0.0, 1.0], chunk_chars=200)
    table = needle_table(out)
    assert set(table) == {"rag_bm25", "activation"} and table["activation"]["n"] == 4
    assert set(table["activation"]["cells"]) == {(100, 0.0), (100, 1.0), (200, 0.0), (200, 1.0)}
    md = needle_heatmap(out)
    assert "| activation |" in md and (out / "needle_activation.png").is_file()
    # retrieval_scope = "source": the activation arm only ever retrieves chunks of the item's own haystack
    task = NeedleTask(data=haystack, lengths=[100, 200], depths=[0.0, 1.0], chunk_chars=200)
    sources = {it.id: set(it.source_chunk_ids) for it in task.data.items}
    for rec in read_items(out):
        if rec["arm"] == "activation":
            assert set(rec["retrieved"]) <= sources[rec["item_id"]]


@pytest.fixture
def beir(tmp_path):
    folder = tmp_path / "scifact"
    (folder / "qrels").mkdir(parents=True)
    docs = {f"d{i}": (f"Title {i}", t) for i, t in enumerate([
        "Vitamin D supplements reduce fractures in older adults.", "Aspirin lowers the risk of heart attacks.",
        "Coffee intake is linked to lower liver disease.", "Sleep loss impairs memory consolidation.",
        "Exercise improves insulin sensitivity in muscle.", "Smoking raises the risk of lung cancer.",
        "Green tea has no effect on weight loss.", "Statins reduce cholesterol levels in blood."])}
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": d, "title": t, "text": x})
                                                   for d, (t, x) in docs.items()))
    queries = {"q0": "Does vitamin D prevent fractures?", "q1": "Aspirin and heart attacks",
               "q2": "Is coffee good for the liver?", "q3": "Effects of sleep loss on memory",
               "q4": "Exercise and insulin", "q5": "Smoking and cancer", "q9": "an unjudged query"}
    (folder / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q, "text": t}) for q, t in queries.items()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(6)))
    return folder


def test_beir_loader_and_errors(beir, tmp_path):
    corpus, queries, qrels = load_beir(beir)
    assert len(corpus) == 8 and set(queries) == {f"q{i}" for i in range(6)} and qrels["q2"] == {"d2": 1}
    with pytest.raises(DataError, match="qrels"):
        load_beir(beir, qrels="qrels/test.tsv")
    with pytest.raises(DataError, match="corpus.jsonl"):
        load_beir(tmp_path)


def test_scifact_rankers_on_a_tiny_corpus(beir, tmp_path, tiny_model):
    out = tmp_path / "run"
    res = run_scifact(tiny_model, arms=["bm25", "pooled", "tokens", "hybrid"], data=beir, fit_fraction=0.5,
                      out=out, progress=False)
    assert res["config"]["eval_queries"] == 3 and res["config"]["fit_queries"] == 3
    for name, arm in res["arms"].items():
        assert 0.0 <= arm["metrics"]["nDCG@10"] <= 1.0 and arm["metrics"]["R@100"] == 1.0, name
    assert res["arms"]["bm25"]["metrics"]["nDCG@10"] > 0.5
    assert res["own_states"]["fit"]["retrieval_layer"] in (0, 1)
    assert {c["metric"] for c in res["comparisons"]} == {"nDCG@10", "R@100"}
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3
    with pytest.raises(InputError, match="unknown ranker"):
        run_scifact(tiny_model, arms=["colbert"], data=beir, out=out)


def test_kept_benchmark_memory_is_reused_for_the_same_pool(squad_file, tiny_model, tmp_path, monkeypatch):
    """$NATIVEMEM_BENCH_MEMORY: the pool is written once; a later run opens it (same chunks, no payload
    written); a kept folder that lacks part of the pool is refused."""
    from nativemem.bench.arms_activation import _SHARED, shared_memory

    monkeypatch.setenv("NATIVEMEM_BENCH_MEMORY", str(tmp_path / "kept"))
    task = get_task("squad")(data=squad_file)
    pool = task.pool_for(task.select(3, 0))
    _SHARED.clear()
    first = shared_memory(tiny_model, pool, task, 2)
    folder, by_source = first.folder, first.by_source
    assert folder.parent == tmp_path / "kept" and set(by_source) == {c.id for c in pool}
    stored = sorted((p.name, p.stat().st_size) for p in folder.rglob("*.kv"))
    assert stored
    first.memory.close()
    _SHARED.clear()
    del first
    again = shared_memory(tiny_model, pool, task, 2)
    assert again.folder == folder and again.by_source == by_source
    assert sorted((p.name, p.stat().st_size) for p in folder.rglob("*.kv")) == stored
    again.memory.delete(next(iter(by_source)))
    again.memory.close()
    _SHARED.clear()
    del again
    with pytest.raises(InputError, match="does not hold this pool"):
        shared_memory(tiny_model, pool, task, 2)
    _SHARED.clear()


def test_memory_options_reach_the_benchmark_memory(squad_file, tiny_model, tmp_path):
    from nativemem.bench.arms_activation import _SHARED

    _SHARED.clear()
    res = run_benchmark("squad", tiny_model, arms=["activation"], limit=2, out=tmp_path / "r", data=squad_file, k=1,
                        max_new_tokens=2, progress=False, memory_options={"kv_dtype": "float32"})
    assert res["config"]["memory_options"] == {"kv_dtype": "float32"}
    (shared,) = _SHARED.values()
    assert shared.memory.config.kv_dtype == "float32" and shared.memory.stats()["payload_bytes_per_token"] > \
        shared.memory.geometry.bytes_per_token("float16")
    _SHARED.clear()
    with pytest.raises(InputError, match="kv_dtype"):
        run_benchmark("squad", tiny_model, arms=["activation"], limit=1, out=tmp_path / "x", data=squad_file, k=1,
                      progress=False, memory_options={"kv_dtype": "int3"})
    _SHARED.clear()


def test_the_gated_arm_injects_what_the_memory_selects(squad_file, tiny_model):
    from nativemem.bench.arms import get_arm

    task = get_task("squad")(data=squad_file)
    items = task.select(2, seed=0)
    pool = task.pool_for(items)
    arms = {}
    for label, name, options in (("fixed", "activation", {}), ("open", "activation_gated", {"gate_threshold": 0.0}),
                                 ("shut", "activation_gated", {"gate_threshold": 2.0})):
        arms[label] = get_arm(name)(k=2, max_new_tokens=3, options=options)
        arms[label].prepare(pool, tiny_model, items=items, task=task)
    for item in items:
        fixed, open_, shut = (arms[a].answer(item) for a in ("fixed", "open", "shut"))
        # gate open: the memory's own choice is the activation arm's top k, so the same prefix and answer
        assert [c for c, _ in open_.retrieved] == [c for c, _ in fixed.retrieved]
        assert (open_.prefix_tokens, open_.text) == (fixed.prefix_tokens, fixed.text) and fixed.prefix_tokens > 0
        # gate shut: nothing injected, every hit considered is recorded as refused
        assert shut.prefix_tokens == 0 and shut.retrieved == ()
        assert arms["shut"].last_info["hits"] and not any(h["injected"] for h in arms["shut"].last_info["hits"])
    assert arms["open"].memory.config.gate_threshold == arms["shut"].memory.config.gate_threshold  # restored
