"""Write-throughput benchmark: the same chunks through the plain forward and through memory.add."""

import json

import pytest

from nativemem.bench.write_speed import run_write
from nativemem.errors import InputError


def test_write_benchmark_times_the_same_tokens_both_ways(tiny_model, squad_file, tmp_path):
    res = run_write(tiny_model, out=tmp_path / "w", data=squad_file, limit=3, progress=False)
    assert res["n"] == 3 and res["add"]["chunks"] == res["config"]["chunks"] >= 3  # the same chunks both ways
    assert res["add"]["tokens"] == res["forward"]["tokens"] > res["add"]["tokens_stored"] > 0  # BOS not stored
    assert res["add_over_forward"] == pytest.approx(res["forward"]["seconds"] / res["add"]["seconds"])
    assert res["config"]["index_pooled"] is False and res["add"]["bytes_on_disk"] >= res["add"]["bytes_written"] > 0
    assert json.loads((tmp_path / "w" / "results.json").read_text())["task"] == "write"
    pooled = run_write(tiny_model, out=tmp_path / "p", data=squad_file, limit=2, progress=False,
                       memory_config={"index_pooled": True})
    assert pooled["config"]["index_pooled"] is True
    with pytest.raises(InputError, match="positive"):
        run_write(tiny_model, out=tmp_path / "x", data=squad_file, limit=0, progress=False)
