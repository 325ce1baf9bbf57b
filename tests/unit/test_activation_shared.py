"""Activation memory shared through Redis (backend="redis"): two replicas (two folders, two stores) on one real
redis-server serve the same memory; a replica started later rebuilds its index from the stream; Redis down gives
StoreUnavailableError, and nothing acknowledged is lost when Redis comes back."""

import pytest
import redis
from activation_helpers import fast_dir  # noqa: F401
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import InputError, StoreUnavailableError
from nativemem.memories.activation.shared import GC_GRACE_S

ALICE = ["Alice keeps her spare key under the blue flower pot.", "Alice's cat is called Pepper.",
         "Alice moved to Lisbon in the spring."]
QUESTION = "Where is the spare key?"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture
def url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def _replica(lm, folder, url, **kw):
    return nm.open_memory(folder, lm, kind="activation", backend="redis", redis_url=url, gate_threshold=0.0, **kw)


def test_a_write_through_one_replica_is_listed_found_and_injected_by_the_other(lm, fast_dir, url):
    a, b = _replica(lm, fast_dir / "a", url), _replica(lm, fast_dir / "b", url)
    ids = a.add(ALICE, user_id="alice").ids
    assert [i["id"] for i in b.items(user_id="alice")] == ids
    assert b.items(user_id="bob") == [] and b.get(ids[0], user_id="bob") is None  # another user: as if missing
    hits = b.search(QUESTION, k=3, user_id="alice")
    assert {h.id for h in hits} == set(ids)
    assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in a.search(QUESTION, k=3, user_id="alice")]
    # the same chunks injected from the same payload: the same answer, token for token
    prompt = lm.chat_ids(QUESTION)
    on_a = lm.generate(prompt, max_new_tokens=6, memory=a, user_id="alice")
    on_b = lm.generate(prompt, max_new_tokens=6, memory=b, user_id="alice")
    assert on_b.prefix_tokens == on_a.prefix_tokens > len(a.frame_ids()[0])
    assert on_b.token_ids == on_a.token_ids
    assert b.check().notes == [] and b.stats()["chunks"] == 3


def test_updates_and_deletes_reach_every_replica_and_a_late_replica_replays_them(lm, fast_dir, url):
    a, b = _replica(lm, fast_dir / "a", url), _replica(lm, fast_dir / "b", url)
    ids = a.add(ALICE, user_id="alice").ids
    b.update(ids[1], text="Alice's cat is called Saffron.", user_id="alice")
    b.delete(ids[2])
    assert a.get(ids[1], user_id="alice")["text"] == "Alice's cat is called Saffron."
    assert a.get(ids[2], user_id="alice") is None
    assert [h["op"] for h in a.history(ids[1], user_id="alice")] == ["add", "update"]
    late = _replica(lm, fast_dir / "c", url)  # a new process would start like this: the index rebuilt from Redis
    assert [i["id"] for i in late.items(user_id="alice")] == ids[:2]
    assert late.get(ids[1], user_id="alice")["text"] == "Alice's cat is called Saffron."
    assert {h.id for h in late.search(QUESTION, k=5, user_id="alice")} == set(ids[:2])


def test_memories_of_other_models_do_not_share_a_namespace(lm, fast_dir, url):
    a = _replica(lm, fast_dir / "a", url)
    a.add(ALICE, user_id="alice")
    other = _replica(tiny_lm("llama", seed=1), fast_dir / "b", url)
    assert other.items(user_id="alice") == []


def test_gc_spares_young_unreferenced_records_and_removes_old_ones(lm, fast_dir, url):
    a, b = _replica(lm, fast_dir / "a", url), _replica(lm, fast_dir / "b", url)
    ids = a.add(ALICE, user_id="alice").ids
    young = a.store.segments.append([({"x": 1}, b"unindexed payload of an add in flight")])
    assert b.gc().ids == []  # another replica may be about to index it
    client = redis.Redis.from_url(url)
    name = young[0].split(":")[1]
    old = f"{int(name.split('-')[0]) - int(GC_GRACE_S) - 5}-{name.split('-', 1)[1]}"
    client.rename(f"{a.store.segments.prefix}{name}", f"{a.store.segments.prefix}{old}")
    b.delete(ids[0])
    assert b.gc().ids == [old]  # the deleted chunk's record is young too: it goes at a later gc
    assert len(b.store.segments.files()) == 3 and [i["id"] for i in a.items(user_id="alice")] == ids[1:] and a.check().notes == []


def test_redis_down_is_a_clear_error_and_nothing_acknowledged_is_lost(lm, fast_dir, tmp_path):
    from nativemem.testing.redis import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        a = _replica(lm, fast_dir / "a", server.url)
        ids = a.add(ALICE, user_id="alice").ids
        server.kill()
        with pytest.raises(StoreUnavailableError, match="cannot be reached") as err:
            a.search(QUESTION, user_id="alice")
        assert "127.0.0.1" in str(err.value)
        with pytest.raises(StoreUnavailableError):
            a.add(["Alice bought a red umbrella."], user_id="alice")
        with pytest.raises(StoreUnavailableError):  # a new replica cannot start
            _replica(lm, fast_dir / "b", server.url).items(user_id="alice")
        server.start()  # the same data folder: the append-only file fsynced every acknowledged write
        b = _replica(lm, fast_dir / "c", server.url)
        assert [i["id"] for i in b.items(user_id="alice")] == ids
        assert [i["id"] for i in a.items(user_id="alice")] == ids  # the first replica reconnects by itself
    finally:
        server.kill()


def test_bad_shared_configs_are_refused(lm, fast_dir):
    with pytest.raises(InputError, match="needs redis_url"):
        nm.open_memory(fast_dir / "a", lm, kind="activation", backend="redis")
    with pytest.raises(InputError, match="redis://"):
        nm.open_memory(fast_dir / "b", lm, kind="activation", backend="redis", redis_url="http://localhost:6379")
    with pytest.raises(InputError, match="backend='redis' or 'qdrant'"):
        nm.open_memory(fast_dir / "c", lm, kind="activation", redis_url="redis://127.0.0.1:1/0")


def test_a_qdrant_index_with_the_payload_and_catalog_in_redis(lm, fast_dir, url):
    mem = nm.open_memory(fast_dir / "q", lm, kind="activation", backend="qdrant", qdrant_location=":memory:",
                         redis_url=url, gate_threshold=0.0)
    ids = mem.add(ALICE, user_id="alice").ids
    assert not (fast_dir / "q" / "segments").exists() and not (fast_dir / "q" / "catalog").exists()
    assert len(mem.store.segments.files()) == 3 and mem.check().notes == []
    assert {h.id for h in mem.search(QUESTION, k=3, user_id="alice")} == set(ids)
    prompt = lm.chat_ids(QUESTION)
    assert lm.generate(prompt, max_new_tokens=4, memory=mem, user_id="alice").prefix_tokens > len(mem.frame_ids()[0])
    assert [h["op"] for h in mem.history(ids[0], user_id="alice")] == ["add"]


def test_a_redis_that_does_not_fsync_every_write_is_named_in_a_warning(lm, fast_dir, tmp_path):
    from nativemem.testing.redis import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        redis.Redis.from_url(server.url).config_set("appendfsync", "everysec")
        with pytest.warns(RuntimeWarning, match="appendfsync always"):
            _replica(lm, fast_dir / "a", server.url).items(user_id="alice")
