"""Activation memory, retrieval side: KV-Embedding re-routing, TwoNN, layer choice, whitening, fit()."""

import json

import pytest
import torch
from activation_helpers import FIT_TEXTS, fast_dir  # noqa: F401
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import InputError
from nativemem.memories.activation.encode import choose_reroute_layers, fit_transform, reroute_pass, twonn
from nativemem.memories.activation.kv import capture
from nativemem.memories.base import MEMORY_CONFIG_NAME


def test_twonn_recovers_the_dimension_of_a_plane_in_ten_dimensions():
    g = torch.Generator().manual_seed(0)
    plane = torch.rand(800, 2, generator=g) @ torch.randn(2, 10, generator=g)
    assert 1.7 < twonn(plane) < 2.3
    cube = torch.rand(800, 6, generator=g) @ torch.randn(6, 10, generator=g)
    assert 4.5 < twonn(cube) < 7.5
    assert twonn(torch.zeros(3, 4)) != twonn(torch.zeros(3, 4))  # NaN when undefined


def test_layer_rule_window_after_a_u_minimum_else_lowest_after_first_fifth():
    u = [20, 16, 12, 9, 7, 6, 8, 10, 13, 15]
    assert choose_reroute_layers(u) == ([5, 6], "U-shaped: window after the minimum at layer 5")
    falling = [30, 3, 25, 20, 15, 12, 10, 9, 8, 7]  # layer 1 is an outlier inside the first 20 %
    layers, rule = choose_reroute_layers(falling)
    assert layers == [8, 9] and rule.startswith("not U-shaped")


def test_whitening_gives_identity_covariance_and_keeps_requested_dims():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 5.0
    t = fit_transform(x, dim=None, shrinkage=0.0)
    y = t.apply(x)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(6), atol=2e-2, rtol=0)
    assert fit_transform(x, dim=3).apply(x).shape == (4000, 3)
    few = fit_transform(x[:4], dim=None)  # 4 fit vectors span 3 directions: no more are whitened
    assert few.proj.shape == (6, 3) and few.mode == "whiten"
    centred = fit_transform(x, dim=None, whiten=False)
    assert centred.mode == "center" and centred.proj is None
    torch.testing.assert_close(centred.apply(x).mean(0), torch.zeros(6), atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_reroute_pass_with_the_slot_masked_equals_the_plain_pass(arch):
    lm = tiny_lm(arch)
    seqs = [[0, *lm.encode("Marie Curie was born in Warsaw. " * 3)[0].tolist()], [0, *lm.encode("Paris")[0].tolist()]]
    caps = capture(lm.model, seqs, hidden_layers=[0, 1])
    slots = [{l: (c.kv.keys[l][:, -1], c.kv.values[l][:, -1]) for l in (0, 1)} for c in caps]
    masked = reroute_pass(lm.model, seqs, slots, [], [0, 1])
    routed = reroute_pass(lm.model, seqs, slots, [1], [0, 1])
    for i in range(2):
        torch.testing.assert_close(masked[i][1], caps[i].hidden[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(routed[i][0], caps[i].hidden[0], atol=1e-5, rtol=0)  # layer 0 not routed
        assert not torch.allclose(routed[i][1], caps[i].hidden[1], atol=1e-4)


def test_fit_chooses_layers_records_the_curve_and_persists(fast_dir):
    lm = tiny_lm("llama", num_hidden_layers=4)
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", token_dim=8, pooled_dim=16)
    r = mem.fit(FIT_TEXTS)
    report = mem.config.fit_report
    assert len(report["id_curve"]) == 4 and report["id_points"] > 0
    assert report["retrieval_layer"] == mem.retrieval_layer and report["reroute_layers"] == mem.reroute_layers
    assert report["probe"] and all(set(v) == {"pooled_whiten_mrr", "pooled_center_mrr", "tokens_whiten_mrr",
                                              "tokens_center_mrr"} for v in report["probe"].values())
    assert report["pooled_transform"] in ("whiten", "center") and report["probe_pairs"] >= 4
    assert r.op == "fit" and not r.did_nothing and r.layers == mem.layers_used
    n_fit = len(FIT_TEXTS)  # whitening keeps at most N-1 components of N pooled fit vectors
    assert mem.dims() == {"pooled": min(16, n_fit - 1) if report["pooled_transform"] == "whiten" else 16, "tokens": 8}
    saved = json.loads((fast_dir / "m" / MEMORY_CONFIG_NAME).read_text())
    assert saved["config"]["fit_report"]["id_curve"] == report["id_curve"]
    ids = mem.add(["Ada Quell founded the Velmora Institute.", "The Amber Finch nests on Tollen Island."],
                  user_id="u").ids
    hits = mem.search("Who founded the institute?", k=2, user_id="u", variant="tokens")
    again = nm.open_memory(fast_dir / "m", lm)
    assert [(h.id, round(h.score, 5)) for h in again.search("Who founded the institute?", k=2, user_id="u",
                                                             variant="tokens")] == [(h.id, round(h.score, 5))
                                                                                    for h in hits]
    torch.testing.assert_close(again.pooled_transform.proj, mem.pooled_transform.proj)
    with pytest.raises(InputError, match="empty memory"):
        mem.fit(FIT_TEXTS)
    assert set(ids) == {h.id for h in hits}


def test_fit_respects_layers_fixed_in_the_config(fast_dir):
    lm = tiny_lm("llama", num_hidden_layers=4)
    mem = nm.open_memory(fast_dir / "m", lm, kind="activation", retrieval_layer=2, reroute_layers=[1, 2])
    mem.fit(FIT_TEXTS[:6])
    assert mem.retrieval_layer == 2 and mem.reroute_layers == [1, 2]
    assert mem.config.fit_report["layer_rule"] == "fixed in the config"
    with pytest.raises(InputError, match="out of range"):
        nm.open_memory(fast_dir / "bad", lm, kind="activation", retrieval_layer=9)
