"""pkm layer: exact product-key top-k, shapes, the EmbeddingBag read and its cost, calibration."""

import pytest
import torch

from nativemem.memories.pkm import PKMLayer, product_key_topk, read_values


def layer(d=32, n=16, h=2, k=4, dk=16, seed=0) -> PKMLayer:
    return PKMLayer(d, num_keys=n, heads=h, top_k=k, key_dim=dk, temperature=10.0,
                    generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k", [(7, 1), (7, 3), (16, 4), (16, 16)])
def test_product_key_topk_is_exact(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    s1, s2 = torch.randn(5, n, generator=g), torch.randn(5, n, generator=g)
    best, idx = product_key_topk(s1, s2, k)
    full = (s1[:, :, None] + s2[:, None, :]).reshape(5, n * n)  # all N**2 slots
    ref_best, ref_idx = full.topk(k, dim=-1)
    torch.testing.assert_close(best, ref_best)
    assert torch.equal(full.gather(1, idx), best)  # the indices address the right slots
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


def test_forward_shapes_weights_and_slot_range():
    lay = layer()
    values = torch.randn(lay.num_slots, 32)
    x = torch.randn(11, 32)
    out, idx, w = lay(x, values)
    assert out.shape == (11, 32) and out.dtype == torch.float32
    assert idx.shape == w.shape == (11, 2, 4)
    assert int(idx.min()) >= 0 and int(idx.max()) < 16 * 16
    torch.testing.assert_close(w.sum(-1), torch.ones(11, 2))
    assert all(len(set(row.tolist())) == 4 for row in idx.reshape(-1, 4))  # K distinct slots per head


def test_zero_pool_is_an_exact_noop():
    lay = layer()
    out, _, _ = lay(torch.randn(6, 32), torch.zeros(lay.num_slots, 32))
    assert torch.equal(out, torch.zeros(6, 32))


def test_read_values_matches_a_dense_weighted_sum():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(50, 8, generator=g)
    idx = torch.randint(0, 50, (4, 6), generator=g)
    w = torch.rand(4, 6, generator=g)
    ref = (values[idx] * w[..., None]).sum(1)
    torch.testing.assert_close(read_values(idx, w, values), ref)


@pytest.mark.parametrize("num_keys", [16, 64])
def test_read_touches_only_the_rows_it_reads_once_each_with_the_dense_gradient(num_keys):
    """The sparse read: one gradient entry per distinct row read, whatever the pool size and however many
    tokens read it, equal to the dense gradient (values and routing weights alike)."""
    lay = layer(n=num_keys)
    x = torch.randn(3, 32)
    x = torch.cat([x, x[:1].repeat(4, 1)])  # four more tokens that read the same rows as the first
    values = torch.randn(lay.num_slots, 32)
    grads = {}
    for sparse in (True, False):
        v, xi = values.clone().requires_grad_(), x.clone().requires_grad_()
        out, idx, _ = lay(xi, v, sparse=sparse)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grads[sparse] = (v.grad, xi.grad)
    g = grads[True][0]
    read = set(idx.reshape(-1).tolist())
    assert g.is_sparse and g._nnz() == len(read) <= 3 * 2 * 4  # distinct rows of 3 distinct tokens
    assert set(g._indices()[0].tolist()) == read
    torch.testing.assert_close(g.to_dense(), grads[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-5, atol=1e-5)


def test_router_is_deterministic_and_seeded():
    a, b, c = layer(seed=3), layer(seed=3), layer(seed=4)
    x = torch.randn(5, 32)
    assert torch.equal(a.route(a.normalise(x))[0], b.route(b.normalise(x))[0])
    assert not torch.equal(a.query.weight, c.query.weight)


def test_calibration_centres_and_scales_the_inputs():
    lay = layer()
    x = torch.randn(500, 32) * 7 + 3
    x[:, 5] += 100  # an outlier dimension, as in real hidden states
    lay.calibrate(x)
    z = lay.normalise(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(32), atol=1e-3, rtol=0)


def test_distinct_inputs_spread_over_slots():
    lay = layer(n=32, h=4, k=8)
    lay.calibrate(torch.randn(200, 32))
    idx, _ = lay.route(lay.normalise(torch.randn(100, 32)))
    assert len(set(idx.reshape(-1).tolist())) > 800  # of 1024 slots (uniform: ~980); not collapsed


def test_cost_does_not_depend_on_pool_size():
    """Reads and gradients are per distinct row read; a 16x larger pool changes no output shape or touched rows."""
    small, big = layer(n=16, seed=0), layer(n=64, seed=0)
    for lay in (small, big):
        values = torch.zeros(lay.num_slots, 32, requires_grad=True)
        out, idx, _ = lay(torch.randn(2, 32), values, sparse=True)
        out.sum().backward()
        assert values.grad._nnz() == len(set(idx.reshape(-1).tolist())) <= 2 * 2 * 4


def test_row_adam_matches_sparse_adam():
    """RowAdam is SparseAdam's lazy Adam: same values and moments after steps on overlapping and disjoint rows;
    rows never read keep their values, and a dense gradient is refused."""
    from nativemem.memories.pkm.optim import RowAdam

    g = torch.Generator().manual_seed(3)
    start = torch.randn(50, 8, generator=g)
    reads = [torch.tensor([[1, 4, 4, 7]]), torch.tensor([[4, 9, 30, 1]]), torch.tensor([[2, 3, 7, 49]])]
    weights = [torch.rand(1, 4, generator=g) for _ in reads]
    results = []
    for make in (lambda p: torch.optim.SparseAdam([p], lr=0.1), lambda p: RowAdam([p], lr=0.1)):
        v = start.clone().requires_grad_(True)
        opt = make(v)
        for idx, w in zip(reads, weights):
            opt.zero_grad(set_to_none=True)
            (read_values(idx, w, v, sparse=True) * torch.arange(8.0)).sum().backward()
            opt.step()
        results.append((v.detach(), opt.state[v]["exp_avg"], opt.state[v]["exp_avg_sq"]))
    (ref, m_ref, s_ref), (got, m, s) = results
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(m, m_ref.to_dense() if m_ref.is_sparse else m_ref)
    torch.testing.assert_close(s, s_ref.to_dense() if s_ref.is_sparse else s_ref)
    untouched = [r for r in range(50) if r not in {1, 2, 3, 4, 7, 9, 30, 49}]
    assert torch.equal(got[untouched], start[untouched]) and not torch.equal(got[4], start[4])
    dense = torch.zeros(3, 2, requires_grad=True)
    dense.sum().backward()
    with pytest.raises(RuntimeError, match="row-sparse"):
        RowAdam([dense], lr=0.1).step()
