"""`nativemem bench conversation` on a tiny model: facts remembered in one chat, asked in a new one."""

import json

from testing import tiny_lm

from nativemem.bench.conversation import FACTS, run_conversation


def test_conversation_bench_writes_paired_results_and_the_write_cost(tmp_path):
    res = run_conversation(tiny_lm(), out=tmp_path, limit=4, max_new_tokens=3, progress=False)
    assert res["n"] == 4 and set(res["arms"]) == {"none", "remembered", "remembered_separate"}
    assert res["comparisons"]["remembered_vs_none"]["n"] == 4
    assert res["comparisons"]["remembered_vs_remembered_separate"]["n"] == 4
    w = res["write"]
    assert w["write_s_median"] > 0 and w["turn_s_median"] > 0 and w["separate_write_s_median"] > 0
    assert w["write_over_turn_max"] >= w["write_over_turn_median"]
    assert 0.0 <= w["reused_kv_rate"] <= 1.0
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    turns = [i for i in items if i["kind"] == "turn"]
    assert [t["statement"] for t in turns] == [f[0] for f in FACTS[:4]] and all(t["ids"] for t in turns)
    assert sum(1 for i in items if i["kind"] == "question") == 12
    # a turn with a non-empty answer is written from the chat's KV
    assert all(t["reused_kv"] for t in turns if t["reply"].strip())
    assert len({f[2] for f in FACTS}) == len(FACTS)  # every answer tells its fact apart
