"""Fusing a side-FFN memory into plain dense weights: exact logits, stock checkpoints, exact undo."""

import pytest
import torch
from testing import ARCHS, tiny_lm

import nativemem as nm
from nativemem.memories.side_ffn import SideFFNConfig, SideFFNMemory

TEXT = "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes. Paris is the capital of France. " * 3


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(lm, **cfg) -> SideFFNMemory:
    mem = SideFFNMemory(lm, SideFFNConfig(**{"width": 5, "window": 16, "context": 16, "lr": 3e-2, **cfg}))
    mem.add(TEXT)
    with torch.no_grad():  # make the clipping and every neuron matter: large random values
        for f in mem.ffn.values():
            f.value.copy_(torch.randn_like(f.value) * 2)
    return mem


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_model_matches_memory_and_round_trips(arch, tmp_path):
    lm = tiny_lm(arch)
    mem = trained(lm)
    ids = lm.chat_ids("Where was Marie Curie born?")
    bare = lm.logits(ids)
    with_mem = lm.logits(ids, memory=mem)
    assert (with_mem - bare).abs().max() > 1e-3  # the memory matters
    fused = mem.fuse()
    assert type(fused) is type(lm.model) and fused is not lm.model
    assert fused.config.intermediate_size == 37 + 5 and lm.model.config.intermediate_size == 37
    with torch.no_grad():
        out = fused(input_ids=ids).logits
    assert (out - with_mem).abs().max() <= 1e-4
    assert torch.equal(lm.logits(ids), bare)  # the original is untouched
    fused.save_pretrained(tmp_path / "fused")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert again.config.intermediate_size == 42
    with torch.no_grad():
        assert (again(input_ids=ids).logits - with_mem).abs().max() <= 1e-4


def test_inplace_fuse_then_unfuse_is_exact():
    lm = tiny_lm()
    mem = trained(lm)
    ids = lm.chat_ids("Where was Marie Curie born?")
    bare, with_mem = lm.logits(ids), lm.logits(ids, memory=mem)
    originals = [p.clone() for p in lm.model.parameters()]
    model = mem.fuse(inplace=True)
    assert model is lm.model and mem.stats()["fused"]
    assert (lm.logits(ids) - with_mem).abs().max() <= 1e-4
    # the memory does not add itself twice while fused
    assert (lm.logits(ids, memory=mem) - with_mem).abs().max() <= 1e-4
    with pytest.raises(nm.NativememError, match="unfuse"):
        mem.add(TEXT)
    mem.unfuse()
    assert torch.equal(lm.logits(ids), bare) and lm.model.config.intermediate_size == 37
    assert all(torch.equal(a, b) for a, b in zip(originals, lm.model.parameters()))
    assert torch.equal(lm.logits(ids, memory=mem), with_mem)
    with pytest.raises(nm.NativememError, match="not fused"):
        mem.unfuse()


def test_fuse_with_a_layer_subset_pads_other_layers():
    lm = tiny_lm("qwen3")
    mem = trained(lm, layers=(1,))
    ids = lm.chat_ids("Where was Marie Curie born?")
    fused = mem.fuse()
    assert fused.model.layers[0].mlp.down_proj.weight.shape == (32, 42)
    assert fused.model.layers[0].mlp.down_proj.weight[:, 37:].abs().max() == 0
    with torch.no_grad():
        assert (fused(input_ids=ids).logits - lm.logits(ids, memory=mem)).abs().max() <= 1e-4


def test_fuse_refuses_non_finite_weights():
    lm = tiny_lm()
    mem = trained(lm)
    with torch.no_grad():
        mem.ffn["0"].value[0, 0] = float("nan")
    with pytest.raises(nm.NativememError, match="non-finite"):
        mem.fuse()
