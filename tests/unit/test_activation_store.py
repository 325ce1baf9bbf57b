"""Activation memory, storage: user isolation, delete, damaged blobs, locking, crash safety, backend congruence."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from activation_helpers import fast_dir  # noqa: F401
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import InputError, MemoryFormatError, MemoryLockedError
from nativemem.memories.activation import BlobError, ChunkSkippedWarning
from nativemem.memories.activation.store import EdgeIndex

TESTS = str(Path(__file__).resolve().parents[1])
ALICE = ["Alice keeps her spare key under the blue flower pot.", "Alice's cat is called Pepper."]
BOB = ["Bob parks his bicycle behind the old bakery.", "Bob's dog is called Biscuit."]
QUESTION = "Where is the spare key?"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def test_search_and_injection_never_cross_users(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", top_k=4, index_pooled=True, gate_threshold=0.0)
    a = mem.add(ALICE, user_id="alice").ids
    b = mem.add(BOB, user_id="bob").ids
    anon = mem.add("Nobody owns this sentence about the weather.").ids
    for variant in ("pooled", "tokens", "hybrid", "hybrid_tokens", "bm25"):
        for user, own in (("alice", a), ("bob", b), (None, anon)):
            hits = mem.search(QUESTION + " cat dog bicycle weather", k=10, user_id=user, variant=variant)
            assert {h.id for h in hits} <= set(own), (variant, user)
    _, payloads = mem.prefix_for(QUESTION, user_id="bob")
    assert payloads and {p["memory_id"] for p in payloads} <= set(b)
    assert mem.prefix_for(None, user_id="carol")[1] == []
    with pytest.raises(InputError, match="user_id"):
        mem.search(QUESTION, user_id="  ")


def test_receipt_lists_chunks_tokens_bytes_and_layers(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", chunk_tokens=12)
    r = mem.add(" ".join(ALICE * 3), user_id="alice", metadata={"source_id": "notes.txt", "lang": "en"})
    chunks = r.details["chunks"]
    assert len(chunks) == len(r.ids) > 1 and [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
    assert {c["source_id"] for c in chunks} == {"notes.txt"}
    assert r.tokens == sum(c["tokens"] for c in chunks)
    assert r.bytes_written == sum(c["blob_bytes"] + c["index_vector_bytes"] for c in chunks) > 0
    assert r.layers == mem.layers_used and r.details["bytes_per_token"] == mem.bytes_per_token()
    hit = mem.search("spare key", k=1, user_id="alice")[0]
    assert {"memory_id", "user_id", "source_id", "chunk_index", "created", "fingerprint", "text", "blob"} <= set(
        hit.payload) and hit.payload["metadata"] == {"lang": "en"}
    assert hit.payload["fingerprint"] == lm.fingerprint.short


def segment_files(folder):
    return sorted((Path(folder) / "segments").glob("*.kv"))


def test_delete_removes_points_and_gc_reclaims_unreferenced_segments(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", chunk_tokens=45)
    first = mem.add(ALICE[0], user_id="alice")
    second = mem.add(ALICE[0], user_id="bob")  # the same text for another user: a record of its own
    assert first.details["chunks"][0]["blob"] != second.details["chunks"][0]["blob"]
    one, same = first.ids[0], second.ids[0]
    many = mem.add(" ".join(BOB), user_id="bob", metadata={"source_id": "bob.txt"}).ids
    assert len(many) >= 2 and len(segment_files(fast_dir / "m")) == 1  # one writer appends to one segment
    assert mem.search("key", k=5, user_id="bob")  # loads bob's chunks into the tiers
    r = mem.delete(one)
    assert r.ids == [one] and r.details["segment_bytes_released"] > 0
    assert mem.search("key", k=5, user_id="alice") == []
    assert mem.gc().details["bytes_freed"] == 0  # the segment still holds bob's records
    mem.delete(same)
    r = mem.delete("bob.txt")  # a source id deletes all its chunks
    assert sorted(r.ids) == sorted(many)
    assert mem.stats()["chunks"] == 0 and mem.tiers.stats()["host"]["entries"] == 0
    g = mem.gc()
    assert g.details["bytes_freed"] > 0 and segment_files(fast_dir / "m") == []
    assert mem.delete(one).did_nothing
    assert mem.add(ALICE[1], user_id="alice").ids and len(segment_files(fast_dir / "m")) == 1  # writes go on


def _corrupt(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_or_missing_payload_is_reported_and_skipped(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", top_k=2, gate_threshold=0.0)
    ids = mem.add(ALICE, user_id="alice").ids
    payloads = dict(mem.store.index.get(ids))
    location = payloads[ids[0]]["blob"]
    _, offset, length = location.split(":")[1:]
    segment = segment_files(fast_dir / "m")[0]
    _corrupt(segment, int(offset) + int(length) - 3)  # a byte of this chunk's body
    with pytest.raises(BlobError, match="corrupted"):
        mem.load_chunk(payloads[ids[0]])
    notes = mem.check().notes
    assert len(notes) == 2 and ids[0] in notes[0] and "nativemem repair" in notes[1]
    assert {h.id for h in mem.search(QUESTION, k=2, user_id="alice")} == set(ids)  # the index still answers
    with pytest.warns(ChunkSkippedWarning, match=ids[0]):
        g = lm.generate(lm.chat_ids(QUESTION), max_new_tokens=3, memory=mem, user_id="alice", query=QUESTION)
    good_len = len(mem.chunk_ids(payloads[ids[1]])) + len(mem.frame_ids()[0])  # frame + chunk (not spliced)
    assert g.prefix_tokens == good_len  # the other chunk is still served
    _corrupt(segment, int(offset) + 1)  # the record's magic
    mem.drop_caches()
    with pytest.raises(BlobError, match="damaged"):
        mem.load_chunk(payloads[ids[0]])
    mem.close()
    del mem
    import gc

    gc.collect()
    segment.unlink()
    mem = nm.open_memory(fast_dir / "m", lm)
    with pytest.raises(BlobError, match="missing"):
        mem.load_chunk(payloads[ids[1]])


def test_record_of_another_model_is_a_layer_mismatch(lm, fast_dir):
    other = tiny_lm("llama", num_hidden_layers=3, name="tiny-llama")
    theirs = nm.open_memory(fast_dir / "o", other, kind="activation")
    rid = theirs.add(ALICE[0], user_id="alice").ids[0]
    mine = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mine.add(ALICE[1], user_id="alice")
    header, body = theirs.store.segments.view(dict(theirs.store.index.get([rid]))[rid]["blob"])
    location = mine.store.segments.append([(header, body)])[0]
    with pytest.raises(BlobError, match="does not match this model"):
        mine.load_chunk({"blob": location, "memory_id": "x", "user_id": "alice"})


def test_vector_dimension_mismatch_is_a_clear_error(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(ALICE[0], user_id="alice")
    mem.close()
    del mem
    import gc

    gc.collect()
    with pytest.raises(MemoryFormatError, match="'pooled' vectors have size 32 there.*produces 16"):
        EdgeIndex(fast_dir / "m" / "store", {"pooled": 16, "tokens": 32})


def _run(code: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _acknowledged(proc: subprocess.Popen, at_least: int) -> tuple[str | None, list[str]]:
    """The writer's pid and the chunk ids it acknowledged, read until ``at_least`` ids (or 120 s)."""
    acked: list[str] = []
    child = None
    deadline = time.monotonic() + 120
    while len(acked) < at_least and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("PID"):
            child = line.split()[1]
        if line.startswith("ACK"):
            acked += line.split()[1:]
    return child, acked


WRITER_CODE = """
import os, sys
from testing import tiny_lm
import nativemem as nm
lm = tiny_lm("llama")
mem = nm.open_memory(sys.argv[1], lm, kind="activation", chunk_tokens=24)
print("PID", os.getpid(), flush=True)
for i in range(1000):
    text = f"Fact {i}: the locker number {i} holds a red box. It was sealed on day {i}."
    r = mem.add(text, user_id="u", metadata={"source_id": f"fact-{i}"})
    print("ACK", " ".join(r.ids), flush=True)
"""


def test_second_writer_is_locked_out_and_a_sigkill_keeps_acknowledged_chunks(lm, tmp_path):
    """A real second process writes; this one is refused with a clear error; then the writer is killed with
    SIGKILL in the middle of its adds, and every chunk it acknowledged is readable afterwards."""
    proc = _run(WRITER_CODE, str(tmp_path / "m"))
    child, acked = _acknowledged(proc, 4)
    with pytest.raises(MemoryLockedError, match=f"pid {child}.*one process at a time"):
        nm.open_memory(tmp_path / "m", lm)
    time.sleep(0.05)  # land the kill inside a later add (encoding, blob write or upsert)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(acked) >= 4, proc.stdout.read()
    mem = nm.open_memory(tmp_path / "m", lm)  # the kernel released the dead writer's lock
    rows = dict(mem.store.index.get(acked))
    assert set(rows) == set(acked)
    for mid in acked:
        ids, kv = mem.load_chunk(rows[mid])
        assert len(ids) == kv.length > 0
    assert mem.check().details["unreadable"] == 0
    mem.gc()  # a blob written just before the kill, never indexed, is removed
    assert mem.add("After the crash the memory still takes writes.", user_id="u").ids


GROUP_WRITER_CODE = """
import os, sys
from testing import tiny_lm
import nativemem as nm
lm = tiny_lm("llama")
mem = nm.open_memory(sys.argv[1], lm, kind="activation", chunk_tokens=16, batch_size=2)
print("PID", os.getpid(), flush=True)
for i in range(1000):
    text = " ".join(f"Box {i}-{j} holds {j} red marbles." for j in range(6))  # several chunks, several groups
    r = mem.add(text, user_id="u", metadata={"source_id": f"box-{i}"})
    print("ACK", " ".join(r.ids), flush=True)
"""


def test_a_sigkill_during_group_commits_keeps_every_acknowledged_chunk(lm, tmp_path):
    """Adds of several commit groups each (one payload fsync per group, then the index upsert) are killed
    at random points; every chunk of every acknowledged add is readable, and the torn tail is harmless."""
    for attempt, delay in enumerate((0.02, 0.11, 0.27)):
        folder = tmp_path / f"m{attempt}"
        proc = _run(GROUP_WRITER_CODE, str(folder))
        _, acked = _acknowledged(proc, 6)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert len(acked) >= 6, proc.stdout.read()
        mem = nm.open_memory(folder, lm)
        rows = dict(mem.store.index.get(acked))
        assert set(rows) == set(acked)
        per_source: dict[str, int] = {}
        for _, p in mem.store.index.scroll():
            per_source[p["source_id"]] = per_source.get(p["source_id"], 0) + 1
        full = {rows[mid]["source_id"] for mid in acked}
        # all or nothing: every acknowledged add is visible, and every visible add (one killed between its
        # publication and its acknowledgement may be) has every one of its chunks
        assert full <= set(per_source) and len(set(per_source.values())) == 1, per_source
        assert not mem.store.index.unpublished()
        assert all(len(mem.load_chunk(rows[mid])[0]) > 0 for mid in acked)
        assert mem.check().details["unreadable"] == 0  # points indexed after the last ack are whole too
        after = mem.add("Written after the crash.", user_id="u").ids
        assert mem.load_chunk(dict(mem.store.index.get(after))[after[0]])[1].length > 0
        mem.close()
        del mem
        import gc

        gc.collect()


def test_lock_is_released_when_the_last_memory_object_goes(lm, tmp_path):
    mem = nm.open_memory(tmp_path / "m", lm, kind="activation")
    mem.add(ALICE[0], user_id="alice")
    from nativemem.memories.activation.store import _acquire_lock

    with pytest.raises(MemoryLockedError, match=f"pid {os.getpid()}"):
        _acquire_lock(tmp_path / "m")  # a second lock (as another process would take it) is refused
    mem.close()
    del mem
    import gc

    gc.collect()
    _acquire_lock(tmp_path / "m").release()


@pytest.mark.parametrize("variant,bm25_weight", [("pooled", 1.0), ("tokens", 1.0), ("hybrid", 1.0),
                                                 ("hybrid_tokens", 1.0), ("hybrid_tokens", 2.5), ("bm25", 1.0)])
def test_qdrant_client_backend_is_congruent_with_edge(lm, fast_dir, variant, bm25_weight):
    texts = ALICE + BOB + ["The spare tyre is in the boot.", "Keys are often lost under sofas."]
    mems = [nm.open_memory(fast_dir / "edge", lm, kind="activation", index_pooled=True, bm25_weight=bm25_weight),
            nm.open_memory(fast_dir / "client", lm, kind="activation", backend="qdrant", qdrant_location=":memory:",
                           index_pooled=True, bm25_weight=bm25_weight)]
    for mem in mems:
        for i, t in enumerate(texts):
            mem.add(t, user_id="u" if i % 3 else "v", metadata={"source_id": f"s{i}"})
    for user in ("u", "v"):
        # token vectors are float16 in Qdrant Edge; qdrant-client's local mode keeps float32: scores agree to 1e-3
        results = [{h.payload["source_id"]: h.score for h in m.search(QUESTION, k=4, user_id=user, variant=variant)}
                   for m in mems]
        assert results[0].keys() == results[1].keys()
        assert all(abs(results[0][k] - results[1][k]) <= 1e-3 * max(1.0, abs(results[1][k])) for k in results[0])
    assert mems[0].stats()["chunks"] == mems[1].stats()["chunks"] == len(texts)
    sid = mems[1].search(QUESTION, k=1, user_id="u", variant=variant)[0].payload["source_id"]
    assert mems[1].delete(sid).ids and mems[1].stats()["chunks"] == len(texts) - 1


def test_bm25_weight_moves_the_hybrid_ranking_between_its_two_rankers(lm, fast_dir):
    texts = ALICE + BOB + ["The spare tyre is in the boot.", "Keys are often lost under sofas.",
                           "A blue door opens onto the garden.", "The pot of tea went cold."]
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(texts, user_id="u")

    def ranking(variant, weight=1.0):
        mem.config.bm25_weight = weight
        return [h.id for h in mem.search(QUESTION, k=len(texts), user_id="u", variant=variant)]

    bm25, tokens = ranking("bm25"), ranking("tokens")
    assert bm25[:3] != tokens[:3]  # the two rankers disagree on this query, so the weight matters
    assert ranking("hybrid_tokens", 0.0)[:3] == tokens[:3]
    assert ranking("hybrid_tokens", 100.0)[:len(bm25)] == bm25
    with pytest.raises(InputError, match="bm25_weight"):
        nm.open_memory(fast_dir / "bad", lm, kind="activation", bm25_weight=-1)


def test_reopening_in_the_same_process_shares_the_store(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(ALICE, user_id="alice")
    again = nm.open_memory(fast_dir / "m", lm)
    assert again.store is mem.store and again.stats() == mem.stats()
    torch.testing.assert_close(lm.logits(lm.chat_ids(QUESTION), memory=again, user_id="alice"),
                               lm.logits(lm.chat_ids(QUESTION), memory=mem, user_id="alice"))
    assert MemoryLockedError.__mro__[1].__name__ == "NativememError"


def test_a_missing_index_folder_is_a_clear_error(lm, fast_dir):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add(ALICE[0], user_id="alice")
    mem.close()
    del mem
    import gc

    gc.collect()
    shutil.rmtree(fast_dir / "m" / "store")
    with pytest.raises(MemoryFormatError, match="store is missing"):
        nm.open_memory(fast_dir / "m", lm)


def test_default_memory_writes_in_one_pass_and_refuses_pooled_search(lm, fast_dir):
    """Without pooled vectors (the default for token variants) a write is one forward pass per batch (the
    frame's KV is computed once per memory, by its first write)."""
    from nativemem.errors import InputError

    mem = nm.open_memory(fast_dir / "m", lm, kind="activation")
    mem.add("A first write.", user_id="w")
    calls = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        receipt = mem.add(["Short one.", "A much longer text about the weather in the mountains, " * 3, "Mid size text."],
                          user_id="u")
    finally:
        handle.remove()
    assert len(calls) == 1 and receipt.details["chunks"][0]["tokens"] < receipt.details["chunks"][1]["tokens"]
    assert [c["id"] for c in receipt.details["chunks"]] == receipt.ids  # input order kept after length sorting
    assert mem.search("weather", k=1, user_id="u")[0].id == receipt.ids[1]
    with pytest.raises(InputError, match="index_pooled=True"):
        mem.search("weather", k=1, user_id="u", variant="pooled")
    pooled = nm.open_memory(fast_dir / "p", lm, kind="activation", index_pooled=True)
    calls.clear()
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        pooled.add(["Short one."], user_id="u")
    finally:
        handle.remove()
    assert len(calls) == 2


UPDATER_CODE = """
import os, sys
from testing import tiny_lm
import nativemem as nm
lm = tiny_lm("llama")
mem = nm.open_memory(sys.argv[1], lm, kind="activation")
ids = mem.add([f"Locker {j} holds version 0." for j in range(4)], user_id="u").ids
print("IDS", " ".join(ids), flush=True)
for v in range(1, 1000):
    for mid in ids:
        mem.update(mid, text=f"Locker {ids.index(mid)} holds version {v}.", user_id="u")
        print("ACK", mid, v, flush=True)
"""

RESETTER_CODE = """
import os, sys
from testing import tiny_lm
import nativemem as nm
lm = tiny_lm("llama")
mem = nm.open_memory(sys.argv[1], lm, kind="activation")
for i in range(1000):
    mem.add([f"Round {i} note {j}." for j in range(6)], user_id="u")
    mem.add(f"Bob's note {i}.", user_id="bob")
    print("READY", i, flush=True)
    mem.reset("u")
    print("RESET", i, flush=True)
"""


def test_a_sigkill_during_updates_leaves_each_chunk_at_an_acknowledged_or_the_next_version(lm, tmp_path):
    for attempt, delay in enumerate((0.03, 0.17)):
        folder = tmp_path / f"m{attempt}"
        proc = _run(UPDATER_CODE, str(folder))
        ids = proc.stdout.readline().split()[1:]
        assert len(ids) == 4, ids
        acked: dict[str, int] = {mid: 0 for mid in ids}
        while min(acked.values()) < 2:
            line = proc.stdout.readline()
            if line.startswith("ACK"):
                _, mid, v = line.split()
                acked[mid] = int(v)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for line in proc.stdout:  # acknowledgements printed before the kill landed
            if line.startswith("ACK"):
                _, mid, v = line.split()
                acked[mid] = int(v)
        mem = nm.open_memory(folder, lm)
        for mid in ids:
            item = mem.get(mid, user_id="u")
            assert item is not None, mid  # never lost, never half-updated
            version = int(item["text"].split("version ")[1].rstrip("."))
            assert version in (acked[mid], acked[mid] + 1), (item, acked[mid])
            assert mem.load_chunk(mem.store.index.get([mid])[0][1])[0]
        assert mem.check().details == {"unreadable": 0, "missing_from_index": 0}
        mem.close()
        del mem
        import gc

        gc.collect()


def test_a_sigkill_during_a_reset_deletes_all_of_the_users_chunks_or_none(lm, tmp_path):
    for attempt, delay in enumerate((0.0, 0.01, 0.05)):
        folder = tmp_path / f"m{attempt}"
        proc = _run(RESETTER_CODE, str(folder))
        state = ""
        while not state.startswith("READY 2"):
            state = proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        mem = nm.open_memory(folder, lm)
        assert len(mem.items(user_id="u")) in (0, 6)  # one reset's chunks: all gone or all there
        assert len(mem.items(user_id="bob")) >= 3  # another user's chunks are never touched
        mem.close()
        del mem
        import gc

        gc.collect()


def test_equal_scores_are_ordered_by_source_the_same_in_every_run():
    """Rank fusion often gives two chunks the same score; their order follows their sources and places (stable
    over runs on the same data), not their random ids."""
    from nativemem.memories.activation.memory import best_rows

    def rows(id_a, id_b):
        return [(id_b, 0.5, {"source_id": "doc-2", "chunk_index": 0}), ("x", 0.9, {"source_id": "doc-9"}),
                (id_a, 0.5, {"source_id": "doc-1", "chunk_index": 3}), ("y", 0.5, {"source_id": "doc-1",
                                                                                  "chunk_index": 4})]

    for id_a, id_b in (("ffff", "0000"), ("0000", "ffff")):  # random ids either way round
        best = best_rows(rows(id_a, id_b), 3)
        assert [r[0] for r in best] == ["x", id_a, "y"]
