"""The LoRA baseline: same streaming loop, exact no-op at the start, model restored on exit."""

import pytest
import torch
from testing import tiny_lm

from nativemem.errors import InputError
from nativemem.hooks import count_hooks
from nativemem.bench.lora import LoRABaseline
from nativemem.memories.side_ffn import SideFFNConfig, SideFFNMemory, StreamOptions, stream

TEXT = "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes. Paris is the capital of France. " * 3


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_trains_with_the_same_loop_and_leaves_the_model_untouched():
    lm = tiny_lm()
    ids = lm.chat_ids("Where was Marie Curie born?")
    bare = lm.logits(ids)
    flags = [p.requires_grad for p in lm.model.parameters()]
    names = [n for n, _ in lm.model.named_modules()]
    stream_ids = SideFFNMemory(lm, SideFFNConfig(width=2))._ids(TEXT)
    opts = StreamOptions(window=16, context=16, lr=1e-2)
    window_only = stream(lm.model, stream_ids, None, opts, max_context=lm.max_context)
    with LoRABaseline(lm, rank=2) as lora:
        assert lora.num_parameters > 0
        assert torch.equal(lm.logits(ids), bare)  # B = 0: an exact no-op before training
        first = lora.train_stream(stream_ids, opts)
        assert first.windows[0].nll_sum == pytest.approx(window_only.windows[0].nll_sum, abs=1e-4)
        assert first.steps == len(first.windows) == len(window_only.windows)
        assert not torch.equal(lm.logits(ids), bare)
        with lora.teacher():
            assert torch.allclose(lm.logits(ids), bare, atol=1e-6)
        second = lora.train_stream(stream_ids, opts)
        assert second.ppl < first.ppl
    assert torch.equal(lm.logits(ids), bare)
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert [n for n, _ in lm.model.named_modules()] == names and count_hooks(lm.model) == 0


def test_lora_parameter_count_and_bad_rank():
    lm = tiny_lm()
    with LoRABaseline(lm, rank=2, target_modules=["q_proj"]) as lora:
        assert lora.num_parameters == 2 * 2 * (32 + 32)  # 2 layers, A (2x32) + B (32x2)
    with pytest.raises(InputError, match="rank"):
        LoRABaseline(lm, rank=0)
    with pytest.raises(InputError, match="with"):
        LoRABaseline(lm, rank=2).trainable_parameters()
