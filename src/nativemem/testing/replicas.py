"""The replicas part of the reliability suite: two ``nativemem serve --redis URL`` subprocesses share one memory.

Replica A takes the writes and is killed with SIGKILL again and again; replica B must list every chunk A
acknowledged, with its text, and inject a chunk written through A into a chat exactly as A does; A, restarted,
rebuilds its index from Redis and must list them all too; a delete through B is gone on A.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

from .reliability import AckedWrites, ServerProcess, _client, _marker, kill_while_writing, write_keys

__all__ = ["run_replicas"]


def _create(folder: Path, model: str | None, redis_url: str) -> None:
    """The first replica's folder (every top_k hit injected, so the chat check does not depend on the gate)."""
    import nativemem as nm

    lm = nm.load_model(model)
    mem = nm.open_memory(folder, lm, kind="activation", backend="redis", redis_url=redis_url, gate_threshold=0.0)
    mem.close()


def _ask(url: str, key: str, question: str) -> tuple[str, list[str]]:
    with _client(url, key) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 12, "temperature": 0,
                                                 "messages": [{"role": "user", "content": question}]})
        r.raise_for_status()
        body = r.json()
    return body["choices"][0]["message"]["content"], body["nativemem"]["memory_ids"]


def _injection(a: ServerProcess, b: ServerProcess, key: str, rng: random.Random) -> dict[str, Any]:
    """One chunk written through A: B injects it, and answers as A does."""
    code = _marker(rng)
    with _client(a.url, key) as c:
        r = c.post("/v1/memories", json={"texts": [f"The reader's locker code is {code}."]})
        r.raise_for_status()
        chunk = r.json()["data"][0]["id"]
    question = "What is the reader's locker code?"
    on_b, ids_b = _ask(b.url, key, question)
    on_a, ids_a = _ask(a.url, key, question)
    return {"injected_on_b": ids_b == [chunk], "injected_on_a": ids_a == [chunk], "same_answer": on_a == on_b,
            "answer_on_b": on_b}


def run_replicas(workdir: Path, *, redis_url: str, model: str | None = None, kills: int = 3,
                 kill_window_s: tuple[float, float] = (1.0, 3.0), writers: int = 2, texts_per_request: int = 4,
                 seed: int = 0, log=print) -> dict[str, Any]:
    """Two replicas on the Redis at ``redis_url``; A killed ``kills`` times while writing (see the module docstring).

    Returns counts: acknowledged chunks, lost on B and on A after its restarts (both must be 0), changed texts,
    the injection check, the delete check, and how long A took to start again (model load and index replay).
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    users = [f"writer{i}" for i in range(writers)] + ["reader"]
    keys = write_keys(workdir / "replica-keys.json", users, seed)
    _create(workdir / "a.mem", model, redis_url)
    shutil.copytree(workdir / "a.mem", workdir / "b.mem")  # a replica starts from a copy of another's folder
    extra = ["--redis", redis_url, "--no-access-log"]
    a = ServerProcess(workdir / "a.mem", workdir / "replica-keys.json", model=model, extra=extra)
    b = ServerProcess(workdir / "b.mem", workdir / "replica-keys.json", model=model, extra=extra)
    writes = AckedWrites(keys, texts_per_request)
    acked, writing = writes.acked, users[:-1]
    t0 = time.perf_counter()

    lost_b, lost_a, changed, restarts = set(), set(), 0, []
    with b:
        a.start()
        injection = _injection(a, b, keys["reader"], rng)
        for k in range(kills):
            kill_while_writing(a, writes.writer(a), writing, rng, kill_window_s)
            gone, diff = writes.check(b.url, writing)
            lost_b |= gone
            changed += diff
            started = time.perf_counter()
            a.start()
            restarts.append(time.perf_counter() - started)
            gone, diff = writes.check(a.url, writing)
            lost_a |= gone
            changed += diff
            log(f"replicas: kill {k + 1}/{kills}: {len(acked)} chunks acknowledged by A, lost on B {len(lost_b)}, "
                f"on A after restart {len(lost_a)}")
        victim = next(iter(acked), None)
        deleted_seen = None
        if victim is not None:
            owner = acked[victim][0]
            with _client(b.url, keys[owner]) as c:
                c.delete(f"/v1/memories/{victim}").raise_for_status()
            with _client(a.url, keys[owner]) as c:
                deleted_seen = c.get(f"/v1/memories/{victim}").status_code == 404
        a.stop()
    return {"kills": kills, "acknowledged_chunks": len(acked), "lost_on_b": len(lost_b),
            "lost_on_a_after_restart": len(lost_a), "changed_text": changed, **injection,
            "delete_through_b_gone_on_a": deleted_seen, "a_restart_s": [round(s, 2) for s in restarts],
            "elapsed_s": round(time.perf_counter() - t0, 1)}
