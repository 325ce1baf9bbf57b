"""Activation memory, injection path: pre-RoPE capture, re-rotation, prefix equivalence with the text prompt.

The central claim: injecting ONE stored chunk's KV as a prefix gives the same logits and the same greedy
answer as the identical token sequence given as text, on every tiny architecture (Gemma 3 included:
QK-norm and sliding-window layers, with prompts longer than its window).
"""

import pytest
import torch
from activation_helpers import assert_spliced_injection_equals_text, fast_dir  # noqa: F401
from testing import ARCHS, tiny_lm

import nativemem as nm
from nativemem.memories.activation import ActivationMemory, build_cache, capture
from nativemem.memories.activation.kv import kv_geometry, rotate_keys
from nativemem.memories.activation.store import BlobError

TEXT = ("Marie Curie was born in Warsaw in 1867. She won two Nobel prizes. " * 3).strip()
OTHER = "Paris is the capital of France. Berlin is the capital of Germany."
QUESTION = "Where was Marie Curie born?"


def one_chunk(lm, fast_dir, text=TEXT, **config):
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", **{"gate_threshold": 0.0, **config})
    receipt = mem.add(text, user_id="u")
    return mem, receipt.ids


def text_logits(lm, prefix_ids, prompt):
    full = torch.cat([torch.tensor([prefix_ids]), prompt], dim=1)
    return lm.logits(full)[:, len(prefix_ids):]


@pytest.mark.parametrize("arch", ARCHS)
def test_rotating_stored_keys_reproduces_the_models_own_cache(arch):
    lm = tiny_lm(arch)
    ids = [0, *lm.encode(TEXT)[0].tolist()]
    cap = capture(lm.model, [ids])[0]
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    for layer in range(kv_geometry(lm.model).num_layers):
        pos = torch.arange(len(ids)).unsqueeze(0)
        rotated = rotate_keys(lm.model, cap.kv.keys[layer].unsqueeze(0), pos, layer)
        cached_k = out.past_key_values.layers[layer].keys
        n = cached_k.shape[2]  # sliding layers keep only the last window - 1 tokens
        torch.testing.assert_close(rotated[:, :, -n:], cached_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(cap.kv.values[layer].unsqueeze(0)[:, :, -n:],
                                   out.past_key_values.layers[layer].values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_injected_chunk_equals_the_same_tokens_as_text(arch, fast_dir):
    """A prompt with another system prompt than the frame's: the whole prefix (frame, chunk) goes before it."""
    lm = tiny_lm(arch)
    mem, ids = one_chunk(lm, fast_dir, kv_dtype="float32")
    pinned = mem.injecting(ids)
    prefix, _ = mem.prefix_for(None, user_id="u")
    prompt = lm.chat_ids(QUESTION)
    assert len(prefix) + prompt.shape[1] > 64 or arch != "gemma3_text"  # beyond Gemma's sliding window
    got = lm.logits(prompt, memory=pinned)
    want = text_logits(lm, prefix, prompt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_mem = lm.generate(prompt, max_new_tokens=8, memory=pinned)
    g_txt = lm.generate(torch.cat([torch.tensor([prefix]), prompt], 1), max_new_tokens=8)
    assert g_mem.token_ids == g_txt.token_ids
    assert g_mem.prefix_tokens == len(prefix) and g_mem.prompt_tokens == prompt.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_frame_puts_the_chunk_inside_the_user_turn_exactly_as_text(arch, fast_dir):
    """frame=chat: a prompt with the frame's system prompt continues after the chunk, which sits in the user
    turn before the question; logits and answer equal the spliced token sequence given as text."""
    lm = tiny_lm(arch)
    mem, ids = one_chunk(lm, fast_dir, kv_dtype="float32", frame_system="Answer from the context.")
    prompt = lm.chat_ids(QUESTION, system="Answer from the context.")
    frame, splice = mem.frame_ids()
    assert splice == len(frame) > 1 and prompt[0, :splice].tolist() == frame
    text = mem.as_text(prompt, ids)
    chunk_ids = mem.load_chunk(mem.store.index.get(ids)[0][1])[0]
    assert text[0].tolist() == frame + chunk_ids + prompt[0, splice:].tolist()
    with mem.injecting(ids).active(lm=lm) as inj:
        assert inj.spliced(prompt)
    assert_spliced_injection_equals_text(lm, mem.injecting(ids), prompt, text, tol=1e-5)
    g_mem = lm.generate(prompt, max_new_tokens=8, memory=mem.injecting(ids))
    assert g_mem.token_ids == lm.generate(text, max_new_tokens=8).token_ids
    assert g_mem.prompt_tokens == prompt.shape[1] - splice  # only the question part is prefilled
    assert g_mem.prefix_tokens == len(frame) + len(chunk_ids)  # the head is served from the frame's KV


def test_a_chunk_written_after_another_frame_is_not_injected(fast_dir):
    lm = tiny_lm("llama")
    mem, ids = one_chunk(lm, fast_dir, frame_system="First system prompt.")
    payload = mem.store.index.get(ids)[0][1]
    mem.config.frame_system = "Another system prompt."
    mem._frame_cache = None
    with pytest.raises(BlobError, match="another frame"):
        mem.load_chunk(payload)
    mem.config.frame, mem._frame_cache = "raw", None
    with pytest.raises(BlobError, match="another frame"):
        mem.load_chunk(payload)


@pytest.mark.parametrize("kv_dtype,atol", [("float16", 2e-3), ("bfloat16", 3e-2), ("int8", 3e-2), ("int4", 5e-2)])
def test_compressed_payloads_stay_close_to_the_text_prompt(kv_dtype, atol, fast_dir):
    lm = tiny_lm("qwen3")
    mem, ids = one_chunk(lm, fast_dir, kv_dtype=kv_dtype)
    prefix, _ = mem.prefix_for(None, user_id="u")
    prompt = lm.chat_ids(QUESTION)
    torch.testing.assert_close(lm.logits(prompt, memory=mem.injecting(ids)), text_logits(lm, prefix, prompt),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_residual_checkpoint_payload_recomputes_the_same_kv(arch, fast_dir):
    lm = tiny_lm(arch)
    kv_mem, kv_ids = one_chunk(lm, fast_dir / "kv", kv_dtype="float32")
    res_mem, res_ids = one_chunk(lm, fast_dir / "res", kv_dtype="float32", payload="residual", checkpoint_layer=1)
    prompt = lm.chat_ids(QUESTION)
    torch.testing.assert_close(lm.logits(prompt, memory=res_mem.injecting(res_ids)),
                               lm.logits(prompt, memory=kv_mem.injecting(kv_ids)), rtol=1e-5, atol=1e-5)
    assert 0 < res_mem.stats()["payload_bytes"] and 0 < kv_mem.stats()["payload_bytes"]
    g = kv_mem.geometry
    assert res_mem.bytes_per_token() == 8 * g.num_kv_heads * g.head_dim + 4 * g.hidden_size
    assert kv_mem.bytes_per_token() == 2 * 8 * g.num_kv_heads * g.head_dim


def test_several_chunks_first_matches_text_later_ones_lack_cross_attention(fast_dir):
    """Each chunk is encoded alone: the prefix KV of chunk 1 equals the text's; chunk 2's does not."""
    lm = tiny_lm("llama")
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", kv_dtype="float32")
    ids = mem.add([TEXT, OTHER], user_id="u").ids
    segments = [mem._frame_state()["kv"]] + [mem.load_chunk(p)[1] for p in
                                             [p for _, p in mem.store.index.get(ids)]]
    cache = build_cache(lm.model, segments)
    frame = mem.frame_ids()[0]
    prefix = frame + sum((mem.load_chunk(p)[0] for _, p in mem.store.index.get(ids)), [])
    with torch.inference_mode():
        text_cache = lm.model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
    n1 = len(frame) + segments[1].length
    for layer in range(2):
        mine, theirs = cache.layers[layer].keys, text_cache.layers[layer].keys
        torch.testing.assert_close(mine[:, :, :n1], theirs[:, :, :n1], rtol=0, atol=1e-5)
    # layer 0 keys depend only on each token and its position, so they agree everywhere; layer 1 keys of
    # chunk 2 come from hidden states that never attended to chunk 1
    torch.testing.assert_close(cache.layers[0].keys, text_cache.layers[0].keys, rtol=0, atol=1e-5)
    assert not torch.allclose(cache.layers[1].keys[:, :, n1:], text_cache.layers[1].keys[:, :, n1:], atol=1e-3)


def test_generation_never_modifies_the_stored_payload(fast_dir):
    lm = tiny_lm("llama")
    mem, ids = one_chunk(lm, fast_dir)
    stored = {p.name: p.read_bytes() for p in (fast_dir / "m" / "segments").glob("*.kv")}
    assert stored
    payload = mem.store.index.get(ids)[0][1]
    before = [k.clone() for k in mem.load_chunk(payload)[1].keys]
    for _ in range(2):
        lm.generate(lm.chat_ids(QUESTION), max_new_tokens=6, memory=mem, user_id="u")
    assert {p.name: p.read_bytes() for p in (fast_dir / "m" / "segments").glob("*.kv")} == stored
    after = mem.load_chunk(payload)[1].keys
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_memory_answers_use_only_the_prompt_prefill(fast_dir):
    lm = tiny_lm("llama")
    mem, ids = one_chunk(lm, fast_dir)
    prompt = lm.chat_ids(QUESTION)
    g = lm.generate(prompt, max_new_tokens=4, memory=mem, user_id="u", query=QUESTION)
    assert g.prefix_tokens > 0 and g.prompt_tokens == prompt.shape[1]
    with mem.disabled():
        assert lm.generate(prompt, max_new_tokens=4, memory=mem, user_id="u").prefix_tokens == 0


def test_prefix_budget_and_order(fast_dir):
    lm = tiny_lm("llama")
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", top_k=2, max_prefix_tokens=10_000,
                         prefix_order="best_last", gate_threshold=0.0)
    mem.add([TEXT, OTHER], user_id="u")
    hits = mem.search(QUESTION, k=2, user_id="u")
    _, payloads = mem.prefix_for(QUESTION, user_id="u")
    assert [p["memory_id"] for p in payloads] == [h.id for h in hits][::-1]
    small = nm.open_memory(fast_dir / "s", lm, kind="activation", top_k=2, max_prefix_tokens=1, gate_threshold=0.0)
    small.add([TEXT], user_id="u")
    assert small.prefix_for(QUESTION, user_id="u")[1] == []  # nothing fits: nothing injected
    assert isinstance(small, ActivationMemory)
