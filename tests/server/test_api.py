"""The HTTP API over real uvicorn on 127.0.0.1: OpenAI client, memories per user, bad input, cancellation."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import MAX_BODY, start_server

from nativemem.errors import InputError
from nativemem.server import ServerSettings, load_api_keys
from nativemem.server.engine import Cancelled, Stop


def _client(served, user=None):
    return httpx.Client(base_url=served.url, headers=served.headers(user) if user else {}, timeout=60)


def _chat(question="What is my note?", **extra):
    return {"model": "nativemem", "messages": [{"role": "user", "content": question}], "max_tokens": 6, **extra}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_health_is_open_and_everything_else_needs_a_key(served):
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/memories"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/memories"), ("POST", "/v1/memories/search"), ("DELETE", "/v1/memories/x"),
                         ("DELETE", "/v1/memories"), ("GET", "/v1/memories/export"), ("POST", "/v1/memories/import")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.keys['alice']}"}):
            r = httpx.request(method, served.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert served.keys["alice"] not in r.text


def test_openai_client_chat_streaming_and_models(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.keys["alice"], max_retries=0)
    with _client(served, "alice") as c:
        assert c.post("/v1/memories", json={"text": "Alice's locker code is zq0123456789ab."}).status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [served.lm.name, "nativemem"]  # the model and the alias
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is my locker code?"}]
    resp = client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=6,
                                          extra_body={"top_k": 1})
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens >= 1 and resp.choices[0].finish_reason in ("stop", "length")
    extra = resp.model_extra["nativemem"]
    assert len(extra["memory_ids"]) == 1 and extra["prefix_tokens"] > 0
    stream = client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=6, stream=True,
                                            extra_body={"top_k": 1}, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == resp.choices[0].message.content  # greedy: the same answer, streamed
    assert usage.completion_tokens == resp.usage.completion_tokens
    off = client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=6,
                                         extra_body={"memory": False})
    assert off.model_extra["nativemem"]["memory_ids"] == [] and off.model_extra["nativemem"]["prefix_tokens"] == 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_memories_are_visible_only_to_their_owner(served):
    with _client(served, "alice") as a, _client(served, "bob") as b:
        r = a.post("/v1/memories", json={"texts": ["Alice hides zq00000000a11c in the attic.",
                                                   "Alice's second note zq00000000a12c."], "metadata": {"tag": "t"}})
        assert r.status_code == 200, r.text
        body = r.json()
        ids, sources = body["ids"], body["source_ids"]
        assert len(ids) == 2 and len(sources) == 2 and body["data"][0]["metadata"] == {"tag": "t"}
        for mid in ids:
            assert a.get(f"/v1/memories/{mid}").json()["text"].startswith("Alice")
            got = b.get(f"/v1/memories/{mid}")
            assert got.status_code == 404 and mid not in got.text
            assert b.delete(f"/v1/memories/{mid}").status_code == 404
        assert b.delete(f"/v1/memories/{sources[0]}").status_code == 404  # nor by source id
        listed = b.get("/v1/memories").json()
        assert all(m["id"] not in ids for m in listed["data"]) and "a11c" not in json.dumps(listed)
        hits = b.post("/v1/memories/search", json={"query": "Alice attic zq00000000a11c", "k": 50}).json()["data"]
        assert all(h["id"] not in ids for h in hits)
        chat = b.post("/v1/chat/completions", json=_chat("Where does Alice hide it?", top_k=8)).json()
        assert not set(chat["nativemem"]["memory_ids"]) & set(ids)
        mine = a.post("/v1/chat/completions", json=_chat("Where does Alice hide zq00000000a11c?", top_k=8)).json()
        owned = {m["id"] for m in a.get("/v1/memories", params={"limit": 1000}).json()["data"]}
        assert set(mine["nativemem"]["memory_ids"]) <= owned and mine["nativemem"]["memory_ids"]
        # the owner deletes one chunk by id and the other by its source id
        assert a.delete(f"/v1/memories/{ids[0]}").json()["ids"] == [ids[0]]
        assert a.delete(f"/v1/memories/{sources[1]}").json()["ids"] == [ids[1]]
        assert a.get(f"/v1/memories/{ids[1]}").status_code == 404


def test_list_pagination(served):
    with _client(served, "carol") as c:
        c.post("/v1/memories", json={"texts": [f"Carol's note number {i}." for i in range(5)]}).raise_for_status()
        page = c.get("/v1/memories", params={"limit": 2, "offset": 1}).json()
        assert page["total"] >= 5 and len(page["data"]) == 2 and page["has_more"]
        for bad in ({"limit": 0}, {"limit": 10 ** 9}, {"offset": -1}, {"limit": "x"}):
            assert c.get("/v1/memories", params=bad).status_code == 400


BAD_BODIES = [
    ("/v1/chat/completions", b"{", "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe{}", "UTF-8"),
    ("/v1/chat/completions", b"", "empty"),
    ("/v1/chat/completions", b"[1, 2]", "JSON object"),
    ("/v1/chat/completions", b"\x00\x01binary\x02", "JSON"),
    ("/v1/chat/completions", b'{"model": "x", "messages": []}', "messages"),
    ("/v1/chat/completions", json.dumps(_chat(max_tokens=-5)).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps(_chat(max_tokens=10 ** 30)).encode(), "64 bits"),
    ("/v1/chat/completions", json.dumps(_chat(max_tokens=4000)).encode(), "window"),
    ("/v1/chat/completions", json.dumps(_chat(top_k=0)).encode(), "top_k"),
    ("/v1/chat/completions", json.dumps(_chat(top_k=10 ** 6)).encode(), "top_k"),
    ("/v1/chat/completions", json.dumps(_chat(n=3)).encode(), "n"),
    ("/v1/chat/completions", json.dumps(_chat(question="\x00\x01\x02")).encode(), "binary"),
    ("/v1/chat/completions", json.dumps(_chat(question="  ")).encode(), "whitespace"),
    ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "tool", "content": "x"}]}', "role"),
    ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
     "NaN"),
    ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "nested"),
    ("/v1/memories", b'{"text": "a", "texts": ["b"]}', "exactly one"),
    ("/v1/memories", b'{"texts": []}', "texts"),
    ("/v1/memories", b'{"text": 5}', "text"),
    ("/v1/memories", b'{"text": "ok", "metadata": {"source_id": "x"}}', "reserved"),
    ("/v1/memories", b'{"text": "ok", "metadata": [1]}', "metadata"),
    ("/v1/memories", b'{"text": "ok", "metadata": {"n": 1e999}}', "not finite"),
    ("/v1/memories/search", b'{"query": "x", "k": -1}', "k"),
    ("/v1/memories/search", b'{"query": "x", "k": "3"}', "k"),
    ("/v1/chat/completions", json.dumps(_chat(top_k="3")).encode(), "top_k"),
    ("/v1/chat/completions", json.dumps(_chat(top_k=True)).encode(), "top_k"),
    ("/v1/memories/search", b'{"query": ""}', "query"),
]


@pytest.mark.parametrize("path,body,words", BAD_BODIES, ids=[f"{p}:{b[:20]!r}" for p, b, _ in BAD_BODIES])
def test_bad_input_gets_a_clear_400_and_changes_nothing(served, path, body, words):
    before = served.memory.store.index.count()
    with _client(served, "alice") as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text
    assert served.memory.store.index.count() == before


def test_oversize_body_gets_413(served):
    with _client(served, "alice") as c:
        r = c.post("/v1/memories", content=b'{"text": "' + b"a" * MAX_BODY + b'"}')
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted while reading
            for _ in range(MAX_BODY // 1000 + 2):
                yield b"a" * 1000

        assert c.post("/v1/memories", content=chunks()).status_code == 413
        assert c.get("/v1/memories").status_code == 200  # the server is fine


def test_unknown_routes_and_methods_are_4xx(served):
    with _client(served, "alice") as c:
        assert c.get("/v1/nothing").status_code == 404
        r = c.get("/v1/memories/", headers={"Host": "evil.example.com"})  # never redirected to the request's host
        assert r.status_code == 404 and "location" not in r.headers
        assert c.put("/v1/memories").status_code == 405
        assert c.get("/v1/models/other-model").status_code == 404
        assert c.get(f"/v1/models/{served.lm.name}").json()["id"] == served.lm.name


def test_concurrent_requests_give_the_answers_they_give_alone(served):
    with _client(served, "bob") as b:
        b.post("/v1/memories", json={"texts": ["Bob's bike is zq0000000b1ce0.", "Bob likes green tea."]})
    questions = [("alice", "What is my code?"), ("bob", "What is my bike?"), ("carol", "What is note 3?"),
                 ("bob", "Which tea?")] * 3
    alone = {}
    for user, q in set(questions):
        with _client(served, user) as c:
            alone[user, q] = c.post("/v1/chat/completions", json=_chat(q, max_tokens=12)).json()
    results, errors = {}, []

    def ask(i, user, q, stream):
        try:
            with _client(served, user) as c:
                if stream:
                    r = c.post("/v1/chat/completions", json=_chat(q, max_tokens=12, stream=True))
                    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                                   for line in r.text.splitlines() if line.startswith("data: {")
                                   and json.loads(line[6:])["choices"])
                else:
                    text = c.post("/v1/chat/completions", json=_chat(q, max_tokens=12)).json()["choices"][0][
                        "message"]["content"]
                results[i] = (user, q, text)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, u, q, i % 2 == 1)) for i, (u, q) in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for user, q, text in results.values():
        assert text == alone[user, q]["choices"][0]["message"]["content"]
    assert _hooks(served.lm.model) == 0


def test_a_cancelled_stream_leaves_no_hook_and_frees_the_model(served):
    with _client(served, "alice") as c:
        with c.stream("POST", "/v1/chat/completions", json=_chat("Tell me a long story.", max_tokens=300,
                                                                  stream=True)) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then the client goes away mid-generation
        r = c.post("/v1/chat/completions", json=_chat(max_tokens=3))
        assert r.status_code == 200
    assert _hooks(served.lm.model) == 0


def test_generation_stops_at_the_deadline_without_leftovers(served):
    from nativemem.server.engine import Engine

    engine = Engine(served.lm, served.memory)
    before = served.memory.store.index.count()
    with pytest.raises(Cancelled, match="timed out"):
        engine.generate([{"role": "user", "content": "hello"}], user_id="alice", max_new_tokens=50, use_memory=True,
                        top_k=2, stop=Stop(deadline=0.0))
    with pytest.raises(Cancelled):
        engine.add(["never written"], user_id="alice", metadata={}, stop=Stop(deadline=0.0))
    stop = Stop(deadline=float("inf"))
    tokens = []

    def cancel_after_two(ids):
        tokens.append(ids)
        if len(tokens) == 2:
            stop.event.set()

    with pytest.raises(Cancelled, match="cancelled"):
        engine.generate([{"role": "user", "content": "hello"}], user_id="alice", max_new_tokens=50, use_memory=True,
                        top_k=2, stop=stop, on_token=cancel_after_two)
    assert len(tokens) == 2 and _hooks(served.lm.model) == 0
    assert served.memory.store.index.count() == before


def test_a_failed_write_is_rolled_back(served, monkeypatch):
    mem = served.memory
    before = mem.store.index.count()
    real_add = mem.add

    def add_then_fail(*args, **kwargs):
        real_add(*args, **kwargs)  # the chunks are stored...
        raise RuntimeError("disk on fire")  # ...then something breaks before the acknowledgement

    monkeypatch.setattr(mem, "add", add_then_fail)
    with _client(served, "alice") as c:
        r = c.post("/v1/memories", json={"texts": ["first text", "second text"]})
    assert r.status_code == 500 and "disk on fire" not in r.text
    assert mem.store.index.count() == before


def test_request_timeout_answers_503_or_504(model_dir):
    with start_server(model_dir, ["u"], settings=ServerSettings(request_timeout_s=0.001)) as s:
        with httpx.Client(base_url=s.url, headers=s.headers("u"), timeout=60) as c:
            r = c.post("/v1/chat/completions", json=_chat(max_tokens=200))
            assert r.status_code in (503, 504), r.text
            assert c.get("/v1/memories").status_code == 200
        assert _hooks(s.lm.model) == 0


def test_api_key_file_errors_never_show_keys(tmp_path, monkeypatch):
    secret = "sk-very-secret-123"
    cases = [b"", b"\xff\xfe", f'{{"{secret}": "alice",'.encode(), f'["{secret}"]'.encode(),
             f'{{"{secret}": ""}}'.encode(), f'{{"{secret}": 5}}'.encode(), b"{}", f'{{" {secret}": "a"}}'.encode(),
             f'{{"{secret}": "alice", "{secret}": "bob"}}'.encode(),  # one key for two users: refused
             f'{{"{secret}é": "alice"}}'.encode(),  # cannot travel in an HTTP header: refused
             f'{{"{secret}": "alice "}}'.encode()]  # "alice " and "alice" would be two users: refused
    for i, content in enumerate(cases):
        path = tmp_path / f"keys{i}.json"
        path.write_bytes(content)
        with pytest.raises(InputError) as e:
            load_api_keys(path)
        assert secret not in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        load_api_keys(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({secret: "alice", "other-key": "bob"}))
    monkeypatch.setenv("NATIVEMEM_API_KEYS_FILE", str(good))
    ring = load_api_keys()
    assert ring.user_for(secret) == "alice" and ring.user_for("nope") is None and ring.users() == {"alice", "bob"}


def test_serve_command_refuses_to_run_without_keys_or_off_loopback(tmp_path, model_dir, monkeypatch):
    from typer.testing import CliRunner

    from nativemem.cli.main import app

    monkeypatch.delenv("NATIVEMEM_API_KEYS_FILE", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["serve", "--memory", str(tmp_path / "m"), "--model", str(model_dir)])
    assert res.exit_code == 2 and "no API keys" in res.output
    res = runner.invoke(app, ["serve", "--memory", str(tmp_path / "m"), "--no-auth", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "loopback" in res.output
    bad = tmp_path / "keys.json"
    bad.write_text('{"k": ')
    res = runner.invoke(app, ["serve", "--memory", str(tmp_path / "m"), "--api-keys", str(bad)])
    assert res.exit_code == 2 and "not valid JSON" in " ".join(res.output.split())


def test_a_client_that_gives_up_frees_the_model(served):
    """A non-streamed request whose client times out is stopped; the next request is served at once."""
    import time

    eos = list(served.lm.eos_token_ids)

    def no_eos(module, args, output):  # the random model must not end its story early
        output[..., eos] = float("-inf")
        return output

    handle = served.lm.model.get_output_embeddings().register_forward_hook(no_eos)
    with _client(served, "alice") as c:
        try:
            with pytest.raises(httpx.TimeoutException):
                c.post("/v1/chat/completions", json=_chat("Tell me a long story.", max_tokens=300, memory=False),
                       timeout=0.05)
        finally:
            handle.remove()
        t = time.perf_counter()
        r = c.post("/v1/chat/completions", json=_chat(max_tokens=2, memory=False))
        assert r.status_code == 200
    assert _hooks(served.lm.model) == 0
    assert time.perf_counter() - t < 30


def test_the_gate_decides_what_is_injected_and_the_reply_lists_every_hit(served):
    """With a gate nothing passes, the answer is the memory-off answer; the reply lists each hit's scores."""
    mem = served.memory
    with _client(served, "carol") as c:
        r = c.post("/v1/memories", json={"texts": ["Carol's bike is green.", "Carol's flat is on floor nine.",
                                                   "Carol plays the oboe."]})
        assert r.status_code == 200
        found = c.post("/v1/memories/search", json={"query": "What colour is my bike?", "k": 3}).json()["data"]
        assert len(found) == 3 and all(0.0 <= h["relevance"] <= 1.0 for h in found)
        off = c.post("/v1/chat/completions", json=_chat("What colour is my bike?", memory=False)).json()
        saved = mem.config.gate_threshold
        try:
            mem.config.gate_threshold = 1.0  # no probability reaches 1
            closed = c.post("/v1/chat/completions", json=_chat("What colour is my bike?", top_k=3)).json()
            mem.config.gate_threshold = 0.0  # every top_k hit, as without a gate
            opened = c.post("/v1/chat/completions", json=_chat("What colour is my bike?", top_k=2)).json()
        finally:
            mem.config.gate_threshold = saved
    extra = closed["nativemem"]
    assert extra["memory_ids"] == [] and extra["prefix_tokens"] == 0
    assert closed["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]
    assert len(extra["hits"]) == 3
    assert {h["id"] for h in extra["hits"]} == {h["id"] for h in found}
    for h in extra["hits"]:
        assert not h["injected"] and h["reason"] == "below_threshold" and 0.0 <= h["relevance"] < 1.0
    assert all(h["injected"] for h in opened["nativemem"]["hits"])
    assert len(opened["nativemem"]["memory_ids"]) == 2 and opened["nativemem"]["prefix_tokens"] > 0


def test_sampling_stop_strings_usage_and_refused_parameters(served):
    """temperature 0 is greedy bit for bit, a seed makes sampling reproducible, stop strings end the answer (also
    streamed), usage counts every attended token, and parameters the server cannot honour get a 400 by name."""
    import openai

    eos = list(served.lm.eos_token_ids)

    def no_eos(module, args, output):  # the random model must produce its full max_tokens
        output[..., eos] = float("-inf")
        return output

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.keys["alice"], max_retries=0)
    msgs = [{"role": "user", "content": "Say something long."}]

    def ask(**kw):
        return client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=16,
                                              extra_body={"memory": False}, **kw)

    handle = served.lm.model.get_output_embeddings().register_forward_hook(no_eos)
    try:
        greedy = ask()
        assert ask(temperature=0).choices[0].message.content == greedy.choices[0].message.content
        a, b = ask(temperature=1.5, seed=7), ask(temperature=1.5, seed=7)
        assert a.choices[0].message.content == b.choices[0].message.content
        text = greedy.choices[0].message.content
        assert greedy.choices[0].finish_reason == "length" and len(text) >= 8, text
        stop = text[4:7]
        cut = ask(stop=[stop, "\u2603never"])
        assert cut.choices[0].message.content == text[: text.index(stop)].strip()
        assert cut.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=16, stream=True,
                                                  stop=stop, extra_body={"memory": False})
        parts = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
        assert "".join(parts) == cut.choices[0].message.content
    finally:
        handle.remove()
    prompt = served.lm.chat_ids(msgs, system=served.memory.chat_system).shape[1]
    assert greedy.usage.prompt_tokens == prompt and greedy.usage.completion_tokens == 16
    for bad, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                       ({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"presence_penalty": 0.5}, "presence_penalty"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                       ({"stop": [""]}, "stop"), ({"top_p": 0}, "top_p"), ({"temperature": 3}, "temperature"),
                       ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=2, **bad)
        assert param in str(err.value), (bad, str(err.value))
    ok = client.chat.completions.create(model=served.lm.name, messages=msgs, max_tokens=2,
                                        response_format={"type": "text"})
    assert ok.choices[0].message.role == "assistant"


def test_the_openapi_schema_describes_the_request_bodies(served):
    spec = httpx.get(served.url + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "temperature", "stop", "memory", "top_k"} <= set(body["properties"])
    assert "query" in spec["paths"]["/v1/memories/search"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]
    assert httpx.get(served.url + "/docs").status_code == 200


def test_export_import_and_reset_stay_within_the_caller(model_dir):
    """GET /v1/memories/export gives the caller's own chunks; POST /v1/memories/import makes them the caller's
    under new ids; DELETE /v1/memories needs confirm and removes only the caller's."""
    with start_server(model_dir, ["dora", "ed"]) as s, _client(s, "dora") as d, _client(s, "ed") as e:
        ids = d.post("/v1/memories", json={"texts": ["Dora keeps zq0000000d01a in the red box.",
                                                     "Dora's bike is green."]}).json()["ids"]
        e.post("/v1/memories", json={"text": "Ed's note zq0000000e01d."})
        r = d.get("/v1/memories/export")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.text.splitlines()
        assert len(lines) == 3 and "e01d" not in r.text and '"dora"' not in r.text
        assert [json.loads(line)["id"] for line in lines[1:]] == ids
        imported = e.post("/v1/memories/import", content=r.text.encode())
        assert imported.status_code == 200, imported.text
        new_ids = imported.json()["ids"]
        assert imported.json()["imported"] == 2 and not set(new_ids) & set(ids)
        texts = {m["text"] for m in e.get("/v1/memories").json()["data"]}
        assert "Dora's bike is green." in texts and len(texts) == 3
        assert d.get(f"/v1/memories/{new_ids[0]}").status_code == 404  # the copy is Ed's
        bad = e.post("/v1/memories/import", content=(lines[0] + "\n{broken\n").encode())
        assert bad.status_code == 400 and "line 2" in bad.json()["error"]["message"]
        assert len(e.get("/v1/memories").json()["data"]) == 3  # nothing half-imported
        refused = e.request("DELETE", "/v1/memories", json={})
        assert refused.status_code == 400 and "confirm" in refused.text
        done = e.request("DELETE", "/v1/memories", json={"confirm": True})
        assert done.status_code == 200 and done.json()["deleted"] == 3
        assert e.get("/v1/memories").json()["data"] == []
        assert [m["id"] for m in d.get("/v1/memories").json()["data"]] == ids


def test_update_and_history_over_http_answer_another_user_as_unknown(served):
    with _client(served, "alice") as a, _client(served, "bob") as b:
        mid = a.post("/v1/memories", json={"text": "Alice's locker code is 1234."}).json()["ids"][0]
        r = a.put(f"/v1/memories/{mid}", json={"text": "Alice's locker code is 9876."})
        assert r.status_code == 200 and r.json()["text"] == "Alice's locker code is 9876." and r.json()["id"] == mid
        for other in (b.put(f"/v1/memories/{mid}", json={"text": "hijacked"}), b.get(f"/v1/memories/{mid}/history"),
                      a.put("/v1/memories/no-such-id", json={"text": "x"})):
            assert other.status_code == 404 and mid not in other.text
        assert a.get(f"/v1/memories/{mid}").json()["text"] == "Alice's locker code is 9876."
        bad = a.put(f"/v1/memories/{mid}", json={})
        assert bad.status_code == 400 and "needs a new text" in bad.text
        history = a.get(f"/v1/memories/{mid}/history").json()["data"]
        assert [h["op"] for h in history] == ["add", "update"] and history[0]["text"] == "Alice's locker code is 1234."


def test_memory_write_remembers_the_exchange_once(served):
    with _client(served, "carol") as c:
        body = _chat("Carol's favourite colour is teal.", memory_write=True)
        first = c.post("/v1/chat/completions", json=body).json()
        remembered = first["nativemem"]["remembered"]
        if not first["choices"][0]["message"]["content"].strip():
            assert remembered == {"ids": [], "skipped": "empty answer"}
            return
        assert remembered["ids"] and remembered["duplicate"] is False and remembered["write_s"] > 0
        assert remembered["reused_kv"] is True  # written from the chat's own KV, no second pass
        stored = c.get(f"/v1/memories/{remembered['ids'][0]}").json()
        assert stored["text"].split()[:7] == "User: Carol's favourite colour is teal. Assistant:".split()
        again = c.post("/v1/chat/completions", json={**body, "memory": False}).json()["nativemem"]["remembered"]
        assert again["ids"] == [] and again["duplicate"] is True
        assert "remembered" not in c.post("/v1/chat/completions", json=_chat("Hi")).json()["nativemem"]


def test_a_long_add_does_not_stall_another_users_chat_and_list(model_dir):
    """An add takes the model one batch at a time and the store one commit at a time: another user's chat and
    list are answered while it is still writing, and the add is still all or nothing."""
    import time

    with start_server(model_dir, ["alice", "bob"], settings=ServerSettings(max_body_bytes=256 * 1024)) as s:
        texts = [" ".join(f"Note {n}.{m}: the parcel for flat {n} is at desk {m}." for m in range(10))
                 for n in range(200)]
        result: dict = {}

        def add():
            with _client(s, "alice") as c:
                result["response"] = c.post("/v1/memories", json={"texts": texts})
                result["done"] = time.monotonic()

        writer = threading.Thread(target=add)
        writer.start()
        with _client(s, "bob") as c:
            time.sleep(0.5)  # the add is under way
            chat = c.post("/v1/chat/completions", json=_chat("Hello?"))
            listed = c.get("/v1/memories")
            answered = time.monotonic()
        writer.join()
        assert chat.status_code == 200 and listed.status_code == 200 and listed.json()["data"] == []
        assert result["response"].status_code == 200, result["response"].text
        assert answered < result["done"], "bob waited for alice's whole add"
        ids = result["response"].json()["ids"]
        assert len(ids) >= len(texts)
        with _client(s, "alice") as c:
            listed = c.get("/v1/memories", params={"limit": 1000}).json()["data"]
        assert sorted(m["id"] for m in listed) == sorted(ids)


def test_chats_of_many_users_decode_together_each_with_its_own_memory(model_dir):
    """Concurrent chats share decode steps (the batcher ran rows side by side), each row with its own user's
    memory; every answer is the one the same request gets alone without batching (float64 model: no rounding
    ties), streamed or not; a client that leaves mid-stream does not stop the other rows."""
    import torch

    users = [f"user{i}" for i in range(6)]
    with start_server(model_dir, users, dtype=torch.float64) as s:
        own = {}
        for n, u in enumerate(users):
            with _client(s, u) as c:
                r = c.post("/v1/memories", json={"text": f"{u} keeps note {n} about parcel {n * 7} in locker {n}."})
                own[u] = set(r.json()["ids"])
        bodies = {u: _chat(f"Where is parcel {n * 7}?", max_tokens=5 + 3 * n) for n, u in enumerate(users)}
        got: dict = {}

        def ask(u, stream):
            with _client(s, u) as c:
                if not stream:
                    got[u, stream] = c.post("/v1/chat/completions", json=bodies[u]).json()
                    return
                text, extra = "", None
                with c.stream("POST", "/v1/chat/completions", json={**bodies[u], "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            text += chunk["choices"][0]["delta"].get("content", "")
                            extra = chunk.get("nativemem", extra)
                got[u, stream] = {"text": text, "nativemem": extra}

        def leave_early():
            with _client(s, users[0]) as c:
                with c.stream("POST", "/v1/chat/completions",
                              json={**_chat("Tell me everything.", max_tokens=400), "stream": True}) as r:
                    for line in r.iter_lines():
                        if '"content"' in line:
                            return  # the client goes away after its first token

        threads = [threading.Thread(target=ask, args=(u, st)) for u in users for st in (False, True)]
        threads.append(threading.Thread(target=leave_early))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batcher = s.app.state.engine.batcher
        assert batcher is not None and batcher.widest > 1, "no two chats ever decoded in one step"
        s.app.state.engine.batcher = None  # the same requests, one at a time, without batching
        try:
            for u in users:
                with _client(s, u) as c:
                    alone = c.post("/v1/chat/completions", json=bodies[u]).json()
                plain, streamed = got[u, False], got[u, True]
                answer = alone["choices"][0]["message"]["content"]
                assert plain["choices"][0]["message"]["content"] == answer and streamed["text"] == answer, u
                assert plain["usage"] == alone["usage"]
                assert plain["nativemem"]["memory_ids"] == alone["nativemem"]["memory_ids"]
                assert set(plain["nativemem"]["memory_ids"]) <= own[u] and plain["nativemem"]["memory_ids"]
                assert streamed["nativemem"]["memory_ids"] == plain["nativemem"]["memory_ids"]
        finally:
            s.app.state.engine.batcher = batcher
