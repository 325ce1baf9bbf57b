"""Nothing one user stores changes another user's search: scores, BM25 statistics and relevance included."""

import pytest
from activation_helpers import fast_dir  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing import tiny_lm

import nativemem as nm

BOB = ["Bob keeps his bike in the red shed.", "Bob's locker code is 4312.", "Bob sings in a choir on Fridays.",
       "The shed key hangs by the door."]
QUERIES = ["Where is the bike?", "What is the locker code?", "When does the choir sing?", "shed key door"]
WORDS = ["bike", "shed", "locker", "code", "choir", "red", "key", "door", "Fridays", "sings", "the", "zebra"]


def snapshot(mem):
    out = []
    for q in QUERIES:
        hits = mem.search(q, k=3, user_id="bob")
        dense, bm25 = mem.hit_scores(q, hits, user_id="bob")
        out.append([(h.id, h.score, h.relevance) for h in hits] + [tuple(dense), tuple(bm25)])
        out.append([(h.id, h.score) for h in mem.search(q, k=3, user_id="bob", variant="bm25")])
    return out


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.mark.parametrize("backend", ["edge", "qdrant"])
def test_another_users_writes_never_change_my_scores(lm, tmp_path_factory, backend):
    folder = tmp_path_factory.mktemp(f"iso-{backend}")
    extra = {"backend": "qdrant", "qdrant_location": str(folder / "q")} if backend == "qdrant" else {}
    mem = nm.open_memory(folder / "m", lm, kind="activation", **extra)
    from nativemem.memories.activation.relevance import GENERIC_QA, GENERIC_UNANSWERABLE

    mem.fit_relevance(GENERIC_QA[:20], unanswerable=GENERIC_UNANSWERABLE[:6])
    mem.add(BOB, user_id="bob")
    before = snapshot(mem)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join), min_size=1,
                    max_size=4))
    def alice_writes(texts):
        mem.add(texts, user_id="alice")
        assert snapshot(mem) == before

    alice_writes()
    assert mem.stats()["chunks"] > len(BOB)
