"""Model loading errors, dtype handling and fingerprints (tiny models; the real model is in integration)."""

import json

import pytest
import torch
from testing import tiny_lm, tiny_model, tiny_tokenizer

import nativemem as nm
from nativemem.errors import FingerprintMismatchError, ModelLoadError, UnknownNameError


def test_unknown_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the local HF cache"):
        nm.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        nm.load_model(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        nm.load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        nm.load_model(tmp_path / "empty", dtype="float7")


def test_unreadable_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NATIVEMEM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read the GGUF"):
        nm.load_model(bad)


def test_local_folder_round_trip_with_dtype(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = nm.load_model(tmp_path / "m")
    ids = torch.tensor([[0, 4, 9, 11]])
    assert torch.equal(lm.logits(ids), model(ids).logits)
    lm16 = nm.load_model(tmp_path / "m", dtype="bfloat16")
    assert lm16.dtype == torch.bfloat16 and lm16.fingerprint.dtype == "bfloat16"
    field = lm.fingerprint.mismatch(lm16.fingerprint)
    assert field == "dtype"
    again = nm.load_model(tmp_path / "m")
    assert again.fingerprint == lm.fingerprint
    json.dumps(lm.fingerprint.to_dict())


def test_fingerprint_names_the_field_that_differs():
    a, b = tiny_lm(), tiny_lm(num_hidden_layers=3)
    with pytest.raises(FingerprintMismatchError, match="'num_layers'"):
        a.fingerprint.check(b.fingerprint)
    c = tiny_lm(seed=1)  # same architecture, other weights
    assert a.fingerprint.mismatch(c.fingerprint) == "revision"
    assert a.fingerprint.mismatch(tiny_lm().fingerprint) is None


def test_generate_is_greedy_and_counts_tokens(tiny):
    ids = tiny.chat_ids("hello")
    g1, g2 = tiny.generate(ids, max_new_tokens=6), tiny.generate(ids, max_new_tokens=6)
    assert g1.token_ids == g2.token_ids and g1.prompt_tokens == ids.shape[1]
    assert 0 < g1.ttft_s <= g1.total_s and g1.new_tokens <= 6
    # the greedy first token is the argmax of the last prompt position
    first = tiny.logits(ids)[0, -1].argmax().item()
    assert (g1.token_ids[:1] or [first]) == [first] or first in tiny.eos_token_ids


def test_context_overflow_is_reported_not_cut():
    lm = tiny_lm(max_context=32)
    with pytest.raises(nm.errors.ContextOverflowError, match="window is 32"):
        lm.generate(lm.chat_ids("word " * 40), max_new_tokens=4)


def test_registry_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'steer_test'"):
        nm.memories.get_memory_class("steer_tst")
