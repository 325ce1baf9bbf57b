"""Two real `nativemem serve --redis` replicas on one real redis-server: a chunk written through one is listed
and injected by the other; the writing replica killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

import redis

from nativemem.testing.replicas import run_replicas


def test_two_replicas_share_one_memory_and_a_killed_one_loses_nothing(tmp_path, model_dir, redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    res = run_replicas(tmp_path, redis_url=redis_server.url, model=str(model_dir), kills=2,
                       kill_window_s=(0.8, 1.5), seed=7, log=lambda m: None)
    assert res["acknowledged_chunks"] > 0
    assert res["lost_on_b"] == 0 and res["lost_on_a_after_restart"] == 0 and res["changed_text"] == 0, res
    assert res["injected_on_b"] and res["injected_on_a"] and res["same_answer"], res
    assert res["delete_through_b_gone_on_a"] is True
