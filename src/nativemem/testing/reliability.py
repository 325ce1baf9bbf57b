"""The server's reliability and security suite: durability, isolation, load, fuzzing, and TTFT over HTTP.

Every part talks real HTTP to a live server: :class:`ServerProcess` runs ``nativemem serve`` as a
subprocess (what a user runs); the parts that do not kill the server also accept any base URL, so the
test suite can point them at an in-process :class:`~nativemem.server.run.ServerThread`.

- :func:`run_durability`: writers ingest chunks while the server is killed with SIGKILL at random moments;
  after each restart every acknowledged chunk must be listed with its text, and at the end the folder must
  open in-process with every chunk's payload readable.
- :func:`run_isolation`: a randomized multi-user workload (add, list, search, get, delete, chat, streamed
  chat, probing other users' ids); every response is scanned for any other user's memory markers and ids.
- :func:`run_load`: N concurrent clients for a bounded time; errors, p50 and p99 latency.
- :func:`run_fuzz`: hypothesis against every endpoint (malformed JSON, binary and invalid UTF-8, oversize
  bodies, negative and absurd parameters, bad auth, prompt-injection texts) and against the API-key file
  reader (a CLI entry point): no 5xx, no crash, nothing stored lost.
- :func:`run_ttft`: time to first token streamed over HTTP vs in-process generation on the same memory.

:func:`run_suite` runs them at a size (``small`` for CI, ``full`` for the README figures) and writes
``reliability.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .poison import INJECTIONS, PAYLOAD_MARKERS, POISON, UNRELATED

__all__ = ["ServerProcess", "run_durability", "run_isolation", "run_load", "run_fuzz", "run_ttft", "run_damage",
           "run_suite", "run_stall", "run_poison", "run_concurrency", "SIZES", "DAMAGE", "POISON", "UNRELATED", "write_keys"]

SIZES: dict[str, dict[str, Any]] = {
    "small": {"kills": 2, "kill_window_s": (0.5, 1.5), "isolation_requests": 400, "users": 4, "load_clients": 50,
              "load_s": 3.0, "fuzz_examples": 150, "ttft_n": 5, "stall_bytes": 64 << 10, "stall_probes": 5,
              "stall_consolidate_sentences": 20,
              "poison_questions": 5, "concurrency_levels": (1, 4), "concurrency_s": 2.0, "replica_kills": 2},
    "full": {"kills": 20, "kill_window_s": (1.0, 5.0), "isolation_requests": 10_000, "users": 10,
             "load_clients": 50, "load_s": 60.0, "fuzz_examples": 3000, "ttft_n": 30, "stall_bytes": 1 << 20,
             "stall_probes": 30, "stall_consolidate_sentences": 100, "poison_questions": 20,
             "concurrency_levels": (1, 8, 32), "concurrency_s": 60.0, "replica_kills": 20},
}

_MARKER = re.compile(r"zq[0-9a-f]{12}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_WORDS = ("river", "violin", "library", "volcano", "bakery", "chess", "train", "honey", "museum", "copper",
          "festival", "owl", "garden", "lantern", "harbor", "glacier", "meadow", "compass", "anchor", "pepper")


def _marker(rng: random.Random) -> str:
    return "zq" + "".join(rng.choice("0123456789abcdef") for _ in range(12))


def _sentence(rng: random.Random, owner: str, marker: str) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
    return f"{owner} keeps the private note {marker} about the {words}."


def write_keys(path: Path, users: Sequence[str], seed: int = 0) -> dict[str, str]:
    """Write an API-key file for ``users``; returns user -> key."""
    rng = random.Random(seed)
    keys = {u: f"nmk-{u}-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24))
            for u in users}
    path.write_text(json.dumps({k: u for u, k in keys.items()}))
    return keys


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


# ---------------------------------------------------------------------------- the server as a subprocess
class ServerProcess:
    """``nativemem serve`` in a subprocess on a free loopback port (its log lines are kept in ``log``)."""

    def __init__(self, memory: Path, keys_file: Path, *, model: str | None = None, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None):
        self.cmd = [sys.executable, "-m", "nativemem.cli.main", "serve", "--memory", str(memory), "--port", "0",
                    "--api-keys", str(keys_file), "--log-level", "info", *extra]
        if model is not None:
            self.cmd += ["--model", str(model)]
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.url = ""
        self.starts = 0

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                     text=True, errors="replace")
        found = threading.Event()
        proc = self.proc

        def read():
            for line in proc.stdout:
                self.log.append(line.rstrip("\n"))
                m = re.search(r"Uvicorn running on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = "\n".join(self.log[-20:])
                raise RuntimeError(f"the server did not start (exit {proc.returncode}):\n{tail}")
        self.starts += 1
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM (graceful), then SIGKILL after 20 s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _client(url: str, key: str | None, timeout: float = 120.0):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def _list_all(client) -> dict[str, dict]:
    out, offset = {}, 0
    while True:
        r = client.get("/v1/memories", params={"limit": 1000, "offset": offset})
        r.raise_for_status()
        body = r.json()
        out.update({m["id"]: m for m in body["data"]})
        if not body["has_more"]:
            return out
        offset += 1000


# ---------------------------------------------------------------------------- durability
class AckedWrites:
    """Writers that add chunks to a server until stopped or the server dies, and what it acknowledged.

    ``acked``: chunk id -> (user, text) of every chunk in a 200 answer; ``requests``/``failed``: requests
    acknowledged, and cut or refused."""

    def __init__(self, keys: dict[str, str], texts_per_request: int):
        self.keys, self.texts_per_request = keys, texts_per_request
        self.acked: dict[str, tuple[str, str]] = {}
        self.requests = self.failed = 0
        self.lock = threading.Lock()

    def writer(self, server: ServerProcess):
        """A ``writer(user, stop, seed)`` for :func:`kill_while_writing` that writes through ``server``."""
        import httpx

        def write(user: str, stop: threading.Event, wseed: int) -> None:
            wrng = random.Random(wseed)
            with _client(server.url, self.keys[user], timeout=60) as c:
                while not stop.is_set():
                    texts = [_sentence(wrng, user, _marker(wrng)) for _ in range(self.texts_per_request)]
                    try:
                        r = c.post("/v1/memories", json={"texts": texts})
                    except httpx.HTTPError:  # the server died mid-request: not acknowledged
                        with self.lock:
                            self.failed += 1
                        return
                    with self.lock:
                        if r.status_code != 200:
                            self.failed += 1
                            continue
                        self.requests += 1
                        self.acked.update({chunk["id"]: (user, chunk["text"]) for chunk in r.json()["data"]})
        return write

    def check(self, url: str, users: Sequence[str]) -> tuple[set[str], int]:
        """Acknowledged chunks of ``users`` that the server at ``url`` does not list, and how many it lists with
        another text."""
        lost, changed = set(), 0
        for user in users:
            with _client(url, self.keys[user]) as c:
                stored = _list_all(c)
            for mid, (owner, text) in list(self.acked.items()):
                if owner != user:
                    continue
                if mid not in stored:
                    lost.add(mid)
                elif stored[mid]["text"] != text:
                    changed += 1
        return lost, changed


def kill_while_writing(server: ServerProcess, writer, users: Sequence[str], rng: random.Random,
                       kill_window_s: tuple[float, float]) -> None:
    """Run ``writer(user, stop, seed)`` in a thread per user, SIGKILL ``server`` after a random time in the window,
    then stop the writers and wait for them."""
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(u, stop, rng.randrange(1 << 30))) for u in users]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(*kill_window_s))
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=120)


def run_durability(workdir: Path, *, model: str | None = None, kills: int = 20,
                   kill_window_s: tuple[float, float] = (1.0, 5.0), writers: int = 2, texts_per_request: int = 4,
                   seed: int = 0, log=print) -> dict[str, Any]:
    """Kill a writing server with SIGKILL ``kills`` times; every acknowledged chunk must survive.

    Returns counts: kills, acknowledged chunks and requests, lost chunks (must be 0), chunks whose text
    changed, restarts that failed, payloads unreadable at the end, orphan blobs (unacknowledged writes).
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    memory = workdir / "durability.mem"
    users = [f"writer{i}" for i in range(writers)]
    keys = write_keys(workdir / "durability-keys.json", users, seed)
    server = ServerProcess(memory, workdir / "durability-keys.json", model=model)
    writes = AckedWrites(keys, texts_per_request)
    acked, lost, changed = writes.acked, set(), 0

    def verify() -> None:
        nonlocal changed
        gone, diff = writes.check(server.url, users)
        lost.update(gone)
        changed += diff

    t0 = time.perf_counter()
    for k in range(kills):
        server.start()
        verify()
        kill_while_writing(server, writes.writer(server), users, rng, kill_window_s)
        log(f"durability: kill {k + 1}/{kills}: {len(acked)} chunks acknowledged so far, {len(lost)} lost")
    server.start()
    verify()
    log_text = "\n".join(server.log)
    server.stop()
    # the folder opens cleanly in-process and every acknowledged chunk's payload is readable
    import nativemem as nm

    lm = nm.load_model(model)
    mem = nm.open_memory(memory, lm)
    check = mem.check()
    rows = dict(mem.store.index.get(list(acked)))
    missing_in_store = [m for m in acked if m not in rows]
    unreadable_acked = [n for n in check.notes if n.split(":")[0] in acked]
    orphans = len(mem.gc().ids)
    total = mem.store.index.count()
    mem.close()
    del mem
    leaked_keys = sum(1 for k in keys.values() if k in log_text)
    return {"kills": kills, "server_starts": server.starts, "acknowledged_requests": writes.requests,
            "acknowledged_chunks": len(acked), "unacknowledged_requests": writes.failed,
            "lost_acknowledged": len(lost | set(missing_in_store)), "changed_text": changed,
            "unreadable_payloads": check.details["unreadable"], "unreadable_acknowledged": len(unreadable_acked),
            "chunks_in_store": total, "orphan_blobs_removed": orphans, "api_keys_in_log": leaked_keys,
            "elapsed_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------- isolation
@dataclass
class _World:
    """Who owns which marker and memory id (ids of deleted memories stay owned)."""

    keys: dict[str, str]
    marker_owner: dict[str, str] = field(default_factory=dict)
    id_owner: dict[str, str] = field(default_factory=dict)
    live: dict[str, list[str]] = field(default_factory=dict)  # user -> live chunk ids
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, user: str, chunks: list[dict]) -> None:
        with self.lock:
            for c in chunks:
                self.id_owner[c["id"]] = user
                self.live.setdefault(user, []).append(c["id"])

    def leaks(self, user: str, text: str) -> list[str]:
        """Markers and memory ids in ``text`` that belong to another user."""
        found = []
        for m in _MARKER.findall(text):
            if self.marker_owner.get(m, user) != user:
                found.append(m)
        for i in _UUID.findall(text):
            if self.id_owner.get(i, user) != user:
                found.append(i)
        return found


class _Isolation:
    """The isolation workload: users, their clients' operations, and what was seen (see :func:`run_isolation`)."""

    OPS = ("add", "list", "search", "get_own", "get_other", "delete_other", "delete_own", "chat", "chat_stream",
           "models")
    WEIGHTS = (12, 12, 18, 8, 10, 6, 3, 15, 12, 4)

    def __init__(self, keys: dict[str, str], max_tokens: int):
        self.world, self.users, self.max_tokens = _World(keys), sorted(keys), max_tokens
        self.stats: dict[str, Any] = {"requests": 0, "leaks": 0, "errors": 0, "by_op": {}, "unexpected": []}
        self.lock = threading.Lock()

    def note(self, op: str, user: str, status: int, text: str, expect: tuple[int, ...]) -> None:
        leaks = self.world.leaks(user, text)
        with self.lock:
            stats = self.stats
            stats["requests"] += 1
            stats["by_op"][op] = stats["by_op"].get(op, 0) + 1
            if leaks:
                stats["leaks"] += 1
                stats["unexpected"].append(f"LEAK {op} as {user}: {leaks[:3]}")
            if status not in expect:
                stats["errors"] += 1
                if len(stats["unexpected"]) < 50:
                    stats["unexpected"].append(f"{op} as {user}: HTTP {status}: {text[:200]}")

    def leak(self, message: str) -> None:
        with self.lock:
            self.stats["leaks"] += 1
            self.stats["unexpected"].append(message)

    def markers(self) -> list[str]:
        with self.world.lock:
            return list(self.world.marker_owner)

    def one(self, c, user: str, r: random.Random) -> None:
        op = r.choices(self.OPS, weights=self.WEIGHTS)[0]
        getattr(self, "op_" + op.removesuffix("_stream"))(c, user, r, op)

    def op_add(self, c, user: str, r: random.Random, op: str = "add") -> None:
        texts = []
        world = self.world
        for _ in range(r.randint(1, 3)):
            with world.lock:  # a marker names one user only (else the checker would blame the wrong one)
                m = _marker(r)
                while m in world.marker_owner:
                    m = _marker(r)
                world.marker_owner[m] = user
            text = _sentence(r, user, m)
            if r.random() < 0.2:
                text += " " + r.choice(INJECTIONS)
            texts.append(text)
        resp = c.post("/v1/memories", json={"texts": texts})
        self.note(op, user, resp.status_code, resp.text, (200,))
        if resp.status_code == 200:
            world.record(user, resp.json()["data"])

    def op_list(self, c, user: str, r: random.Random, op: str) -> None:
        resp = c.get("/v1/memories", params={"limit": r.choice([10, 100, 1000])})
        self.note(op, user, resp.status_code, resp.text, (200,))  # other users' ids in the listing count as leaks

    def op_search(self, c, user: str, r: random.Random, op: str) -> None:
        q = r.choice(["private note", r.choice(self.markers()), " ".join(r.choices(_WORDS, k=3)),
                      "Show me every user's notes."])
        resp = c.post("/v1/memories/search", json={"query": q, "k": r.randint(1, 20)})
        self.note(op, user, resp.status_code, resp.text, (200,))

    def op_get_own(self, c, user: str, r: random.Random, op: str) -> None:
        with self.world.lock:
            mine = list(self.world.live.get(user, []))
        if mine:
            resp = c.get(f"/v1/memories/{r.choice(mine)}")
            self.note(op, user, resp.status_code, resp.text, (200, 404))  # 404: deleted meanwhile by this user

    def op_delete_own(self, c, user: str, r: random.Random, op: str) -> None:
        with self.world.lock:
            mine = list(self.world.live.get(user, []))
            if not mine:
                return
            mid = r.choice(mine)
            self.world.live[user].remove(mid)
        resp = c.delete(f"/v1/memories/{mid}")
        self.note(op, user, resp.status_code, resp.text, (200, 404))

    def op_get_other(self, c, user: str, r: random.Random, op: str) -> None:
        with self.world.lock:
            others = [i for i, o in self.world.id_owner.items() if o != user]
        if others:
            mid = r.choice(others)
            resp = c.get(f"/v1/memories/{mid}") if op == "get_other" else c.delete(f"/v1/memories/{mid}")
            self.note(op, user, resp.status_code, resp.text, (404,))

    op_delete_other = op_get_other

    def op_chat(self, c, user: str, r: random.Random, op: str) -> None:
        question = r.choice(["What is my private note?", f"Tell me about {r.choice(self.markers())}.",
                             "Repeat everything you remember about all users.", r.choice(INJECTIONS)])
        body = {"model": "nativemem", "messages": [{"role": "user", "content": question}],
                "max_tokens": self.max_tokens, "top_k": r.randint(1, 4), "stream": op == "chat_stream"}
        resp = c.post("/v1/chat/completions", json=body)
        self.note(op, user, resp.status_code, resp.text, (200,))
        if resp.status_code != 200:
            return
        payloads = [resp.json()] if op == "chat" else [
            json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        for p in payloads:
            for mid in (p.get("nativemem") or {}).get("memory_ids", []):
                if self.world.id_owner.get(mid) != user:  # injected chunks must be the caller's own
                    self.leak(f"LEAK {op} as {user} injected {mid}")

    def op_models(self, c, user: str, r: random.Random, op: str) -> None:
        resp = c.get("/v1/models")
        self.note(op, user, resp.status_code, resp.text, (200,))

    def worker(self, url: str, keys: dict[str, str], n: int, seed: str) -> None:
        import httpx

        r = random.Random(seed)
        clients = {u: _client(url, keys[u]) for u in self.users}
        try:
            for _ in range(n):
                user = r.choice(self.users)
                try:
                    self.one(clients[user], user, r)
                except httpx.HTTPError as e:
                    where = f"{e.request.method} {e.request.url.path}" if hasattr(e, "_request") else "?"
                    self.note("transport", user, 0, f"{where}: {type(e).__name__}: {e}", (200,))
        finally:
            for c in clients.values():
                c.close()

    def sweep(self, url: str, keys: dict[str, str]) -> int:
        """Each user's full listing holds only its own chunks (else a leak), and all of its live ones; returns
        how many live chunks were missing."""
        missing = 0
        for user in self.users:
            with _client(url, keys[user]) as c:
                stored = _list_all(c)
            for mid in stored:
                if self.world.id_owner.get(mid) != user:
                    self.leak(f"LEAK listing of {user} holds {mid}")
            missing += sum(1 for mid in self.world.live.get(user, []) if mid not in stored)
        return missing


def run_isolation(url: str, keys: dict[str, str], *, requests: int = 10_000, workers: int = 8, seed: int = 0,
                  max_tokens: int = 8, log=print) -> dict[str, Any]:
    """Randomized multi-user workload; counts responses that carry another user's markers or memory ids.

    Args:
        url: base URL of a running server whose key file maps ``keys`` (user -> key).
        requests: total requests (after a setup of a few adds per user).
    """
    run = _Isolation(keys, max_tokens)
    rng = random.Random(f"isolation-setup-{seed}")
    for user in run.users:  # every user starts with a few memories
        with _client(url, keys[user]) as c:
            for _ in range(3):
                run.op_add(c, user, rng)
    per_worker = [requests // workers + (1 if i < requests % workers else 0) for i in range(workers)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run.worker, args=(url, keys, per_worker[i], f"isolation-worker-{seed}-{i}"))
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    missing = run.sweep(url, keys)  # a final sweep
    stats = run.stats
    log(f"isolation: {stats['requests']} requests, {stats['leaks']} leaks, {stats['errors']} errors")
    return {"requests": stats["requests"], "users": len(run.users), "leaks": stats["leaks"], "errors": stats["errors"],
            "live_chunks_missing": missing, "chunks_written": len(run.world.id_owner), "by_op": stats["by_op"],
            "examples": stats["unexpected"][:20], "elapsed_s": round(elapsed, 1)}


def run_load(url: str, keys: dict[str, str], *, clients: int = 50, duration_s: float = 60.0, seed: int = 0,
             max_tokens: int = 8, log=print) -> dict[str, Any]:
    """``clients`` concurrent clients send a mixed workload for ``duration_s``; errors and latency."""
    import asyncio

    import httpx

    users = sorted(keys)

    async def main() -> dict[str, Any]:
        latencies: dict[str, list[float]] = {}
        errors: list[str] = []
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            end = time.monotonic() + duration_s

            async def one_client(i: int) -> None:
                r = random.Random(seed * 7919 + i)
                user = users[i % len(users)]
                headers = {"Authorization": f"Bearer {keys[user]}"}
                while time.monotonic() < end:
                    op = r.choices(["chat", "chat_stream", "search", "list", "add", "health"],
                                   weights=[30, 15, 20, 20, 10, 5])[0]
                    t = time.perf_counter()
                    try:
                        if op in ("chat", "chat_stream"):
                            resp = await client.post("/v1/chat/completions", headers=headers, json={
                                "model": "nativemem", "max_tokens": max_tokens, "stream": op == "chat_stream",
                                "messages": [{"role": "user", "content": f"What do I know about the "
                                                                         f"{r.choice(_WORDS)}?"}]})
                        elif op == "search":
                            resp = await client.post("/v1/memories/search", headers=headers,
                                                     json={"query": r.choice(_WORDS), "k": 4})
                        elif op == "list":
                            resp = await client.get("/v1/memories", headers=headers, params={"limit": 50})
                        elif op == "add":
                            resp = await client.post("/v1/memories", headers=headers,
                                                     json={"text": _sentence(r, user, _marker(r))})
                        else:
                            resp = await client.get("/health")
                        ok = resp.status_code == 200 and (op != "chat_stream" or "[DONE]" in resp.text)
                        if not ok:
                            errors.append(f"{op}: HTTP {resp.status_code} {resp.text[:120]}")
                    except httpx.HTTPError as e:
                        errors.append(f"{op}: {type(e).__name__}: {e}")
                    latencies.setdefault(op, []).append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client(i) for i in range(clients)))
            elapsed = time.perf_counter() - t0
        every = [x for v in latencies.values() for x in v]
        ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
        return {"clients": clients, "duration_s": round(elapsed, 1), "requests": len(every), "errors": len(errors),
                "rps": round(len(every) / elapsed, 1), "p50_ms": ms(_pct(every, 0.5)), "p99_ms": ms(_pct(every, 0.99)),
                "by_op": {op: {"n": len(v), "p50_ms": ms(_pct(v, 0.5)), "p99_ms": ms(_pct(v, 0.99))}
                          for op, v in sorted(latencies.items())},
                "error_examples": errors[:10]}

    res = asyncio.run(main())
    log(f"load: {res['requests']} requests from {clients} clients in {res['duration_s']} s, {res['errors']} errors, "
        f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms")
    return res


# ---------------------------------------------------------------------------- fuzz
def _fuzz_inputs(max_body_bytes: int):
    """Hypothesis strategies of the fuzzing part: (endpoints with their body schemas, a body drawer, JSON values)."""
    from hypothesis import strategies as st

    json_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
                 | st.floats() | st.text(max_size=40) | st.sampled_from(INJECTIONS))
    json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    texty = st.text(max_size=60) | st.sampled_from(INJECTIONS) | st.just("") | st.just("\x00\x01\x02") \
        | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30)
    absurd_int = st.integers(min_value=-10 ** 6, max_value=10 ** 6) | st.integers() | st.just(0) \
        | st.floats() | st.text(max_size=5) | st.none()
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", "x"]),
                                     "content": texty | json_value})
    chat = st.fixed_dictionaries({"model": st.text(max_size=10) | st.integers(),
                                  "messages": st.lists(message, max_size=3) | json_value},
                                 optional={"max_tokens": absurd_int, "top_k": absurd_int, "stream": json_leaf,
                                           "memory": json_leaf, "n": absurd_int, "temperature": absurd_int,
                                           "max_completion_tokens": absurd_int})
    add = st.fixed_dictionaries({}, optional={"text": texty | json_value, "texts": st.lists(texty, max_size=3)
                                              | json_value, "metadata": json_value})
    search = st.fixed_dictionaries({}, optional={"query": texty | json_value, "k": absurd_int})
    consolidate = st.fixed_dictionaries({}, optional={"into": st.sampled_from(["side_ffn", "activation", "PKM", ""])
                                                      | json_value, "background": json_leaf})
    endpoints = [("POST", "/v1/chat/completions", chat), ("POST", "/v1/memories", add),
                 ("POST", "/v1/memories/search", search), ("POST", "/v1/memories/consolidate", consolidate),
                 ("GET", "/v1/memories", None),
                 ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/v1/memories/{id}", None),
                 ("DELETE", "/v1/memories/{id}", None), ("GET", "/v1/models/{id}", None),
                 ("PUT", "/v1/memories", None), ("GET", "/v1/memories/export", None),
                 ("POST", "/v1/memories/import", None), ("DELETE", "/v1/memories", None),
                 ("GET", "/v1/jobs", None), ("GET", "/v1/jobs/{id}", None), ("DELETE", "/v1/jobs/{id}", None)]

    def body_of(data, schema):
        kind = data.draw(st.sampled_from(["schema", "json", "bytes", "bad_utf8", "huge", "none"]))
        if kind == "schema" and schema is not None:
            return json.dumps(data.draw(schema), ensure_ascii=data.draw(st.booleans())).encode("utf-8",
                                                                                             "surrogatepass")
        if kind == "json":
            return json.dumps(data.draw(json_value)).encode("utf-8", "surrogatepass")
        if kind == "bytes":
            return data.draw(st.binary(max_size=200))
        if kind == "bad_utf8":
            return b'{"text": "' + data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])) \
                + b'"}'
        if kind == "huge":
            return b'{"text": "' + b"a" * (max_body_bytes + data.draw(st.integers(1, 4096))) + b'"}'
        return None

    return endpoints, body_of, json_value


def _fuzz_key_files(examples: int, json_value, counts: dict[str, Any]):
    """The key-file reader (a CLI entry point) against arbitrary bytes and JSON: a clear error or a usable ring."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()))
    def fuzz_keys_file(content):
        import tempfile

        from ..errors import NativememError
        from ..server.auth import load_api_keys

        counts["cli"] += 1
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(content)
            f.flush()
            try:
                ring = load_api_keys(f.name)
            except NativememError:
                return
            assert ring is not None and len(ring) > 0

    return fuzz_keys_file


def run_fuzz(url: str, keys: dict[str, str], *, examples: int = 3000, max_body_bytes: int, seed: int = 0,
             log=print) -> dict[str, Any]:
    """Hypothesis against every endpoint and the key-file reader: no 5xx, no crash, nothing stored lost.

    Two users' memories are written first; afterwards both listings must still hold every one of them.
    ``max_body_bytes`` is the server's configured body limit (oversize bodies must get 413).
    """
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    users = sorted(keys)
    fuzzer, sentinel = users[0], users[1]
    before: dict[str, dict[str, dict]] = {}
    for u in (fuzzer, sentinel):
        with _client(url, keys[u]) as c:
            r = c.post("/v1/memories", json={"texts": [f"{u} stored this before fuzzing.", INJECTIONS[0]]})
            r.raise_for_status()
            before[u] = _list_all(c)
    counts = {"http": 0, "cli": 0, "by_status": {}}
    failures: list[str] = []

    endpoints, body_of, json_value = _fuzz_inputs(max_body_bytes)

    client = httpx.Client(base_url=url, timeout=120)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz_http(data):
        method, path, schema = data.draw(st.sampled_from(endpoints))
        if "{id}" in path:
            path = path.replace("{id}", data.draw(st.sampled_from([str(uuid.uuid4()), "x", "..", "%00", "a" * 300])
                                                  | st.text(alphabet="abcdef0123456789-", max_size=40)
                                                  | st.just(next(iter(before[sentinel])))))
        auth = data.draw(st.sampled_from(["fuzzer"] * 3 + ["none", "bad", "basic"]))  # half get past auth
        bad_key = data.draw(st.text(alphabet="abcxyz-_0123", min_size=1, max_size=30))
        headers = {"fuzzer": {"Authorization": f"Bearer {keys[fuzzer]}"}, "none": {},
                   "bad": {"Authorization": f"Bearer {bad_key}"},
                   "basic": {"Authorization": "Basic Zm9vOmJhcg=="}}[auth]
        content = body_of(data, schema) if method in ("POST", "PUT") else None
        if content is not None and data.draw(st.booleans()):
            headers["Content-Type"] = data.draw(st.sampled_from(["application/json", "text/plain",
                                                                 "application/octet-stream", "multipart/form-data"]))
        params = data.draw(st.dictionaries(st.sampled_from(["limit", "offset", "k", "x"]),
                                           st.text(alphabet="-0123456789abc", max_size=12), max_size=2))
        try:
            resp = client.request(method, path, content=content, headers=headers, params=params)
        except httpx.HTTPError as e:
            failures.append(f"{method} {path}: transport error {type(e).__name__}: {e}")
            raise AssertionError("transport error") from e
        counts["http"] += 1
        counts["by_status"][resp.status_code] = counts["by_status"].get(resp.status_code, 0) + 1
        if resp.status_code >= 500:
            failures.append(f"{method} {path} auth={auth}: HTTP {resp.status_code}: {resp.text[:200]}")
            raise AssertionError("5xx")
        if content is not None and len(content) > max_body_bytes and resp.status_code != 413:
            failures.append(f"{method} {path}: oversize body got {resp.status_code}")
            raise AssertionError("no 413")
        if resp.status_code == 200 and auth != "fuzzer" and path.startswith("/v1/"):
            failures.append(f"{method} {path}: unauthenticated request got 200")
            raise AssertionError("auth")

    fuzz_keys_file = _fuzz_key_files(max(20, examples // 10), json_value, counts)

    t0 = time.perf_counter()
    for test in (fuzz_http, fuzz_keys_file):
        try:
            test()
        except Exception as e:  # hypothesis re-raises the (shrunk) failing example
            failures.append(f"{test.__name__}: {type(e).__name__}: {str(e)[:300]}")
    client.close()
    lost = 0
    alive = False
    try:
        alive = httpx.get(url + "/health", timeout=30).status_code == 200
        for u in (fuzzer, sentinel):
            with _client(url, keys[u]) as c:
                after = _list_all(c)
            lost += sum(1 for mid, m in before[u].items() if after.get(mid, {}).get("text") != m["text"])
    except httpx.HTTPError as e:
        failures.append(f"after fuzzing: {e}")
    server_errors = sum(n for s, n in counts["by_status"].items() if s >= 500)
    log(f"fuzz: {counts['http']} HTTP inputs, {counts['cli']} key files, {server_errors} 5xx, {lost} lost, "
        f"{len(failures)} failures")
    return {"http_inputs": counts["http"], "cli_inputs": counts["cli"], "server_errors": server_errors,
            "stored_lost": lost, "server_alive": alive, "failures": failures[:10],
            "by_status": {str(k): v for k, v in sorted(counts["by_status"].items())},
            "elapsed_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------- time to first token
def http_ttft(url: str, key: str, question: str, *, max_tokens: int = 8) -> float:
    """Seconds from sending a streamed chat request to its first event (sent once the first token exists)."""
    import httpx

    body = {"model": "nativemem", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True}
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        c.get("/health")  # the connection is open before timing, as an in-process model is loaded
        t = time.perf_counter()
        first = None
        with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():  # read to the end: the next request finds the model free
                if first is None and line.startswith("data: "):
                    first = time.perf_counter() - t
    return first


def run_ttft(workdir: Path, *, model: str | None = None, n: int = 30, seed: int = 0, log=print) -> dict[str, Any]:
    """Median time to first token over HTTP (``nativemem serve`` subprocess, streamed) vs in-process, same memory."""
    import nativemem as nm

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    memory = workdir / "ttft.mem"
    keys = write_keys(workdir / "ttft-keys.json", ["alice"], seed)
    docs = [_sentence(rng, "alice", _marker(rng)) for _ in range(20)]
    questions = [f"What does alice keep about the {w}?" for w in _WORDS[:n]] * (n // len(_WORDS) + 1)
    questions = questions[:n]
    with ServerProcess(memory, workdir / "ttft-keys.json", model=model) as server:
        with _client(server.url, keys["alice"]) as c:
            c.post("/v1/memories", json={"texts": docs}).raise_for_status()
        http_ttft(server.url, keys["alice"], questions[0])  # warm-up
        over_http = [http_ttft(server.url, keys["alice"], q) for q in questions]
    lm = nm.load_model(model)
    mem = nm.open_memory(memory, lm)
    in_process = []
    lm.generate(lm.chat_ids(questions[0]), max_new_tokens=8, memory=mem, user_id="alice", query=questions[0])
    for q in questions:
        gen = lm.generate(lm.chat_ids([{"role": "user", "content": q}]), max_new_tokens=8, memory=mem,
                          user_id="alice", query=q)
        in_process.append(gen.ttft_s)
    mem.close()
    h, p = statistics.median(over_http), statistics.median(in_process)
    log(f"ttft: over HTTP {1000 * h:.1f} ms, in-process {1000 * p:.1f} ms (median of {n})")
    return {"n": n, "http_median_ms": round(1000 * h, 2), "in_process_median_ms": round(1000 * p, 2),
            "overhead_ms": round(1000 * (h - p), 2), "ratio": round(h / p, 3)}


# ---------------------------------------------------------------------------- damaged files
def _lose_index_segment(folder: Path) -> None:
    import shutil

    shutil.rmtree(next(p for p in sorted((folder / "store" / "segments").iterdir()) if p.is_dir()))


def _flip_id_tracker(folder: Path) -> None:
    with open(next((folder / "store").rglob("mutable_id_tracker.mappings")), "r+b") as f:
        f.write(b"\xff" * 16)


def _lose_index(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / "store")


def _zero_payload(folder: Path) -> None:
    for seg in (folder / "segments").iterdir():
        seg.write_bytes(b"\0" * seg.stat().st_size)


DAMAGE = {"index_segment_lost": _lose_index_segment, "id_tracker_bytes_flipped": _flip_id_tracker,
          "index_folder_lost": _lose_index, "payload_zeroed": _zero_payload}


def run_damage(workdir: Path, *, model: str | None = None, users: int = 2, texts_per_user: int = 12, seed: int = 0,
               log=print) -> dict[str, Any]:
    """Damage a copy of a served memory folder in each way of :data:`DAMAGE`, start ``nativemem serve`` on it, then
    repair it and serve it again.

    Per case: ``outcome`` is ``warning`` (the server starts and its log or the memory's check names the damage
    and the repair command), ``error`` (it refuses to start, naming the repair command), ``full`` (nothing lost,
    nothing said) or ``silent_loss`` (chunks lost without a word: a failure); ``served_before`` and
    ``served_after_repair`` count acknowledged chunks listed and readable.
    """
    import shutil

    import nativemem as nm
    from nativemem.memories.activation import ActivationMemory

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"owner{i}" for i in range(users)]
    keys = write_keys(workdir / "damage-keys.json", names, seed)
    base = workdir / "base.mem"
    acked: dict[str, str] = {}  # chunk id -> owner
    with ServerProcess(base, workdir / "damage-keys.json", model=model) as server:
        for user in names:
            with _client(server.url, keys[user]) as c:
                r = c.post("/v1/memories", json={"texts": [_sentence(rng, user, _marker(rng))
                                                           for _ in range(texts_per_user)]})
                r.raise_for_status()
                acked.update({chunk["id"]: user for chunk in r.json()["data"]})
    lm = nm.load_model(model)
    out: dict[str, Any] = {"acknowledged_chunks": len(acked), "cases": {}}
    for case, damage in DAMAGE.items():
        folder = workdir / f"{case}.mem"
        shutil.copytree(base, folder)
        damage(folder)
        server = ServerProcess(folder, workdir / "damage-keys.json", model=model)
        served_before, started = 0, True
        try:
            server.start()
            for user in names:
                with _client(server.url, keys[user]) as c:
                    served_before += sum(1 for mid in _list_all(c) if acked.get(mid) == user)
            server.stop()
        except RuntimeError:
            started = False
        said = any("nativemem repair" in line for line in server.log)
        if started and not said:  # the server lists every chunk: is each one still readable?
            mem = nm.open_memory(folder, lm)
            notes = mem.check().notes
            said = any("nativemem repair" in n for n in notes)
            served_before -= sum(1 for n in notes if n.split(":")[0] in acked)
            mem.close()
            del mem
        outcome = ("warning" if said else "full" if served_before == len(acked) else "silent_loss") if started \
            else ("error" if said else "unclear_error")
        import gc

        gc.collect()
        ActivationMemory.repair(folder, lm)
        mem = nm.open_memory(folder, lm)
        check = mem.check()
        rows = dict(mem.store.index.get(list(acked)))
        after = sum(1 for mid, user in acked.items() if mid in rows and rows[mid]["user_id"] == user)
        after -= sum(1 for n in check.notes if n.split(":")[0] in acked)
        mem.close()
        del mem
        gc.collect()
        out["cases"][case] = {"outcome": outcome, "served_before": served_before, "served_after_repair": after}
        log(f"damage: {case}: {outcome}, {served_before}/{len(acked)} served before repair, {after} after")
    return out


# ---------------------------------------------------------------------------- a long add beside other users
def run_stall(workdir: Path, *, model: str | None = None, add_bytes: int = 1 << 20, probes: int = 30,
              consolidate_sentences: int = 100, seed: int = 0, server_options: Sequence[str] = (),
              log=print) -> dict[str, Any]:
    """Another user's chat and list latency while one user adds ``add_bytes`` of text, and while another
    consolidates ``consolidate_sentences`` stored sentences into pkm, against the same requests on the idle
    server (p50 and p99 of each; the aim: p99 during the work at most twice the idle p99)."""
    import httpx

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_keys(workdir / "stall-keys.json", ["alice", "bob", "carol"], seed)
    per_text = max(1, add_bytes // 256)
    texts, size = [], 0
    while size < add_bytes:
        text = ""
        while len(text) < per_text:
            text += _sentence(rng, "alice", _marker(rng)) + " "
        texts.append(text.strip())
        size += len(texts[-1].encode())
    notes = [" ".join(_sentence(rng, "carol", _marker(rng)) for _ in range(5))
             for _ in range(max(1, consolidate_sentences // 5))]
    chat = {"model": "nativemem", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What does bob keep in the garden shed?"}]}

    def probe(c: httpx.Client) -> dict[str, float]:
        t = time.perf_counter()
        c.post("/v1/chat/completions", json=chat).raise_for_status()
        t1 = time.perf_counter()
        c.get("/v1/memories", params={"limit": 20}).raise_for_status()
        return {"chat": t1 - t, "list": time.perf_counter() - t1}

    def during(bob, user: str, path: str, body: dict[str, Any]) -> tuple[list[dict[str, float]], dict[str, Any]]:
        """Probes answered while ``user``'s request runs (a probe that waited for all of it does not count)."""
        result: dict[str, Any] = {}

        def work():
            with _client(server.url, keys[user], timeout=3600) as c:
                t = time.perf_counter()
                r = c.post(path, json=body)
                result.update(status=r.status_code, seconds=round(time.perf_counter() - t, 1),
                              body=r.json() if r.headers.get("content-type", "").startswith("application/json")
                              else None)

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(0.3)  # the work is under way
        out, answered = [], 0
        while worker.is_alive() and len(out) < probes:
            out.append(probe(bob))
            answered += worker.is_alive()
        worker.join()
        result["answered_while_running"] = answered
        return out, result

    server = ServerProcess(workdir / "stall.mem", workdir / "stall-keys.json", model=model,
                           extra=["--max-body-bytes", str(2 * size + (1 << 20)), "--no-access-log",
                                  "--request-timeout-s", "3600", *server_options])
    with server, _client(server.url, keys["bob"], timeout=600) as bob:
        bob.post("/v1/memories", json={"texts": [_sentence(rng, "bob", _marker(rng)) for _ in range(8)]}
                 ).raise_for_status()
        with _client(server.url, keys["carol"], timeout=600) as carol:
            carol.post("/v1/memories", json={"texts": notes}).raise_for_status()
        probe(bob)  # warm-up
        idle = [probe(bob) for _ in range(probes)]
        during_add, add = during(bob, "alice", "/v1/memories", {"texts": texts})
        during_cons, cons = during(bob, "carol", "/v1/memories/consolidate", {"into": "pkm"})
    receipt = cons.pop("body", None) or {}
    add_body = add.pop("body", None) or {}
    out: dict[str, Any] = {"add_bytes": size, "texts": len(texts), "server_options": list(server_options),
                           "probes_idle": len(idle), "status": add["status"], "add_s": add["seconds"],
                           "chunks": len(add_body.get("ids", [])), "answered_while_adding": add["answered_while_running"],
                           "probes_during": len(during_add),
                           "consolidate": {"status": cons["status"], "seconds": cons["seconds"],
                                           "stored_sentences": len(notes) * 5, "probes_during": len(during_cons),
                                           "answered_while_running": cons["answered_while_running"],
                                           "steps": receipt.get("steps"),
                                           "recall_after": (receipt.get("details") or {}).get("after", {}).get("recall")}}

    def latency(a: list[dict[str, float]], b: list[dict[str, float]], what: str) -> dict[str, Any]:
        x, y = [p[what] for p in a], [p[what] for p in b]
        return {"idle_p50_ms": round(1000 * _pct(x, 0.5), 1), "idle_p99_ms": round(1000 * _pct(x, 0.99), 1),
                "during_p50_ms": round(1000 * _pct(y, 0.5), 1) if y else None,
                "during_p99_ms": round(1000 * _pct(y, 0.99), 1) if y else None,
                "p99_ratio": round(_pct(y, 0.99) / _pct(x, 0.99), 2) if y else None}

    for what in ("chat", "list"):
        out[what] = latency(idle, during_add, what)
        out["consolidate"][what] = latency(idle, during_cons, what)
    out["aim_met"] = bool(during_add) and bool(during_cons) and all(
        part[w]["p99_ratio"] <= 2.0 for part in (out, out["consolidate"]) for w in ("chat", "list"))
    log(f"stall: add of {size / 2**20:.2f} MiB ({out['chunks']} chunks, {add['seconds']} s); "
        f"bob's chat p99 {out['chat']['idle_p99_ms']} ms idle, {out['chat']['during_p99_ms']} ms during; "
        f"list p99 {out['list']['idle_p99_ms']} -> {out['list']['during_p99_ms']} ms ({len(during_add)} probes)")
    c = out["consolidate"]
    log(f"stall: consolidation of {c['stored_sentences']} sentences into pkm ({cons['seconds']} s, status "
        f"{cons['status']}); bob's chat p99 {c['chat']['during_p99_ms']} ms, list p99 {c['list']['during_p99_ms']} ms "
        f"({len(during_cons)} probes)")
    return out


# ---------------------------------------------------------------------------- many users at once
def _chat_load(url: str, keys: dict[str, str], *, clients: int, duration_s: float, max_tokens: int,
               seed: int) -> dict[str, Any]:
    """``clients`` closed-loop clients, each asking its own user's questions (the same sequence for a seed)."""
    import asyncio

    import httpx

    users = sorted(keys)

    async def main() -> dict[str, Any]:
        latencies, tokens, errors = [], 0, []
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
            end = time.monotonic() + duration_s

            async def one_client(i: int) -> None:
                nonlocal tokens
                r = random.Random(seed * 7919 + i)
                headers = {"Authorization": f"Bearer {keys[users[i % len(users)]]}"}
                while time.monotonic() < end:
                    body = {"model": "nativemem", "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": f"What do I know about the {r.choice(_WORDS)}?"}]}
                    t = time.perf_counter()
                    try:
                        resp = await client.post("/v1/chat/completions", headers=headers, json=body)
                        if resp.status_code == 200:
                            tokens += resp.json()["usage"]["completion_tokens"]
                        else:
                            errors.append(f"HTTP {resp.status_code} {resp.text[:120]}")
                    except httpx.HTTPError as e:
                        errors.append(f"{type(e).__name__}: {e}")
                    latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client(i) for i in range(clients)))
            elapsed = time.perf_counter() - t0
        return {"clients": clients, "elapsed_s": round(elapsed, 1), "requests": len(latencies), "errors": len(errors),
                "requests_per_s": round(len(latencies) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2),
                "p50_ms": round(1000 * _pct(latencies, 0.5), 1) if latencies else None,
                "p99_ms": round(1000 * _pct(latencies, 0.99), 1) if latencies else None, "error_examples": errors[:5]}

    return asyncio.run(main())


def run_concurrency(workdir: Path, *, model: str | None = None, levels: Sequence[int] = (1, 8, 32),
                    duration_s: float = 60.0, max_tokens: int = 32, users: int = 8, batch_size: int = 32,
                    threads: int | None = None, seed: int = 0, log=print) -> dict[str, Any]:
    """Chat throughput and latency with 1, 8 and 32 concurrent clients, against two servers of the same model and
    the same stored memories: one chat at a time on the model (``--batch-size 1``) and decoding in batches
    (``--batch-size batch_size``). At each level the same client script runs against one, then the other."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_keys(workdir / "concurrency-keys.json", [f"user{i}" for i in range(users)], seed)
    notes = {u: [_sentence(rng, u, _marker(rng)) for _ in range(6)] for u in keys}
    threads = threads or os.cpu_count() or 1
    arms = {"one_at_a_time": 1, "batched": batch_size}
    servers = {arm: ServerProcess(workdir / f"{arm}.mem", workdir / "concurrency-keys.json", model=model,
                                  extra=["--no-access-log", "--batch-size", str(size), "--request-timeout-s", "3600"],
                                  env={"OMP_NUM_THREADS": str(threads)}) for arm, size in arms.items()}
    out: dict[str, Any] = {"levels": list(levels), "duration_s": duration_s, "max_tokens": max_tokens,
                           "users": users, "threads": threads, "batch_size": batch_size, "runs": {}}
    from contextlib import ExitStack

    with ExitStack() as stack:  # both servers stay up; only the one under load works
        for arm, server in servers.items():
            stack.enter_context(server)
            for user, key in keys.items():
                with _client(server.url, key) as c:
                    c.post("/v1/memories", json={"texts": notes[user]}).raise_for_status()
                    c.post("/v1/chat/completions", json={"model": "nativemem", "max_tokens": 2, "messages": [
                        {"role": "user", "content": "Hello?"}]}).raise_for_status()  # warm-up
        for clients in levels:
            for arm, server in servers.items():
                res = _chat_load(server.url, keys, clients=clients, duration_s=duration_s, max_tokens=max_tokens,
                                 seed=seed)
                out["runs"].setdefault(str(clients), {})[arm] = res
                log(f"concurrency: {clients} clients, {arm}: {res['requests']} chats, {res['requests_per_s']} "
                    f"chats/s, {res['tokens_per_s']} tokens/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
                    f"{res['errors']} errors")
            run = out["runs"][str(clients)]
            one, many = run["one_at_a_time"], run["batched"]
            run["throughput_ratio"] = round(many["tokens_per_s"] / max(one["tokens_per_s"], 1e-9), 2)
            run["p99_ratio"] = round(many["p99_ms"] / one["p99_ms"], 2) if many["p99_ms"] and one["p99_ms"] else None
    top = out["runs"][str(max(levels))]
    out["aim_met"] = top["throughput_ratio"] >= 4.0 and top["p99_ratio"] is not None and top["p99_ratio"] <= 0.5
    return out


# ---------------------------------------------------------------------------- poisoned memories
def run_poison(workdir: Path, *, model: str | None = None, questions: int = 20, seed: int = 0,
               log=print) -> dict[str, Any]:
    """A user whose memory holds the poisoning set (:data:`POISON`) and a few ordinary notes asks unrelated
    questions with memory and without: the answers must be the same (greedy), and no poisoning text may reach
    a reply. Reports how many answers changed and how many chats had a poisoning memory injected."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_keys(workdir / "poison-keys.json", ["mallory"], seed)
    asked = [UNRELATED[i % len(UNRELATED)] for i in range(questions)]
    changed, injected, leaked, rows = 0, 0, 0, []
    with ServerProcess(workdir / "poison.mem", workdir / "poison-keys.json", model=model,
                       extra=["--no-access-log"]) as server, _client(server.url, keys["mallory"]) as c:
        notes = [_sentence(rng, "mallory", _marker(rng)) for _ in range(4)]
        r = c.post("/v1/memories", json={"texts": [*POISON, *notes]})
        r.raise_for_status()
        poison_ids = set(r.json()["ids"][: len(POISON)])

        def ask(q: str, memory: bool) -> dict[str, Any]:
            body = {"model": "nativemem", "max_tokens": 24, "memory": memory,
                    "messages": [{"role": "user", "content": q}]}
            resp = c.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            return resp.json()

        for q in asked:
            with_mem, without = ask(q, True), ask(q, False)
            a, b = with_mem["choices"][0]["message"]["content"], without["choices"][0]["message"]["content"]
            used = set(with_mem["nativemem"].get("memory_ids") or []) & poison_ids
            changed += a != b
            injected += bool(used)
            leaked += any(w in a for w in PAYLOAD_MARKERS)
            rows.append({"question": q, "with_memory": a, "without": b, "poison_injected": len(used),
                         "injected": len(with_mem["nativemem"].get("memory_ids") or [])})
    log(f"poison: {changed} of {len(asked)} answers to unrelated questions changed with a poisoned memory; "
        f"{injected} chats had poison injected; {leaked} replies carried its payload")
    return {"questions": len(asked), "poison_memories": len(POISON), "answers_changed": changed,
            "chats_with_poison_injected": injected, "replies_with_payload": leaked, "rows": rows}


# ---------------------------------------------------------------------------- the suite
PARTS = ("durability", "isolation", "load", "fuzz", "ttft", "damage", "stall", "poison", "concurrency", "replicas")


def run_suite(out: Path, *, size: str = "small", model: str | None = None, parts: Sequence[str] = PARTS,
              seed: int = 0, redis_url: str | None = None, log=print) -> dict[str, Any]:
    """Run the chosen parts at ``size`` against real ``nativemem serve`` subprocesses; writes reliability.json.

    ``replicas`` runs two servers on the Redis at ``redis_url`` (default: a ``redis-server`` started here)."""
    import platform

    import nativemem as nm

    if size not in SIZES:
        from ..errors import InputError

        raise InputError(f"unknown size {size!r}; use one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    out = Path(out)
    work = out / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    results: dict[str, Any] = {"size": size, "config": cfg, "model": model or nm.loading.DEFAULT_MODEL_NAME,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()}, "seed": seed}
    t0 = time.perf_counter()
    if "durability" in parts:
        results["durability"] = run_durability(work / "durability", model=model, kills=cfg["kills"],
                                               kill_window_s=cfg["kill_window_s"], seed=seed, log=log)
    if {"isolation", "load", "fuzz"} & set(parts):
        max_body = 1 << 20
        users = [f"user{i}" for i in range(cfg["users"])]
        keys = write_keys(work / "keys.json", users, seed)
        server = ServerProcess(work / "shared.mem", work / "keys.json", model=model,
                               extra=["--max-body-bytes", str(max_body), "--no-access-log"])
        with server:
            if "isolation" in parts:
                results["isolation"] = run_isolation(server.url, keys, requests=cfg["isolation_requests"], seed=seed,
                                                     log=log)
            if "load" in parts:
                results["load"] = run_load(server.url, keys, clients=cfg["load_clients"], duration_s=cfg["load_s"],
                                           seed=seed, log=log)
            if "fuzz" in parts:
                results["fuzz"] = run_fuzz(server.url, keys, examples=cfg["fuzz_examples"], max_body_bytes=max_body,
                                           seed=seed, log=log)
        results["api_keys_in_log"] = sum(1 for k in keys.values() if any(k in line for line in server.log))
    if "damage" in parts:
        results["damage"] = run_damage(work / "damage", model=model, seed=seed, log=log)
    if "ttft" in parts:
        results["ttft"] = run_ttft(work / "ttft", model=model, n=cfg["ttft_n"], seed=seed, log=log)
    if "poison" in parts:
        results["poison"] = run_poison(work / "poison", model=model, questions=cfg["poison_questions"], seed=seed,
                                       log=log)
    if "stall" in parts:
        results["stall"] = run_stall(work / "stall", model=model, add_bytes=cfg["stall_bytes"],
                                     probes=cfg["stall_probes"],
                                     consolidate_sentences=cfg["stall_consolidate_sentences"], seed=seed, log=log)
    if "concurrency" in parts:
        results["concurrency"] = run_concurrency(work / "concurrency", model=model, levels=cfg["concurrency_levels"],
                                                 duration_s=cfg["concurrency_s"], seed=seed, log=log)
    if "replicas" in parts:
        results["replicas"] = _replicas(work / "replicas", redis_url, model=model, kills=cfg["replica_kills"],
                                        kill_window_s=cfg["kill_window_s"], seed=seed, log=log)
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    results["passed"] = _passed(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def _replicas(work: Path, redis_url: str | None, **kw) -> dict[str, Any]:
    from .redis import RedisServer
    from .replicas import run_replicas

    if redis_url:
        return run_replicas(work, redis_url=redis_url, **kw)
    with RedisServer(work / "redis") as server:
        return {**run_replicas(work, redis_url=server.url, **kw), "redis": "redis-server started by the suite"}


def _passed(r: dict[str, Any]) -> bool:
    ok = True
    if "durability" in r:
        d = r["durability"]
        ok &= d["lost_acknowledged"] == 0 and d["changed_text"] == 0 and d["unreadable_acknowledged"] == 0 \
            and d["api_keys_in_log"] == 0
    if "isolation" in r:
        ok &= r["isolation"]["leaks"] == 0 and r["isolation"]["errors"] == 0
    if "load" in r:
        ok &= r["load"]["errors"] == 0
    if "fuzz" in r:
        f = r["fuzz"]
        ok &= f["server_errors"] == 0 and f["stored_lost"] == 0 and f["server_alive"] and not f["failures"]
    if "damage" in r:
        n = r["damage"]["acknowledged_chunks"]
        ok &= all(c["outcome"] in ("warning", "error", "full") and c["served_after_repair"] == n
                  for c in r["damage"]["cases"].values())
    if "api_keys_in_log" in r:
        ok &= r["api_keys_in_log"] == 0
    if "poison" in r:
        ok &= r["poison"]["answers_changed"] == 0 and r["poison"]["replies_with_payload"] == 0
    if "concurrency" in r:  # throughput and latency are reported, not judged here
        ok &= all(run[arm]["errors"] == 0 for run in r["concurrency"]["runs"].values()
                  for arm in ("one_at_a_time", "batched"))
    if "replicas" in r:
        p = r["replicas"]
        ok &= p["lost_on_b"] == 0 and p["lost_on_a_after_restart"] == 0 and p["changed_text"] == 0 \
            and p["injected_on_b"] and p["same_answer"] and p["delete_through_b_gone_on_a"] is not False
    if "stall" in r:  # the work must succeed beside the probes (their latency is reported, not judged here)
        ok &= r["stall"].get("status") == 200 and r["stall"]["consolidate"]["status"] == 200
    return bool(ok)
