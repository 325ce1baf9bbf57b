"""The reliability suite at a reduced size (the full size is `nativemem reliability --size full`).

Durability kills a real `nativemem serve` subprocess with SIGKILL; isolation, load and fuzzing run against
a live in-process uvicorn on 127.0.0.1 with real HTTP.
"""

from __future__ import annotations

import pytest
from conftest import MAX_BODY, start_server

from nativemem.testing.reliability import (DAMAGE, run_concurrency, run_damage, run_durability, run_fuzz,
                                         run_isolation, run_load, run_poison, run_stall)


@pytest.fixture(scope="module")
def shared(model_dir):
    with start_server(model_dir, ["u0", "u1", "u2", "u3"]) as s:
        yield s


def test_durability_no_acknowledged_write_is_lost_under_sigkill(tmp_path, model_dir):
    res = run_durability(tmp_path, model=str(model_dir), kills=1, kill_window_s=(0.8, 1.6), seed=3, log=lambda m: None)
    assert res["acknowledged_chunks"] > 0 and res["server_starts"] == 2
    assert res["lost_acknowledged"] == 0 and res["changed_text"] == 0, res
    assert res["unreadable_acknowledged"] == 0 and res["api_keys_in_log"] == 0, res


def test_every_damaged_file_is_reported_and_repair_serves_every_acknowledged_chunk(tmp_path, model_dir):
    res = run_damage(tmp_path, model=str(model_dir), users=2, texts_per_user=4, seed=5, log=lambda m: None)
    n = res["acknowledged_chunks"]
    assert n >= 8 and set(res["cases"]) == set(DAMAGE)
    for case, r in res["cases"].items():
        assert r["outcome"] in ("warning", "error"), (case, r)  # never served short without a word
        assert r["served_after_repair"] == n, (case, r)
    assert res["cases"]["id_tracker_bytes_flipped"]["outcome"] == "error"
    assert res["cases"]["index_segment_lost"]["served_before"] < n


def test_isolation_no_response_carries_another_users_memory(shared):
    res = run_isolation(shared.url, shared.keys, requests=300, workers=4, seed=1, log=lambda m: None)
    assert res["requests"] >= 300 and res["chunks_written"] > 12
    assert res["leaks"] == 0, res["examples"]
    assert res["errors"] == 0 and res["live_chunks_missing"] == 0, res["examples"]
    assert res["by_op"].get("get_other", 0) > 0 and res["by_op"].get("chat_stream", 0) > 0


def test_load_50_concurrent_clients_without_errors(shared):
    res = run_load(shared.url, shared.keys, clients=50, duration_s=2.0, seed=2, log=lambda m: None)
    assert res["errors"] == 0, res["error_examples"]
    assert res["requests"] >= 50 and res["p99_ms"] >= res["p50_ms"] > 0


def test_fuzz_every_endpoint_no_5xx_nothing_lost(shared):
    res = run_fuzz(shared.url, shared.keys, examples=150, max_body_bytes=MAX_BODY, seed=4, log=lambda m: None)
    assert res["failures"] == [], res["failures"]
    assert res["server_errors"] == 0 and res["stored_lost"] == 0 and res["server_alive"]
    assert res["http_inputs"] >= 150 and res["cli_inputs"] >= 20
    assert {"400", "401", "413"} <= set(res["by_status"]), res["by_status"]


def test_stall_measures_another_users_latency_during_a_long_add_and_a_consolidation(tmp_path, model_dir):
    res = run_stall(tmp_path, model=str(model_dir), add_bytes=96 << 10, probes=3, consolidate_sentences=60, seed=6,
                    log=lambda m: None)
    assert res["status"] == 200 and res["chunks"] >= res["texts"] and res["add_bytes"] >= 96 << 10
    assert res["probes_idle"] == 3 and res["answered_while_adding"] >= 1  # bob was answered while alice's add ran
    cons = res["consolidate"]
    assert cons["status"] == 200 and cons["stored_sentences"] == 60 and cons["steps"] > 0
    assert cons["answered_while_running"] >= 1  # ... and while carol's consolidation trained
    for part in (res, cons):
        for what in ("chat", "list"):
            assert 0 < part[what]["idle_p50_ms"] <= part[what]["idle_p99_ms"]
            assert part[what]["during_p99_ms"] is not None and part[what]["p99_ratio"] > 0


def test_poison_compares_unrelated_answers_with_and_without_a_poisoned_memory(tmp_path, model_dir):
    res = run_poison(tmp_path, model=str(model_dir), questions=4, seed=7, log=lambda m: None)
    assert res["questions"] == 4 and len(res["rows"]) == 4 and res["poison_memories"] >= 10
    for row in res["rows"]:  # nothing injected: the answer is exactly the one without memory
        if row["injected"] == 0:
            assert row["with_memory"] == row["without"]
    assert res["answers_changed"] <= sum(1 for r in res["rows"] if r["injected"])


def test_concurrency_compares_one_chat_at_a_time_with_batched_decoding(tmp_path, model_dir):
    res = run_concurrency(tmp_path, model=str(model_dir), levels=(1, 4), duration_s=1.5, max_tokens=6, users=3,
                          batch_size=8, seed=8, log=lambda m: None)
    assert set(res["runs"]) == {"1", "4"}
    for run in res["runs"].values():
        for arm in ("one_at_a_time", "batched"):
            assert run[arm]["errors"] == 0 and run[arm]["requests"] >= 1, run[arm]["error_examples"]
            assert run[arm]["tokens_per_s"] > 0 and run[arm]["p50_ms"] <= run[arm]["p99_ms"]
        assert run["throughput_ratio"] > 0 and run["p99_ratio"] > 0
