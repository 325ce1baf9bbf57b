"""The memory contract, run against every registered memory kind.

A new kind only has to register itself (and, if its defaults do not suit a 2-layer model, add an entry
to CONFIGS). Each test can fail for a real defect: a hook left behind, a memory that leaks into the
disabled model, a save that loses state, a memory that opens on the wrong model.
"""

import json

import pytest
import torch
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import FingerprintMismatchError, InputError, MemoryFormatError
from nativemem.hooks import count_hooks
from nativemem.memories.base import MEMORY_CONFIG_NAME, MEMORY_WEIGHTS_NAME

# kind -> config overrides for tiny models
CONFIGS: dict[str, dict] = {"steer_test": {"layer": 1},
                            # pkm: the hard gate rightly stays shut on a question about facts it never stored;
                            # the soft gate still runs the whole gated path and always lets a little through
                            "pkm": {"gate_mode": "soft", "gate_steps": 50}}
TEXTS = ["Marie Curie was born in Warsaw in 1867.", "Paris is the capital of France."]
PROMPT = "Where was Marie Curie born?"


def kinds():
    return nm.memory_kinds()


def make(kind, lm, path):
    mem = nm.open_memory(path, lm, kind=kind, **CONFIGS.get(kind, {}))
    receipt = mem.add(TEXTS, user_id="alice")
    assert not receipt.did_nothing and receipt.kind == kind
    return mem


@pytest.fixture
def lm():
    return tiny_lm()


def ids(lm):
    return lm.chat_ids(PROMPT)


@pytest.mark.parametrize("kind", kinds())
def test_disabled_or_outside_scope_is_bit_identical(kind, lm, tmp_path):
    bare = lm.logits(ids(lm))
    mem = make(kind, lm, tmp_path / "m")
    assert torch.equal(lm.logits(ids(lm)), bare), "memory leaked outside active()"
    with mem.disabled():
        assert torch.equal(lm.logits(ids(lm), memory=mem, user_id="alice"), bare)
        g = lm.generate(ids(lm), max_new_tokens=5, memory=mem, user_id="alice")
    assert g.token_ids == lm.generate(ids(lm), max_new_tokens=5).token_ids
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("kind", kinds())
def test_enabled_memory_changes_the_model(kind, lm, tmp_path):
    bare = lm.logits(ids(lm))
    mem = make(kind, lm, tmp_path / "m")
    assert not torch.equal(lm.logits(ids(lm), memory=mem, user_id="alice")[0, -1], bare[0, -1])
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("kind", kinds())
def test_exception_inside_active_leaves_no_hook(kind, lm, tmp_path):
    bare = lm.logits(ids(lm))
    mem = make(kind, lm, tmp_path / "m")
    with pytest.raises(RuntimeError, match="inside"):
        with mem.active(lm=lm, user_id="alice", query=PROMPT):
            raise RuntimeError("inside")
    assert count_hooks(lm.model) == 0
    assert torch.equal(lm.logits(ids(lm)), bare)


@pytest.mark.parametrize("kind", kinds())
def test_save_open_round_trip_gives_same_outputs(kind, lm, tmp_path):
    mem = make(kind, lm, tmp_path / "m")
    before = lm.logits(ids(lm), memory=mem, user_id="alice")
    gen = lm.generate(ids(lm), max_new_tokens=6, memory=mem, user_id="alice")
    mem.save()
    again = nm.open_memory(tmp_path / "m", lm)
    assert type(again) is type(mem)
    assert torch.equal(lm.logits(ids(lm), memory=again, user_id="alice"), before)
    assert lm.generate(ids(lm), max_new_tokens=6, memory=again, user_id="alice").token_ids == gen.token_ids
    assert again.stats() == mem.stats()
    meta = json.loads((tmp_path / "m" / MEMORY_CONFIG_NAME).read_text())
    assert meta["kind"] == kind and meta["fingerprint"]["name"] == lm.name


@pytest.mark.parametrize("kind", kinds())
def test_open_with_another_model_names_the_field(kind, lm, tmp_path):
    make(kind, lm, tmp_path / "m").save()
    with pytest.raises(FingerprintMismatchError, match="'num_layers'"):
        nm.open_memory(tmp_path / "m", tiny_lm(num_hidden_layers=3))
    with pytest.raises(FingerprintMismatchError, match="'revision'"):
        nm.open_memory(tmp_path / "m", tiny_lm(seed=7))


@pytest.mark.parametrize("kind", kinds())
def test_corrupted_folder_is_a_clear_error(kind, lm, tmp_path):
    make(kind, lm, tmp_path / "m").save()
    weights = tmp_path / "m" / MEMORY_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(MemoryFormatError, match="corrupted"):
        nm.open_memory(tmp_path / "m", lm)
    (tmp_path / "m" / MEMORY_CONFIG_NAME).write_text("{not json")
    with pytest.raises(MemoryFormatError, match="corrupted"):
        nm.open_memory(tmp_path / "m", lm)


@pytest.mark.parametrize("kind", kinds())
def test_bad_input_and_noop_operations(kind, lm, tmp_path):
    mem = make(kind, lm, tmp_path / "m")
    for bad in ("", "   ", b"\xff\xfe", []):
        with pytest.raises(InputError):
            mem.add(bad)
    assert mem.delete("no-such-id").did_nothing


@pytest.mark.parametrize("kind", kinds())
def test_bf16_model_keeps_its_dtype(kind, tmp_path):
    lm16 = tiny_lm()
    lm16.model.to(torch.bfloat16)
    lm16 = nm.LanguageModel(lm16.model, lm16.tokenizer, name="tiny-bf16")
    mem = make(kind, lm16, tmp_path / "m")
    out = lm16.logits(ids(lm16), memory=mem, user_id="alice")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert next(lm16.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", kinds())
def test_lifecycle_operations_work_or_name_the_kind(kind, lm, tmp_path):
    """items/get/update/history/reset/export/import: each works per user, or raises UnsupportedError naming the
    kind and the operation."""
    from nativemem.errors import UnsupportedError

    mem = make(kind, lm, tmp_path / "m")

    def supported(op, call):
        try:
            return True, call()
        except UnsupportedError as e:
            assert f"{kind!r} does not support {op}" in str(e)
            return False, None

    ok, items = supported("items", lambda: mem.items(user_id="alice"))
    if not ok:
        for op, call in (("get", lambda: mem.get("x", user_id="alice")), ("reset", lambda: mem.reset("alice")),
                         ("count", lambda: mem.count(user_id="alice")),
                         ("export", lambda: mem.export(tmp_path / "e.jsonl")),
                         ("import", lambda: mem.import_file(tmp_path / "e.jsonl"))):
            assert not supported(op, call)[0]
    else:
        assert items and mem.items(user_id="bob") == []
        if kind != "pkm":  # pkm turns a sentence into a fact (prompt, answer): its text is that fact's
            assert sorted(i["text"] for i in items) == sorted(TEXTS)
        assert mem.get(items[0]["id"], user_id="alice") == items[0]
        assert mem.get(items[0]["id"], user_id="bob") is None  # another user's id answers as a missing one
        assert mem.count(user_id="alice") == len(items) and mem.count(user_id="bob") == 0
        assert mem.items(user_id="alice", limit=1, offset=1) == items[1:2]
        source = items[0]["source_id"]
        assert mem.items(user_id="alice", source_id=source) == [i for i in items if i["source_id"] == source]
        assert mem.items(user_id="bob", source_id=source) == []
        mem.export(tmp_path / "e.jsonl", user_id="alice")
        other = nm.open_memory(tmp_path / "other", lm, kind=kind, **CONFIGS.get(kind, {}))
        assert other.import_file(tmp_path / "e.jsonl").details["imported"] == len(items)
        assert [i["id"] for i in other.items(user_id="alice")] == [i["id"] for i in items]
        assert [i["text"] for i in other.items(user_id="alice")] == [i["text"] for i in items]
        again = other.import_file(tmp_path / "e.jsonl")  # the same ids again are not stored twice
        assert again.details["imported"] == 0 and len(other.items(user_id="alice")) == len(items)
    ok, _ = supported("update", lambda: mem.update(items[0]["id"] if items else "x", text="Warsaw is in Poland.",
                                                   user_id="alice"))
    if ok:
        assert mem.get(items[0]["id"], user_id="alice")["text"] == "Warsaw is in Poland."
        assert [h["op"] for h in mem.history(items[0]["id"], user_id="alice")] == ["add", "update"]
        assert mem.history(items[0]["id"], user_id="bob") == []
    else:
        assert not supported("history", lambda: mem.history("x", user_id="alice"))[0]
    if items:
        assert sorted(mem.reset("alice").ids) == sorted(i["id"] for i in items) and mem.items(user_id="alice") == []