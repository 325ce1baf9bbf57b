"""Sites resolve on every supported architecture; hook scopes clean up, nest, and fail loudly."""

import pytest
import torch
from testing import ARCHS, tiny_model

from nativemem.errors import SiteResolutionError, UnknownNameError
from nativemem.hooks import SITES, count_hooks, hooks, output_hidden, replace_output_hidden, resolve_site
from nativemem.hooks.scope import HookScope


@pytest.mark.parametrize("arch", ARCHS)
def test_every_site_resolves_on_each_architecture(arch):
    model = tiny_model(arch)
    for site, (_, _, needs_layer) in SITES.items():
        if site in ("q_norm", "k_norm") and arch not in ("qwen3", "gemma3_text"):
            with pytest.raises(SiteResolutionError):
                resolve_site(model, site, 1)
            continue
        r = resolve_site(model, site, 1 if needs_layer else None)
        assert r.module is model.get_submodule(r.path)
    assert resolve_site(model, "mlp", 1).path == "model.layers.1.mlp"
    assert resolve_site(model, "residual_pre", -1).layer == 1


def test_generic_fallback_on_unlisted_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50, n_positions=64))
    assert resolve_site(model, "layer", 2).path == "transformer.h.2"
    assert resolve_site(model, "attn", 0).path == "transformer.h.0.attn"
    assert resolve_site(model, "mlp", 0).path == "transformer.h.0.mlp"
    assert resolve_site(model, "final_norm").path == "transformer.ln_f"


def test_bad_sites_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(UnknownNameError, match="did you mean 'residual_post'|Did you mean 'residual_post'"):
        resolve_site(model, "residual_pst", 0)
    with pytest.raises(SiteResolutionError, match="out of range"):
        resolve_site(model, "mlp", 2)
    with pytest.raises(SiteResolutionError, match="needs a layer"):
        resolve_site(model, "mlp")


def _ids():
    return torch.tensor([[0, 5, 9, 17, 4]])


def test_hooks_change_output_and_are_removed_even_on_error():
    model = tiny_model()
    base = model(_ids()).logits

    def shift(module, args, kwargs, output):
        return replace_output_hidden(output, output_hidden(output) + 1.0)

    with hooks(model, [("residual_post", 0, shift)]):
        assert count_hooks(model) == 1
        assert not torch.equal(model(_ids()).logits, base)
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, [("residual_post", 0, shift), ("mlp", 1, shift)]):
            raise RuntimeError("boom")
    assert count_hooks(model) == 0
    assert torch.equal(model(_ids()).logits, base)


def test_unresolved_site_registers_nothing():
    model = tiny_model()
    noop = lambda *a: None  # noqa: E731
    with pytest.raises(SiteResolutionError):
        with hooks(model, [("mlp", 0, noop), ("mlp", 7, noop)]):
            pass
    assert count_hooks(model) == 0


def test_nested_scopes_remove_only_their_own_hooks():
    model = tiny_model()
    calls = []
    outer_fn = lambda m, a, k, o: calls.append("outer")  # noqa: E731
    inner_fn = lambda m, a, k, o: calls.append("inner")  # noqa: E731
    with hooks(model, [("mlp", 0, outer_fn)]):
        with hooks(model, [("mlp", 0, inner_fn)]):
            model(_ids())
            assert count_hooks(model) == 2
        calls.clear()
        model(_ids())
        assert calls == ["outer"]
    assert count_hooks(model) == 0


def test_pre_hook_sees_layer_input():
    model = tiny_model()
    seen = {}

    def pre(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def post(module, args, kwargs, output):
        seen["out0"] = output_hidden(output).clone()

    with HookScope(model) as scope:
        scope.add("residual_pre", 1, pre)
        scope.add("residual_post", 0, post)
        model(_ids())
    assert torch.equal(seen["in"], seen["out0"])  # layer 1 reads what layer 0 wrote
    assert count_hooks(model) == 0
