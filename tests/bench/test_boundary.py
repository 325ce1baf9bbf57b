"""The chunk-boundary benchmark on a tiny model: recomputing whole later chunks closes the gap to the text."""

import pytest

from nativemem.bench.boundary import run_boundary
from nativemem.errors import InputError


def test_boundary_gap_closes_when_later_chunks_are_recomputed_whole(squad_file, tmp_path):
    from testing import tiny_lm

    # initializer_range 0.2: at the default 0.02 the random model's next-token distribution barely depends on the
    # context (KL apart ~1e-7, the size of float noise), so the gap could not be told from rounding
    lm = tiny_lm(initializer_range=0.2)
    res = run_boundary(lm, out=tmp_path / "b", data=squad_file, limit=2, k=2, paragraphs=4,
                       recompute=[0, 10_000], progress=False, memory_config={"kv_dtype": "float32"})
    apart, whole = res["recompute"]["0"], res["recompute"]["10000"]
    assert res["n"] == 2 and apart["kl_mean"] > 0  # chunk 2 never attended to chunk 1
    assert abs(whole["kl_mean"]) < apart["kl_mean"] / 100 and whole["top1_agreement"] == 1.0  # recomputed: the text's KV
    with pytest.raises(InputError, match="at least 2"):
        run_boundary(lm, out=tmp_path / "x", data=squad_file, k=1, progress=False)
