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


def test_redis_unreachable_stops_the_start_and_answers_503_until_it_is_back(tmp_path, model_dir):
    import subprocess
    import sys

    import httpx
    from conftest import MAX_BODY

    import nativemem as nm
    from nativemem.server import KeyRing, ServerSettings, ServerThread, create_app
    from nativemem.testing.redis import RedisServer

    server = RedisServer(tmp_path / "redis")
    done = subprocess.run([sys.executable, "-m", "nativemem.cli.main", "serve", "--memory", str(tmp_path / "x.mem"),
                           "--no-auth", "--model", str(model_dir), "--redis", server.url],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "cannot be reached" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout

    server.start()
    try:
        lm = nm.load_model(model_dir)
        mem = nm.open_memory(tmp_path / "m", lm, kind="activation", backend="redis", redis_url=server.url,
                             gate_threshold=0.0)
        app = create_app(keys=KeyRing({"key-of-alice-0123456789": "alice"}), lm=lm, memory=mem,
                         settings=ServerSettings(max_body_bytes=MAX_BODY))
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60,
                                                    headers={"Authorization": "Bearer key-of-alice-0123456789"}) as c:
            chunk = c.post("/v1/memories", json={"text": "Alice's locker code is 4711."}).json()["data"][0]["id"]
            server.kill()
            chat = {"model": "nativemem", "max_tokens": 4, "messages": [{"role": "user", "content": "Locker code?"}]}
            for r in (c.get("/v1/memories"), c.post("/v1/memories", json={"text": "Another note."}),
                      c.post("/v1/chat/completions", json=chat)):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and "Redis" in r.json()["error"]["message"]
            server.start()
            assert [m["id"] for m in c.get("/v1/memories").json()["data"]] == [chunk]
            assert c.post("/v1/chat/completions", json=chat).json()["nativemem"]["memory_ids"] == [chunk]
        mem.close()
    finally:
        server.kill()
