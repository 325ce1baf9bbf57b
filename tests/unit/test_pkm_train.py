"""pkm training path: the cached forward (hidden states below the lowest memory layer, shared prefix as a
KV cache, LM head on the answers only) gives the full forward's loss and gradients; scopes restore the
model; NaN stops training with the last good state."""

import pytest
import torch
import torch.nn.functional as F
from testing import ARCHS, tiny_lm

from nativemem.hooks import count_hooks, hooks
from nativemem.memories.pkm import PKMConfig, PKMMemory, generate_facts
from nativemem.memories.pkm.train import (CastWeights, PrefixCache, capture_residual, fact_margins, forward_answers,
                                          frozen, skip_layers)


pytestmark = pytest.mark.usefixtures("one_thread")


def small(lm, **cfg) -> PKMMemory:
    base = dict(layers=(1, 3), num_keys=16, heads=2, top_k=4, key_dim=16, gate_auto=False)
    return PKMMemory(lm, PKMConfig(**{**base, **cfg}))


def full_path(lm, mem, items):
    """Reference: the whole model on the whole sequence, memory applied from each item's first fact token."""
    logits, targets = [], []
    for it in items:
        def make(i, start=it.prefix_len):
            inner = mem._hook(i, gate=False, sparse=False, record=None)

            def fn(module, args, kwargs, output):
                delta = inner(module, args, kwargs, output) - output
                delta[:, :start] = 0
                return output + delta
            return fn

        with hooks(lm.model, [("mlp", i, make(i)) for i in mem.layer_ids]):
            out = lm.model(input_ids=torch.tensor([it.ids])).logits[0].float()
        logits.append(out[it.answer_start - 1: len(it.ids) - 1])
        targets += it.targets
    return torch.cat(logits), torch.tensor(targets)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train_prefix", [False, True])
def test_cached_path_gives_the_full_paths_loss_and_gradients(arch, train_prefix):
    # the chat prefix stays inside Gemma 3's sliding window (the tiny config's 64 is shorter than the prompt)
    lm = tiny_lm(arch, num_hidden_layers=4, **({"sliding_window": 256} if arch == "gemma3_text" else {}))
    mem = small(lm, train_prefix=train_prefix, train_projections=True)
    items, _ = mem._items(generate_facts(5))
    mem._calibrate(items)
    mem._cache(items, PrefixCache(lm.model))
    assert all((it.prefix_len > 0) != train_prefix for it in items)
    with torch.no_grad():
        mem.values.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    params = [mem.values, *mem.layers.parameters()]
    grads = []
    losses = []
    with frozen(lm.model):
        for path in ("cached", "full"):
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            if path == "cached":
                logits, targets, _ = forward_answers(lm.model, items, mem.lowest_layer, PrefixCache(lm.model),
                                                     lambda: mem._scope())
            else:
                logits, targets = full_path(lm, mem, items)
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in params])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    assert count_hooks(lm.model) == 0 and all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_cast_weights_give_autocasts_logits_and_gradients(arch):
    """Under bf16 autocast, running on copies cast once (CastWeights) gives what casting at every forward gives,
    biases and the output head included, and leaves the model's own weights and attention kernel as they were."""
    lm = tiny_lm(arch, num_hidden_layers=4, **({"sliding_window": 256} if arch == "gemma3_text" else {}))
    mem = small(lm)
    items, _ = mem._items(generate_facts(4))
    mem._calibrate(items)
    prefixes = PrefixCache(lm.model)
    mem._cache(items, prefixes)
    with torch.no_grad():
        mem.values.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kernel = lm.model.config._attn_implementation
    assert not CastWeights.of(lm.model, mem.lowest_layer, torch.bfloat16).body  # trained weights are not copied
    out = []
    mem.values.requires_grad_(True)
    with frozen(lm.model):
        weights = CastWeights.of(lm.model, mem.lowest_layer, torch.bfloat16)
        assert weights.body and all(w.dtype == torch.bfloat16 for w in weights.body.values())
        assert all(k.split(".")[1] in {str(i) for i in range(mem.lowest_layer, 4)} for k in weights.body)  # layers.N.
        for w in (None, weights):
            mem.values.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, targets, _ = forward_answers(lm.model, items, mem.lowest_layer, prefixes,
                                                     lambda: mem._scope(), w)
                F.cross_entropy(logits, targets).backward()
            out.append((logits.detach(), mem.values.grad.clone()))
    mem.values.requires_grad_(False)
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])
    assert float(out[0][1].abs().max()) > 0
    zeroed = CastWeights({k: torch.zeros_like(v) for k, v in weights.body.items()}, weights.head)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the copies are what runs
        assert not torch.allclose(forward_answers(lm.model, items, mem.lowest_layer, prefixes, lambda: mem._scope(),
                                                  zeroed)[0], out[0][0])
    after = lm.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert lm.model.config._attn_implementation == kernel


def test_capture_residual_is_the_input_of_the_layer():
    lm = tiny_lm(num_hidden_layers=4)
    ids = lm.chat_ids("Where was Marie Curie born?")
    with torch.no_grad():
        ref = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    before = count_hooks(lm.model)  # transformers keeps its own output-capture hooks after the call above
    torch.testing.assert_close(capture_residual(lm.model, ids, 2), ref)
    assert count_hooks(lm.model) == before


def test_skip_layers_and_frozen_restore_the_model_even_on_error():
    lm = tiny_lm(num_hidden_layers=4)
    layers = list(lm.model.model.layers)
    with pytest.raises(RuntimeError, match="inside"):
        with skip_layers(lm.model, 3), frozen(lm.model):
            assert not any(p.requires_grad for p in lm.model.parameters())
            assert lm.model.model.layers[0] is not layers[0]
            raise RuntimeError("inside")
    assert list(lm.model.model.layers) == layers
    assert all(p.requires_grad for p in lm.model.parameters())


def test_margins_say_when_greedy_decoding_is_exact():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    targets = torch.tensor([1, 1, 2])
    m = fact_margins(logits, targets, torch.tensor([0, 1, 1]), 2)
    torch.testing.assert_close(m, torch.tensor([1.0, -3.0]))


def test_non_finite_loss_stops_training_and_keeps_the_last_good_state():
    lm = tiny_lm()
    mem = small(lm, layers=(0, 1), lr=0.1, batch_size=1, max_epochs=5)
    facts = generate_facts(3)
    mem.add(facts[:1])
    good = mem.values.detach().clone()
    calls = []

    def poison(loss):
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else None

    items, _ = mem._items(facts[1:])
    prefixes = PrefixCache(lm.model)
    mem._cache(items, prefixes)
    result = mem._train(items, prefixes, loss_hook=poison)
    assert result.stopped.startswith("non-finite loss at step 2")
    assert result.steps == 1
    assert torch.isfinite(mem.values).all()
    assert not torch.equal(mem.values, good)  # step 1 was applied, step 2 was not
    assert all(p.grad is None and not p.requires_grad for p in mem.parameters())


def test_the_gradient_check_finds_a_nan_among_rows_and_coalesces_the_sparse_gradient_once():
    """A NaN or an inf in one row of a sparse or dense gradient fails the check; finite values whose sum
    overflows float32 pass it; the sparse gradient is left coalesced for the optimiser."""
    from nativemem.memories.pkm.train import _finite_grad

    def sparse(values):
        p = torch.nn.Parameter(torch.zeros(10, 3))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[7, 2, 7]]), values, (10, 3), check_invariants=True)
        return p

    ok = sparse(torch.ones(3, 3))
    assert _finite_grad(ok) and ok.grad.is_coalesced() and ok.grad._nnz() == 2
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(3, 3)
        values[2, 1] = bad
        assert not _finite_grad(sparse(values))
        dense = torch.nn.Parameter(torch.zeros(4, 3))
        dense.grad = torch.zeros(4, 3)
        dense.grad[3, 0] = bad
        assert not _finite_grad(dense)
    huge = torch.nn.Parameter(torch.zeros(4, 3))
    huge.grad = torch.full((4, 3), 3e38)
    assert not torch.isfinite(huge.grad.sum()) and _finite_grad(huge)


def test_add_reports_a_nan_stop_in_its_receipt(monkeypatch):
    lm = tiny_lm()
    mem = small(lm, layers=(0, 1), lr=0.1)
    original = mem._train
    monkeypatch.setattr(mem, "_train", lambda items, prefixes, **kw: original(
        items, prefixes, **kw, loss_hook=lambda loss: loss * float("nan")))
    receipt = mem.add(generate_facts(2))
    assert any("non-finite" in n for n in receipt.notes)
    assert receipt.steps == 0 and torch.equal(mem.values, torch.zeros_like(mem.values))
