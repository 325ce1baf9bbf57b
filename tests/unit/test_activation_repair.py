"""Activation memory, damaged index: the catalog knows every acknowledged chunk, the open says what the index
lost, and repair serves all of it again (ids, owners, sources, metadata kept; deleted chunks stay deleted)."""

import gc
import json
import shutil
import warnings
from pathlib import Path

import pytest
from activation_helpers import fast_dir  # noqa: F401
from testing import save_tiny_lm, tiny_lm
from typer.testing import CliRunner

import nativemem as nm
from nativemem.errors import MemoryFormatError
from nativemem.memories.activation import ActivationMemory
from nativemem.memories.activation.catalog import Catalog

pytestmark = pytest.mark.usefixtures("one_thread")

ALICE = [f"Alice's note {i}: the parcel number {i} waits in locker {i * 7} at the north station." for i in range(6)]
BOB = [f"Bob's note {i}: the bicycle number {i} is parked in rack {i * 3} behind the bakery." for i in range(5)]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def written(lm, folder: Path) -> tuple[dict[str, dict], str]:
    """A closed memory folder with two users' notes and one deleted chunk; returns what should be served by id,
    and the deleted chunk's text."""
    mem = nm.open_memory(folder, lm, kind="activation", chunk_tokens=24)
    alice = mem.add(ALICE, user_id="alice", metadata={"source_id": "alice-notes", "tag": "a"})
    bob = mem.add(BOB, user_id="bob")
    deleted = mem.store.index.get([alice.ids[0]])[0][1]["text"]
    mem.delete(alice.ids[0])
    expected = {pid: p for pid, p in mem.store.index.scroll()}
    assert alice.ids[0] not in expected and len(expected) == len(alice.ids) + len(bob.ids) - 1
    mem.close()
    del mem
    gc.collect()  # the store closes (cleanly) with its last memory object
    return expected, deleted


def served(mem) -> dict[str, dict]:
    return {pid: p for pid, p in mem.store.index.scroll()}


def assert_same_chunks(mem, expected):
    got = served(mem)
    assert got.keys() == expected.keys()
    for pid, p in expected.items():
        for key in ("user_id", "source_id", "chunk_index", "text", "metadata", "created"):
            assert got[pid][key] == p[key], (pid, key)
        assert mem.injecting([pid]).memory.load_chunk(got[pid])[0]  # a readable payload for every chunk
    for user in ("alice", "bob"):  # searches stay within their owner's chunks
        hits = mem.search("Where is the number?", k=50, user_id=user, variant="bm25")
        assert hits and {h.payload["user_id"] for h in hits} == {user}


def test_the_catalog_holds_exactly_the_acknowledged_chunks(lm, fast_dir):
    expected, _ = written(lm, fast_dir / "m")
    state = Catalog(fast_dir / "m").state()
    assert state.live.keys() == expected.keys() and not state.unpublished and len(state.deleted) == 1
    assert all(state.live[i]["text"] == p["text"] and state.live[i]["user_id"] == p["user_id"]
               for i, p in expected.items())


def test_a_lost_shard_segment_is_reported_at_open_and_repaired(lm, fast_dir):
    folder = fast_dir / "m"
    expected, _ = written(lm, folder)
    for seg in (folder / "store" / "segments").iterdir():  # the index loses all its points
        shutil.rmtree(seg)
    with pytest.warns(UserWarning, match=rf"{len(expected)} of {len(expected)} acknowledged chunks are missing.*"
                                         r"nativemem repair --memory"):
        mem = nm.open_memory(folder, lm)
    assert mem.damage == {"chunks_missing_from_index": len(expected)}
    assert "missing from the index" in " ".join(mem.check().notes)
    with pytest.raises(MemoryFormatError, match="repair"):
        mem.gc()  # would drop the payload of chunks only the catalog still knows
    mem.close()
    del mem
    gc.collect()
    receipt = ActivationMemory.repair(folder, lm)
    assert receipt.details["chunks"] == len(expected) and receipt.details["users"] == 2
    assert any(p.name.startswith("store.damaged-") for p in folder.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a repaired memory opens without a damage warning
        mem = nm.open_memory(folder, lm)
    assert mem.damage == {} and mem.check().details == {"unreadable": 0, "missing_from_index": 0}
    assert_same_chunks(mem, expected)


def test_a_shard_that_would_abort_the_process_is_refused_with_the_repair_command(lm, fast_dir):
    folder = fast_dir / "m"
    expected, _ = written(lm, folder)
    tracker = next((folder / "store").rglob("mutable_id_tracker.mappings"))
    with open(tracker, "r+b") as f:  # flipped bytes: loading this in-process can abort from native code
        f.write(b"\xff" * 16)
    with pytest.raises(MemoryFormatError, match=r"index \(Qdrant Edge shard in store/\) is damaged.*nativemem repair"):
        nm.open_memory(folder, lm)
    gc.collect()
    ActivationMemory.repair(folder, lm)
    assert_same_chunks(nm.open_memory(folder, lm), expected)


def test_a_lost_index_folder_and_unreadable_payload_are_repaired(lm, fast_dir):
    folder = fast_dir / "m"
    expected, _ = written(lm, folder)
    for seg in (folder / "segments").iterdir():  # every payload record unreadable
        seg.write_bytes(b"\0" * seg.stat().st_size)
    shutil.rmtree(folder / "store")
    with pytest.raises(MemoryFormatError, match="store is missing.*nativemem repair"):
        nm.open_memory(folder, lm)
    gc.collect()
    ActivationMemory.repair(folder, lm)
    mem = nm.open_memory(folder, lm)
    assert_same_chunks(mem, expected)  # payloads encoded again
    mem.gc()  # the zeroed segment files are no longer referenced


def test_a_delete_interrupted_after_the_catalog_is_finished_at_open(lm, fast_dir):
    folder = fast_dir / "m"
    expected, _ = written(lm, folder)
    victim = next(iter(expected))
    Catalog(folder).delete([victim])  # the process stopped between the catalog line and the index delete
    mem = nm.open_memory(folder, lm)
    assert victim not in served(mem) and len(served(mem)) == len(expected) - 1 and mem.damage == {}


def test_gc_removes_deleted_text_from_the_catalog(lm, fast_dir):
    folder = fast_dir / "m"
    expected, deleted = written(lm, folder)
    raw = b"".join(p.read_bytes() for p in Catalog(folder).files())
    assert deleted.encode() in raw  # a deleted chunk's text stays until gc, like its payload bytes
    mem = nm.open_memory(folder, lm)
    receipt = mem.gc()
    assert receipt.details["catalog_bytes_freed"] > 0
    raw = b"".join(p.read_bytes() for p in Catalog(folder).files())
    assert deleted.encode() not in raw
    assert all(json.dumps(p["text"]).encode() in raw for p in expected.values())
    assert Catalog(folder).state().live.keys() == served(mem).keys()


def test_a_folder_without_a_catalog_gets_one_from_its_index(lm, fast_dir):
    folder = fast_dir / "m"
    expected, _ = written(lm, folder)
    shutil.rmtree(folder / "catalog")  # as written before memories had a catalog
    mem = nm.open_memory(folder, lm)
    assert Catalog(folder).state().live.keys() == expected.keys()
    mem.close()
    del mem
    gc.collect()
    shutil.rmtree(folder / "store")
    ActivationMemory.repair(folder, lm)
    assert_same_chunks(nm.open_memory(folder, lm), expected)


def test_cli_repair(tmp_path):
    from nativemem.cli.main import app

    save_tiny_lm(tmp_path / "model")
    loaded = nm.load_model(tmp_path / "model")
    written(loaded, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "store")
    res = CliRunner().invoke(app, ["repair", "--memory", str(tmp_path / "m"), "--model", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    assert "of 2 users again from the catalog" in res.output and "chunks served" in res.output
    res = CliRunner().invoke(app, ["repair", "--memory", str(tmp_path / "nothing"), "--model",
                                   str(tmp_path / "model")])
    assert res.exit_code != 0 and "not a nativemem memory folder" in " ".join(res.output.split())
