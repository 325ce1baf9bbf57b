"""Side-FFN memory on the real default model: zero values change nothing, fused weights give the same logits.

Marked slow: `make test` runs them, `make test-fast` skips them.
"""

import pytest
import torch

from nativemem.memories.side_ffn import SideFFNConfig, SideFFNMemory

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TEXT = ("The lighthouse keeper of Vardø, Ingrid Halvorsen, logged every passing ship in a green ledger. "
        "In the winter of 1911 she recorded forty-two vessels, three of them whalers from Tromsø. ") * 8


def test_zero_memory_is_bit_identical_and_fused_logits_match(real_lm):
    lm = real_lm
    mem = SideFFNMemory(lm, SideFFNConfig(width=12, window=64, context=64, lr=1e-2))
    ids = lm.chat_ids("Who kept the lighthouse of Vardø?")
    bare = lm.logits(ids)
    mem.memorize(TEXT)  # cloned keys, values still zero
    assert torch.equal(lm.logits(ids, memory=mem), bare)
    receipt = mem.add(TEXT)  # test-time training moves the values
    assert receipt.steps > 0
    with_mem = lm.logits(ids, memory=mem)
    assert (with_mem - bare).abs().max() > 1e-4
    fused = mem.fuse()
    assert fused.config.intermediate_size == lm.model.config.intermediate_size + mem.stats()["neurons_per_layer"]
    with torch.no_grad():
        out = fused(input_ids=ids).logits
    # fp32 sums in another order (one matmul over 1536 + 12 neurons instead of two): on logits up to ~40,
    # appending zero-valued neurons alone moves them by ~3e-5; a wrong tau or clipping fold moves them by > 0.1
    torch.testing.assert_close(out, with_mem, rtol=1e-5, atol=1e-4)
    assert torch.equal(lm.logits(ids), bare)  # the loaded model is untouched
