"""Side-FFN memory (Locas-GLU): the block, memorize, test-time training, nll, grow, bad input."""

import math

import pytest
import torch
from testing import ARCHS, tiny_lm

import nativemem as nm
from nativemem.errors import FingerprintMismatchError, InputError
from nativemem.hooks import count_hooks
from nativemem.memories.side_ffn import SideFFNConfig, SideFFNMemory, StreamOptions, stream
from nativemem.memories.side_ffn.layer import clip_rows, glu_sites

TEXT = ("Marie Curie was born in Warsaw in 1867 and won two Nobel prizes. Paris is the capital of France. "
        "The quick brown fox jumps over the lazy dog. ") * 4
PROMPT = "Where was Marie Curie born?"


pytestmark = pytest.mark.usefixtures("one_thread")


def memory(lm, **cfg) -> SideFFNMemory:
    return SideFFNMemory(lm, SideFFNConfig(**{"width": 4, "window": 16, "context": 16, **cfg}))


@pytest.fixture
def lm():
    return tiny_lm()


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_values_are_bit_identical_and_training_changes_logits(arch):
    lm = tiny_lm(arch)
    ids = lm.chat_ids(PROMPT)
    bare = lm.logits(ids)
    mem = memory(lm)
    mem.memorize(TEXT)
    assert mem.num_neurons == 4 and all(float(f.value.detach().abs().max()) == 0 for f in mem.ffn.values())
    assert torch.equal(lm.logits(ids, memory=mem), bare)
    mem.train_stream(TEXT, lr=1e-2)
    assert not torch.equal(lm.logits(ids, memory=mem), bare)
    assert torch.equal(lm.logits(ids), bare) and count_hooks(lm.model) == 0
    # the activation is the model's own, not assumed
    for site in mem.sites:
        assert mem.ffn[str(site.layer)].act is site.mlp.act_fn


def test_block_formula_tau_and_clipping(lm):
    mem = memory(lm, width=3)
    mem.memorize(TEXT)
    site = mem.sites[0]
    ffn = mem.ffn[str(site.layer)]
    tau = float(site.down.weight.detach().double().norm(dim=0).mean()) / 3
    assert ffn.tau == pytest.approx(tau, rel=1e-12)
    with torch.no_grad():
        ffn.value.copy_(torch.randn_like(ffn.value) * 5)  # norms > 1: clipped to 1
        ffn.gate.mul_(3.0)
    x = torch.randn(2, 5, 32)
    gate = torch.stack([w / max(1.0, float(w.norm())) for w in ffn.gate.detach()])
    up = torch.stack([w / max(1.0, float(w.norm())) for w in ffn.up.detach()])
    value = torch.stack([w / max(1.0, float(w.norm())) for w in ffn.value.detach()])
    expected = tau * (site.mlp.act_fn(x @ gate.T) * (x @ up.T)) @ value
    torch.testing.assert_close(ffn(x), expected.float(), rtol=1e-5, atol=1e-6)
    assert float(clip_rows(ffn.value.detach()).norm(dim=1).max()) <= 1 + 1e-6
    small = torch.full((2, 4), 0.1)
    assert torch.equal(clip_rows(small), small)
    # the reparametrisation is differentiable
    w = (torch.randn(3, 4) * 3).requires_grad_(True)
    clip_rows(w).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_memorize_strategies(lm):
    scores = memory(lm).activation_scores(TEXT)
    # highest: the top-r neurons by mean |act(gate)*up|, rows cloned and L2-normalised
    mem = memory(lm, width=5)
    mem.memorize(TEXT)
    for site in mem.sites:
        ffn = mem.ffn[str(site.layer)]
        top = torch.topk(scores[site.layer], 5).indices
        assert set(ffn.source.tolist()) == set(top.tolist())
        src = ffn.source
        torch.testing.assert_close(ffn.gate.detach(), torch.nn.functional.normalize(site.gate.weight[src], dim=1))
        torch.testing.assert_close(ffn.up.detach(), torch.nn.functional.normalize(site.up.weight[src], dim=1))
        assert torch.equal(ffn.value.detach(), torch.zeros(5, 32))
    low = memory(lm, width=5, init="lowest")
    low.memorize(TEXT)
    for site in low.sites:
        bottom = torch.topk(scores[site.layer], 5, largest=False).indices
        assert set(low.ffn[str(site.layer)].source.tolist()) == set(bottom.tolist())
    ri = memory(lm, width=5, init="random_index")
    ri.memorize(TEXT)
    src = ri.ffn["0"].source.tolist()
    assert len(set(src)) == 5 and all(0 <= i < 37 for i in src)
    rnd = memory(lm, width=5, init="random")
    rnd.memorize(TEXT)
    f = rnd.ffn["0"]
    assert f.source.tolist() == [-1] * 5
    torch.testing.assert_close(f.gate.norm(dim=1), torch.ones(5))


def test_activation_scores_match_a_manual_pass(lm):
    mem = memory(lm)
    ids = mem._ids(TEXT)
    site = mem.sites[1]
    captured = {}

    def grab(module, args, output):
        captured["x"] = args[0].detach()

    h = site.down.register_forward_hook(grab)
    with torch.no_grad():
        lm.model(input_ids=ids[:1024].unsqueeze(0))
    h.remove()
    torch.testing.assert_close(mem.activation_scores(TEXT)[1], captured["x"].abs().mean(dim=(0, 1)))


def test_training_lowers_nll_on_the_trained_text(lm):
    mem = memory(lm, width=8, lr=1e-2, steps_per_window=2)
    mem.memorize(TEXT)
    before = float(mem.nll(TEXT).mean())
    for _ in range(3):
        mem.train_stream(TEXT)
    after = float(mem.nll(TEXT).mean())
    assert after < before - 0.05, (before, after)
    assert torch.allclose(mem.nll(TEXT, window=10_000), lm.nll(TEXT, memory=mem), atol=1e-4)


def test_each_window_is_scored_before_training_on_it(lm):
    mem_a, mem_b = memory(lm, lr=1e-2), memory(lm, lr=1e-2)
    mem_a.memorize(TEXT)
    mem_b.memorize(TEXT)
    ids = mem_a._ids(TEXT)
    k = 3
    part = mem_a.train_stream(ids[: 1 + 16 * k])  # trains on windows 0..k-1 only
    assert len(part.windows) == k and part.steps == k
    full = mem_b.train_stream(ids)
    assert [w.nll_sum for w in full.windows[:k]] == pytest.approx([w.nll_sum for w in part.windows], abs=1e-4)
    # window k of the full run was scored with the state that had trained on windows 0..k-1, not on k
    ref = stream(lm.model, ids[: 1 + 16 * (k + 1)], mem_a, StreamOptions(window=16, context=16, train=False),
                 max_context=lm.max_context)
    assert ref.windows[k].nll_sum == pytest.approx(full.windows[k].nll_sum, abs=1e-3)
    assert ref.windows[0].nll_sum != pytest.approx(part.windows[0].nll_sum, abs=1e-3)  # training changed it
    # the cumulative perplexity is exp(sum NLL / tokens) over every token after the first
    assert full.ppl == pytest.approx(math.exp(full.nll_sum / full.tokens))
    assert full.tokens == ids.numel() - 1 == full.token_nll.numel()
    assert full.ppl_at(full.tokens) == pytest.approx(full.ppl, rel=1e-6)


@pytest.mark.parametrize("loss", ["sd", "mix"])
def test_self_distillation_losses_train(lm, loss):
    mem = memory(lm, loss=loss, context=4, teacher_context=64, lr=1e-2)
    mem.memorize(TEXT)
    res = mem.train_stream(TEXT)
    assert res.steps == len(res.windows) and not res.stopped and res.final_loss is not None
    assert any(float(f.value.detach().abs().max()) > 0 for f in mem.ffn.values())


def test_sd_loss_is_zero_for_a_zero_memory_with_equal_contexts(lm):
    mem = memory(lm, loss="sd", context=16, teacher_context=16)
    mem.memorize(TEXT)
    res = mem.train_stream(TEXT, steps=1)
    assert res.windows[0].loss == pytest.approx(0.0, abs=1e-6)  # student == teacher at the start


def test_grow_appends_neurons_and_delete_removes_them(lm):
    mem = memory(lm, width=3, grow=True, lr=1e-2)
    r1 = mem.add(TEXT)
    old = {k: v.clone() for k, v in mem.snapshot().items()}
    r2 = mem.add("Berlin is the capital of Germany. Question: what is the answer? Answer: forty two.")
    assert mem.num_neurons == 6 and r2.details["neurons_per_layer"] == 6
    for site in mem.sites:
        src = mem.ffn[str(site.layer)].source.tolist()
        assert len(set(src)) == 6  # neurons cloned before are not cloned again
    receipt = mem.delete(r2.ids[0])
    assert receipt.ids == r2.ids and mem.num_neurons == 3
    assert mem.ffn["0"].source.tolist() == old["0.source"].tolist()
    assert mem.delete(r1.ids[0]).ids == r1.ids and mem.num_neurons == 0
    assert mem.delete("nope").did_nothing


def test_without_grow_later_adds_only_train(lm):
    mem = memory(lm, width=3)
    mem.add(TEXT)
    r = mem.add("Paris is the capital of France.")
    assert mem.num_neurons == 3 and r.steps >= 1 and not r.did_nothing


def test_save_open_keeps_records_and_tensors(lm, tmp_path):
    mem = nm.open_memory(tmp_path / "m", lm, kind="side_ffn", width=4, window=16, context=16)
    mem.add(TEXT, user_id="u")
    mem.save()
    again = nm.open_memory(tmp_path / "m", lm)
    assert again.records == mem.records and again.config == mem.config
    for k, v in mem.snapshot().items():
        assert torch.equal(again.snapshot()[k], v)


# ---------------------------------------------------------------------- bad input
def test_bad_widths(lm):
    with pytest.raises(InputError, match="width"):
        SideFFNConfig(width=0)
    with pytest.raises(InputError, match="larger than the MLP's intermediate size 37"):
        SideFFNMemory(lm, SideFFNConfig(width=38))
    mem = memory(lm, width=30)
    mem.memorize(TEXT)
    with pytest.raises(InputError, match="not cloned yet"):
        mem.memorize(TEXT, width=30)  # only 7 neurons left to clone
    with pytest.raises(InputError, match="width"):
        mem.memorize(TEXT, width=0)
    with pytest.raises(InputError, match="unknown init"):
        SideFFNConfig(init="best")
    with pytest.raises(InputError, match="out of range"):
        SideFFNMemory(lm, SideFFNConfig(layers=(5,)))


def test_text_shorter_than_one_window_is_an_error_when_streaming(lm):
    mem = memory(lm, window=64)
    mem.memorize(TEXT)
    with pytest.raises(InputError, match="shorter than one window of 64"):
        mem.train_stream("Paris is the capital of France.")
    with pytest.raises(InputError, match="exceed the model's window"):
        mem.train_stream(TEXT, window=300, context=300)
    with pytest.raises(InputError, match="unknown loss"):
        mem.train_stream(TEXT, loss="kl")
    r = mem.add("Paris is the capital of France.")  # add adapts the window: one window, one step
    assert r.steps == 1 and r.details["items"][0]["window"] < 64


def test_non_glu_mlp_is_not_supported():
    from transformers import GPT2Config, GPT2LMHeadModel
    from testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64))
    gpt2 = nm.LanguageModel(model, tok, name="tiny-gpt2")
    with pytest.raises(InputError, match=r"not supported for this architecture: transformer\.h\.0\.mlp \(GPT2MLP\)"):
        SideFFNMemory(gpt2, SideFFNConfig(width=2))
    with pytest.raises(InputError, match="not supported for this architecture"):
        glu_sites(model)


def test_nan_loss_stops_and_keeps_the_last_good_memory(lm):
    mem = memory(lm, lr=1e-2)
    mem.memorize(TEXT)
    states = []

    def poison(window, step, loss):
        states.append(mem.snapshot())
        return loss * float("nan") if window == 3 else loss

    res = mem.train_stream(TEXT, loss_hook=poison)
    assert res.stopped and "window 3" in res.stop_reason and "non-finite loss" in res.stop_reason
    assert len(res.windows) == 4 and res.steps == 3  # window 3 was scored, not trained
    # back to the state before the step of window 2 (the last state that gave a finite loss)
    for k, v in states[2].items():
        assert torch.equal(mem.snapshot()[k], v)
    assert all(torch.isfinite(v).all() for v in mem.snapshot().values())


def test_nan_loss_in_add_is_reported_in_the_receipt(lm, monkeypatch):
    import nativemem.memories.side_ffn.memory as memory_module

    real = memory_module.stream

    def poisoned(*args, **kwargs):
        kwargs["loss_hook"] = lambda w, s, loss: loss * float("nan") if w == 1 else loss
        return real(*args, **kwargs)

    monkeypatch.setattr(memory_module, "stream", poisoned)
    mem = memory(lm)
    receipt = mem.add(TEXT)
    assert receipt.steps == 1 and any("stopped early" in n for n in receipt.notes)
    assert receipt.details["items"][0]["stopped"]


def test_fuse_for_another_model_is_refused(lm):
    mem = memory(lm)
    mem.add(TEXT)
    other = tiny_lm(seed=5)
    with pytest.raises(FingerprintMismatchError, match="revision"):
        mem.fuse(into=other)
    # same fingerprint claimed, different weights: the stored tau gives it away
    other.fingerprint = lm.fingerprint
    with pytest.raises(FingerprintMismatchError, match="tau"):
        mem.fuse(into=other)
    with pytest.raises(InputError, match="nothing to fuse"):
        memory(lm).fuse()


def test_context_gradient_option_scores_the_same_and_trains(lm):
    a, b = memory(lm, lr=1e-2), memory(lm, lr=1e-2)
    a.memorize(TEXT)
    b.memorize(TEXT)
    ra = a.train_stream(TEXT, context_grad=True)
    rb = b.train_stream(TEXT, context_grad=False)
    assert ra.windows[0].nll_sum == pytest.approx(rb.windows[0].nll_sum, abs=1e-4)
    assert ra.steps == rb.steps == len(ra.windows)
    assert not torch.equal(a.ffn["0"].value, b.ffn["0"].value)  # the context's gradient path differs


def test_disabled_memory_does_not_train(lm):
    mem = memory(lm)
    mem.memorize(TEXT)
    with mem.disabled(), pytest.raises(InputError, match="disabled"):
        mem.add(TEXT)
