"""The scale benchmark: write throughput, bytes per token, search and TTFT per tier, on a tiny model (CPU)."""

import json

import pytest

from nativemem.bench.scale import format_scale, run_scale
from nativemem.errors import InputError


def test_scale_benchmark_times_every_tier_and_reports_sizes(tiny_model, squad_file, tmp_path):
    res = run_scale(tiny_model, out=tmp_path / "s", data=squad_file, limit=2, k=2, paragraphs=4, progress=False,
                    memory_config={"kv_dtype": "int8"})
    assert res["n"] == 2 and len(res["items"]) == 2 and res["config"]["k"] == 2
    for row in res["items"]:
        assert row["disk_timing"]["tiers"] == ["disk", "disk"]  # caches dropped before the cold read
        assert row["ram_timing"]["tiers"] == ["host", "host"]
        assert 0 < row["activation_ram"] and 0 < row["rag_bm25"] and row["search_s"] > 0
        assert row["rag_bm25_e2e"] == pytest.approx(row["bm25_s"] + row["rag_bm25"])
        assert row["prompt_tokens"] < row["text_same_order_tokens"]  # only the question is prefilled
    t = res["ttft_median_s"]
    assert "activation_device" not in res["items"][0] and t["activation_device"] is None  # no device tier on CPU
    assert res["ratios"]["activation_ram_over_rag_bm25"] == pytest.approx(t["activation_ram"] / t["rag_bm25"])
    b = res["bytes"]
    assert 0.4 < b["payload_over_fp16"] < 0.75 and b["index_vectors_per_token"] > 0  # int8: about half of fp16
    assert res["write"]["tokens"] > 0 and res["write"]["add_over_forward"] > 0
    assert json.loads((tmp_path / "s" / "results.json").read_text())["task"] == "scale"
    assert "activation TTFT, RAM tier" in format_scale(res)
    with pytest.raises(InputError, match="positive"):
        run_scale(tiny_model, out=tmp_path / "x", data=squad_file, k=0, progress=False)
