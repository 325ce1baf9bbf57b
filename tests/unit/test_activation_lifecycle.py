"""Activation memory's lifecycle: items, get, reset, export and import (same or another model), reencode."""

import json

import pytest
import torch
from activation_helpers import fast_dir  # noqa: F401
from testing import save_tiny_lm, tiny_lm
from typer.testing import CliRunner

import nativemem as nm
from nativemem.errors import DataError, InputError
from nativemem.memories.activation import reencode_memory
from nativemem.memories.export import EXPORT_FORMAT

pytestmark = pytest.mark.usefixtures("one_thread")

ALICE = ["Alice keeps her spare key under the blue flower pot.", "Alice's cat is called Pepper.",
         "Alice parks on level four of the station garage."]
BOB = ["Bob parks his bicycle behind the old bakery.", "Bob's dog is called Biscuit."]
QUESTIONS = ["Where is the spare key?", "What is the cat called?", "Where does she park?", "Where is the bicycle?",
             "What is the dog called?"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def filled(lm, folder):
    mem = nm.open_memory(folder, lm, kind="activation")
    a = mem.add(ALICE, user_id="alice", metadata={"topic": "home"})
    b = mem.add(BOB, user_id="bob")
    return mem, a.ids, b.ids


def test_items_and_get_are_per_user_and_reset_removes_one_users_items(lm, fast_dir):
    mem, a, b = filled(lm, fast_dir / "m")
    items = mem.items(user_id="alice")
    assert [i["id"] for i in items] == a and [i["text"] for i in items] == ALICE
    assert all(i["metadata"] == {"topic": "home"} and i["user_id"] == "alice" for i in items)
    assert [i["id"] for i in mem.items(user_id="alice", limit=1, offset=1)] == a[1:2]
    assert mem.get(a[0], user_id="alice")["text"] == ALICE[0]
    assert mem.get(a[0], user_id="bob") is None and mem.get("no-such-id", user_id="bob") is None
    assert mem.items(user_id="carol") == []
    anonymous = mem.add(["A note written without a user."]).ids  # the default user counts apart from the others
    assert [mem.count(), mem.count(user_id="alice"), mem.count(user_id="bob"), mem.count(user_id="carol")] == [
        len(anonymous), len(a), len(b), 0]
    source = items[1]["source_id"]
    assert mem.items(user_id="alice", source_id=source) == [i for i in items if i["source_id"] == source]
    assert mem.items(user_id="bob", source_id=source) == []
    receipt = mem.reset("alice")
    assert sorted(receipt.ids) == sorted(a)
    assert mem.items(user_id="alice") == [] and [i["id"] for i in mem.items(user_id="bob")] == b
    assert mem.search("Where is the spare key?", user_id="alice") == []
    with pytest.raises(InputError, match="limit"):
        mem.items(user_id="bob", limit=0)


def test_export_then_import_for_the_same_model_gives_the_same_search_results(lm, fast_dir):
    mem, a, b = filled(lm, fast_dir / "m")
    mem.export(fast_dir / "all.jsonl")
    lines = (fast_dir / "all.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == EXPORT_FORMAT and header["items"] == 5 and "tensor" not in lines[1]
    copy = nm.open_memory(fast_dir / "copy", lm, kind="activation")
    receipt = copy.import_file(fast_dir / "all.jsonl")
    assert receipt.details == {"imported": 5, "duplicates": 0, "users": 2, "from_model": lm.name}
    for user in ("alice", "bob"):
        assert copy.items(user_id=user) == mem.items(user_id=user)  # ids, texts, times and metadata kept
        for q in QUESTIONS:
            got = [(h.id, round(h.score, 5)) for h in copy.search(q, k=3, user_id=user)]
            assert got == [(h.id, round(h.score, 5)) for h in mem.search(q, k=3, user_id=user)]
    prompt = lm.chat_ids(QUESTIONS[0])
    torch.testing.assert_close(lm.logits(prompt, memory=copy.injecting(a[:1])),
                               lm.logits(prompt, memory=mem.injecting(a[:1])))
    again = copy.import_file(fast_dir / "all.jsonl")  # importing twice stores nothing twice
    assert again.details["imported"] == 0 and again.details["duplicates"] == 5
    mem.export(fast_dir / "bob.jsonl", user_id="bob")
    assert json.loads((fast_dir / "bob.jsonl").read_text().splitlines()[0])["items"] == 2


def test_import_into_another_model_re_encodes_everything(lm, fast_dir):
    mem, a, b = filled(lm, fast_dir / "m")
    mem.export(fast_dir / "all.jsonl")
    other = tiny_lm("qwen3")
    new = nm.open_memory(fast_dir / "other", other, kind="activation")
    receipt = new.import_file(fast_dir / "all.jsonl")
    assert receipt.details["imported"] == 5 and receipt.tokens > 0
    assert [i["id"] for i in new.items(user_id="alice")] == a
    hits = new.search("Where is the spare key?", k=3, user_id="alice", variant="bm25")
    assert hits[0].id == a[0] and new.load_chunk(hits[0].payload)[0]


def test_bad_export_files_name_the_line_and_import_nothing(lm, fast_dir):
    mem, a, b = filled(lm, fast_dir / "m")
    path = fast_dir / "all.jsonl"
    mem.export(path)
    with pytest.raises(InputError, match="exists"):
        mem.export(path)
    mem.export(path, force=True)
    lines = path.read_text().splitlines()
    bad = fast_dir / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"id": "x", "text": 5}'] + lines[3:]) + "\n")
    target = nm.open_memory(fast_dir / "t", lm, kind="activation")
    with pytest.raises(DataError, match="line 4: field 'user_id'"):
        target.import_file(bad)
    bad.write_text("\n".join(lines[:2]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 3 is not JSON"):
        target.import_file(bad)
    newer = json.loads(lines[0]) | {"format": "nativemem-export/9"}
    bad.write_text("\n".join([json.dumps(newer)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match="newer"):
        target.import_file(bad)
    bad.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="truncated"):
        target.import_file(bad)
    assert target.items(user_id="alice") == [] and target.items(user_id="bob") == []


def test_reencode_and_the_lifecycle_commands(tmp_path):
    from nativemem.cli.main import app

    save_tiny_lm(tmp_path / "model")
    loaded = nm.load_model(tmp_path / "model")
    mem, a, b = filled(loaded, tmp_path / "m")
    mem.save()
    mem.close()
    del mem
    import gc

    gc.collect()
    model = ["--model", str(tmp_path / "model")]
    run = CliRunner().invoke
    res = run(app, ["list", "--memory", str(tmp_path / "m"), "--user", "alice", "--json", *model])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["id"] for line in res.output.splitlines()] == a
    res = run(app, ["get", a[0], "--memory", str(tmp_path / "m"), "--user", "bob", *model])
    assert res.exit_code == 2 and "no item" in res.output
    res = run(app, ["reset", "--memory", str(tmp_path / "m"), "--user", "bob", *model])
    assert res.exit_code == 2 and "--yes" in res.output
    res = run(app, ["export", "--memory", str(tmp_path / "m"), "--out", str(tmp_path / "e.jsonl"), *model])
    assert res.exit_code == 0 and "exported 5 item(s)" in res.output, res.output
    res = run(app, ["import", str(tmp_path / "e.jsonl"), "--memory", str(tmp_path / "i"), *model])
    assert res.exit_code == 0 and "imported 5 items of 2 users" in res.output, res.output
    res = run(app, ["update", a[0], "--memory", str(tmp_path / "m"), "--user", "alice", "--text",
                    "Alice keeps her spare key in the shed.", *model])
    assert res.exit_code == 0 and "version 2" in res.output, res.output
    res = run(app, ["history", a[0], "--memory", str(tmp_path / "m"), "--user", "alice", *model])
    assert [json.loads(line)["op"] for line in res.output.splitlines()] == ["add", "update"], res.output
    res = run(app, ["history", a[0], "--memory", str(tmp_path / "m"), "--user", "bob", *model])
    assert res.exit_code == 2 and "no item" in res.output
    res = run(app, ["reset", "--memory", str(tmp_path / "m"), "--user", "bob", "--yes", *model])
    assert res.exit_code == 0 and "deleted 2 item(s)" in res.output, res.output
    gc.collect()
    other = tiny_lm("qwen3")
    receipt = reencode_memory(tmp_path / "m", tmp_path / "q", other)
    assert receipt.details["imported"] == 3 and receipt.details["users"] == 1
    moved = nm.open_memory(tmp_path / "q", other)
    assert [i["id"] for i in moved.items(user_id="alice")] == a
    with pytest.raises(InputError, match="not an empty folder"):
        reencode_memory(tmp_path / "m", tmp_path / "q", other)


def test_update_keeps_the_id_reencodes_and_history_lists_every_version(lm, fast_dir):
    mem, a, b = filled(lm, fast_dir / "m")
    before = mem.get(a[1], user_id="alice")
    receipt = mem.update(a[1], text="Alice's cat is called Miso now.", user_id="alice")
    assert receipt.ids == [a[1]] and receipt.details["version"] == 2
    after = mem.get(a[1], user_id="alice")
    assert after["text"] == "Alice's cat is called Miso now." and after["created"] == before["created"]
    assert after["metadata"] == {"topic": "home"} and [i["id"] for i in mem.items(user_id="alice")] == a
    assert mem.search("Miso", k=1, user_id="alice", variant="bm25")[0].id == a[1]
    ids = mem.load_chunk(mem.store.index.get([a[1]])[0][1])[0]
    assert "Miso" in lm.tokenizer.decode(ids)  # the payload is the new text's KV
    mem.update(a[1], metadata={"topic": "pets"}, user_id="alice")
    assert mem.get(a[1], user_id="alice")["metadata"] == {"topic": "pets"}
    mem.delete(a[1])
    history = mem.history(a[1], user_id="alice")
    assert [h["op"] for h in history] == ["add", "update", "update", "delete"]
    assert [h.get("text") for h in history[:3]] == [ALICE[1], "Alice's cat is called Miso now.",
                                                    "Alice's cat is called Miso now."]
    assert all(x["time"] <= y["time"] for x, y in zip(history, history[1:]))
    assert mem.history(a[1], user_id="bob") == [] and mem.history("nope", user_id="alice") == []
    for bad, match in (({"text": "x"}, "no memory"), ({}, "needs a new text")):
        with pytest.raises(InputError, match=match):
            mem.update(b[0] if bad else a[0], user_id="alice", **bad)
    with pytest.raises(InputError, match="more than one chunk"):
        mem.update(a[0], text="word " * 400, user_id="alice")


def test_an_update_killed_before_it_was_acknowledged_leaves_the_old_version(lm, fast_dir):
    """The new version reached the catalog (unpublished) and the index (pending), then the process stopped: the
    next open serves the old version, re-encoded from the catalog."""
    mem, a, b = filled(lm, fast_dir / "m")
    old = mem.get(a[0], user_id="alice")
    real_publish = mem.store.catalog.publish
    mem.store.catalog.publish = lambda pending_id: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
    with pytest.raises(KeyboardInterrupt):
        mem.update(a[0], text="A new text that never got acknowledged.", user_id="alice")
    mem.store.catalog.publish = real_publish
    mem.close()
    del mem
    import gc

    gc.collect()
    mem = nm.open_memory(fast_dir / "m", lm)
    assert mem.get(a[0], user_id="alice")["text"] == old["text"]
    assert "acknowledged" not in " ".join(h.get("text") or "" for h in mem.history(a[0], user_id="alice"))
    assert len(mem.items(user_id="alice")) == 3 and mem.damage == {}


def test_a_failed_update_leaves_the_old_version(lm, fast_dir, monkeypatch):
    mem, a, b = filled(lm, fast_dir / "m")
    old = mem.get(a[2], user_id="alice")
    index = mem.store.index
    real = index.upsert

    def fail(points):
        real(points)  # the new version reaches the index (pending), then the write fails
        raise OSError("disk went away")

    monkeypatch.setattr(index, "upsert", fail)
    with pytest.raises(OSError):
        mem.update(a[2], text="Alice parks in the street now.", user_id="alice")
    monkeypatch.setattr(index, "upsert", real)
    mem.close()  # the restore failed too (same disk); the next open restores the old version from the catalog
    del mem, index
    import gc

    gc.collect()
    mem = nm.open_memory(fast_dir / "m", lm)
    assert mem.get(a[2], user_id="alice")["text"] == old["text"]
    assert mem.search("street", k=3, user_id="alice", variant="bm25") == []  # the new text is nowhere
    assert [h["op"] for h in mem.history(a[2], user_id="alice")] == ["add"]


def test_remember_stores_an_exchange_once_per_user(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    first = mem.remember("My sister Mara lives in Oslo.", "Noted: Mara lives in Oslo.", user_id="alice")
    assert first.ids and first.details["duplicate"] is False and first.elapsed_s > 0
    again = mem.remember("My sister Mara lives in Oslo.", "Noted: Mara lives in Oslo.", user_id="alice")
    assert again.ids == [] and again.details["duplicate"] is True
    other = mem.remember("My sister Mara lives in Oslo.", "Noted: Mara lives in Oslo.", user_id="bob")
    assert other.ids and other.details["duplicate"] is False  # another user's identical exchange is their own
    items = mem.items(user_id="alice")
    assert len(items) == 1 and items[0]["text"].split() == "User: My sister Mara lives in Oslo. Assistant: Noted: Mara " \
        "lives in Oslo.".split()
    assert items[0]["metadata"] == {"kind": "conversation"}


def test_cli_chat_remembers_and_keeps_the_sessions_turns(tmp_path):
    from nativemem.cli.main import app

    save_tiny_lm(tmp_path / "model")
    loaded = nm.load_model(tmp_path / "model")
    nm.open_memory(tmp_path / "m", loaded, kind="activation").save()
    import gc

    gc.collect()
    res = CliRunner().invoke(app, ["chat", "--memory", str(tmp_path / "m"), "--user", "u", "--remember",
                                   "--max-new-tokens", "4", "--model", str(tmp_path / "model")],
                             input="My locker code is 4312.\nWhat is my locker code?\n\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("remembered (") + res.output.count("already remembered") == 2
    assert "the chat KV reused" in res.output or "already remembered" in res.output
    mem = nm.open_memory(tmp_path / "m", loaded)
    texts = [i["text"] for i in mem.items(user_id="u")]
    assert len(texts) == 2 and texts[0].split()[:7] == "User: My locker code is 4312. Assistant:".split()


def test_cli_add_names_each_files_chunks_by_the_file(tmp_path):
    from nativemem.cli.main import app

    save_tiny_lm(tmp_path / "model")
    (tmp_path / "keys.txt").write_text("The spare key is under the blue flower pot.")
    (tmp_path / "cat.txt").write_text("The cat is called Pepper.")
    res = CliRunner().invoke(app, ["add", str(tmp_path / "keys.txt"), str(tmp_path / "cat.txt"), "--memory",
                                   str(tmp_path / "m"), "--kind", "activation", "--model", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    import gc

    gc.collect()
    mem = nm.open_memory(tmp_path / "m", nm.load_model(tmp_path / "model"))
    assert [(i["source_id"], i["text"]) for i in mem.items()] == [("keys.txt", "The spare key is under the blue "
                                                                   "flower pot."), ("cat.txt", "The cat is called Pepper.")]


def test_readers_beside_a_writer_read_the_catalog(tmp_path):
    """Another process holds the folder and writes; `list`, `get`, `history` and `export` still answer, with
    every write that process acknowledged."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from nativemem.cli.main import app

    save_tiny_lm(tmp_path / "model")
    code = textwrap.dedent(f"""
        import sys
        import nativemem as nm
        mem = nm.open_memory({str(tmp_path / 'm')!r}, nm.load_model({str(tmp_path / 'model')!r}), kind="activation")
        for i in range(3):
            ids = mem.add(f"Note number {{i}} of the writer.", user_id="w").ids
            print("ACK", ids[0], flush=True)
        sys.stdin.readline()
    """)
    tests = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": tests})
    try:
        acked = [proc.stdout.readline().split()[1] for _ in range(3)]
        model = ["--model", str(tmp_path / "model")]
        res = CliRunner().invoke(app, ["list", "--memory", str(tmp_path / "m"), "--user", "w", "--json", *model])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
        assert [r["id"] for r in rows] == acked and "reading its catalog" in res.output
        res = CliRunner().invoke(app, ["history", acked[1], "--memory", str(tmp_path / "m"), "--user", "w", *model])
        assert res.exit_code == 0 and '"op": "add"' in res.output, res.output
        res = CliRunner().invoke(app, ["export", "--memory", str(tmp_path / "m"), "--out", str(tmp_path / "e.jsonl"),
                                       *model])
        assert res.exit_code == 0 and "exported 3 item(s)" in res.output, res.output
        res = CliRunner().invoke(app, ["reset", "--memory", str(tmp_path / "m"), "--user", "w", "--yes", *model])
        assert res.exit_code == 2 and "open in another process" in " ".join(res.output.split())
    finally:
        proc.communicate("\n", timeout=60)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("injected", [False, True])
def test_remember_reuses_the_chats_kv_exactly(arch, injected, fast_dir):
    """The remembered exchange's stored KV is the chat's own: rotated to the positions it had in the chat, it
    equals the chat's cache there (sliding-window layers included). Its retrieval states are the chat's when
    nothing was injected ahead of the exchange, and those of the chunk run alone when memory was."""
    from nativemem.memories.activation.kv import capture, rotate_layers
    from nativemem.prompting import build_messages

    lm = tiny_lm(arch)
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(ALICE, user_id="u")
    mem.config.gate_threshold = 0.0 if injected else 1.0  # every hit goes in, or none does
    statement = "My sister Mara lives in Oslo."
    messages = build_messages(statement, system=mem.chat_system)
    ids = lm.chat_ids(messages)
    span = lm.user_span(messages)
    assert lm.tokenizer.decode(ids[0, span[0]:span[1]]).strip().endswith(statement)

    def chat():
        return lm.generate(ids, max_new_tokens=6, memory=mem, user_id="u", query="Where does Mara live?", keep=span)

    gen, again = chat(), chat()  # greedy: the second is the first again, for a look at what the write encodes
    if not gen.text:
        pytest.skip("the tiny model's answer was empty")
    kept, frame = gen.kept, len(mem.frame_ids()[0])
    assert (kept.prefix > frame) is injected and kept.first <= kept.user[0]
    (u0, u1), (a0, a1) = kept.user, kept.answer
    assert kept.ids[u0:u1] == ids[0, span[0]:span[1]].tolist() and a1 - a0 == gen.new_tokens
    positions = list(range(u0, u1)) + list(range(a0, min(a1, kept.run_end)))
    want_k = [layer.keys[0][:, torch.tensor(positions) - (getattr(layer, "cumulative_length", layer.keys.shape[-2])
                                                           - layer.keys.shape[-2])].clone()
              for layer in kept.cache.layers]
    want_h = kept.states[torch.tensor(positions) - kept.first].clone()

    layout, encoded, source = mem._from_chat(again)
    start, end = layout.content
    assert layout.ids[start:end] == tuple(kept.ids[u0:u1] + kept.ids[a0:a1])
    n = len(positions)
    if injected:  # the chunk's own states, as a pass over the chunk alone gives them
        alone = capture(lm.model, [list(layout.ids)], kv=False, hidden_layers=[mem.retrieval_layer])[0]
        assert source == "chunk"
        torch.testing.assert_close(encoded.tokens, alone.hidden[mem.retrieval_layer][start:end].float(),
                                   atol=1e-4, rtol=1e-4)
    else:
        assert source == "chat"
        torch.testing.assert_close(encoded.tokens[:n], want_h.float())

    receipt = mem.remember(statement, gen.text, user_id="u", generation=gen)
    assert receipt.details["reused_kv"] is True and receipt.details["retrieval_states"] == source
    assert gen.kept is None  # one write per generation
    payload = next(p for i, p in mem.store.index.scroll(user_id="u") if i == receipt.ids[0])
    stored_ids, kv = mem.load_chunk(payload)
    prefix = len(mem._enc(mem.config.chunk_prefix))
    assert stored_ids[prefix:prefix + u1 - u0] == kept.ids[u0:u1]
    got = rotate_layers(lm.model, [k[:, prefix:prefix + n] for k in kv.keys], torch.tensor(positions))
    for g, w in zip(got, want_k):
        torch.testing.assert_close(g, w.float(), atol=2e-2, rtol=2e-2)  # int8 storage
    # the same exchange again is not stored twice, and a plain generation falls back to a separate write
    assert mem.remember(statement, gen.text, user_id="u").details["duplicate"] is True
    plain = lm.generate(lm.chat_ids(build_messages("Bob has a red kite.", system=mem.chat_system)), max_new_tokens=4)
    other = mem.remember("Bob has a red kite.", plain.text or "ok", user_id="u", generation=plain)
    assert other.details["reused_kv"] is False and "keep" in other.details["separate_write_why"]
