"""The product-key memory layer (Lample et al. 2019; Memory+ of Berges et al. 2024, arXiv 2412.09764).

How this works, per token x (D) at one memory layer (letters as in STYLE.md B8):

1. **Normalise** the input: z = (x - center) * inv_scale, with per-dimension statistics measured on the
   model's own hidden states (``calibrate``). Without it a few high-norm outlier dimensions make every
   token's query nearly the same (as the consumer-hardware reconstruction of memory layers found).
2. **Query**: q = W_q z, split into H heads of key_dim, each split into two halves; each half is
   L2-normalised (Memory+ qk-norm).
3. **Product keys**: per head two codebooks of N unit half-keys; the scores of the N**2 slots are sums
   of two half scores (cosine x temperature). Top-K per half, then top-K over the K**2 candidate sums,
   which is exact (the best slot's halves are each in their half's top-K).
4. **Read**: softmax over each head's K scores; one ``embedding_bag`` (weighted sum) over the value pool
   for all H*K reads of the token, so the cost does not grow with the pool (only the H*K rows are
   touched, forwards and backwards).
5. **Output**: W_o( SiLU(W_g z) * v ) (Memory+ "swilu" output gating).

The value pool (M = N**2 rows of D) is not part of the layer: one pool is shared by every memory layer
and passed to :meth:`PKMLayer.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PKMLayer", "product_key_topk", "read_values"]


def product_key_topk(scores1: torch.Tensor, scores2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of a product-key codebook from the two half scores.

    Args:
        scores1: (..., N) scores of the first half keys.
        scores2: (..., N) scores of the second half keys.
        k: slots to keep (<= N).

    Returns:
        (scores, idx), both (..., k), best first; ``idx = i1 * N + i2`` indexes the N**2 slots.
    """
    n = scores1.shape[-1]
    s1, i1 = scores1.topk(k, dim=-1)  # (..., K)
    s2, i2 = scores2.topk(k, dim=-1)  # (..., K)
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., K*K)
    best, j = cand.topk(k, dim=-1)  # (..., K)
    idx = i1.gather(-1, j // k) * n + i2.gather(-1, j % k)  # (..., K)
    return best, idx


def read_values(idx: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, *, sparse: bool = False) -> torch.Tensor:
    """Weighted sum of pool rows: ``out[b] = sum_r weights[b, r] * values[idx[b, r]]``.

    Args:
        idx: (B, R) slot indices.
        weights: (B, R) weights (float32).
        values: (M, D) the value pool.
        sparse: produce a sparse gradient for ``values`` (for a row-sparse optimiser), one entry per distinct
            row read: tokens share rows (every fact's chat-template tokens read the same ones), and a gradient
            entry per read made the optimiser step about as costly as the forward pass.

    Returns:
        (B, D).
    """
    if sparse:  # gather each row read once (a sparse gradient of unique rows), then read the batch from them
        rows, inverse = torch.unique(idx, return_inverse=True)
        table = F.embedding(rows, values, sparse=True)  # (U, D)
        return F.embedding_bag(inverse, table, per_sample_weights=weights.to(values.dtype), mode="sum")
    return F.embedding_bag(idx, values, per_sample_weights=weights.to(values.dtype), mode="sum")


class PKMLayer(nn.Module):
    """Router and projections of one memory layer (the value pool is shared and passed in).

    Args:
        hidden_size: model width D (also the value size).
        num_keys: keys per half codebook N.
        heads: query heads H.
        top_k: slots read per head K.
        key_dim: query size per head (two halves of key_dim / 2).
        temperature: scale of the cosine scores.
        generator: seeds the random initialisation.
    """

    def __init__(self, hidden_size: int, *, num_keys: int, heads: int, top_k: int, key_dim: int,
                 temperature: float, generator: torch.Generator | None = None):
        super().__init__()
        self.hidden_size, self.num_keys, self.heads, self.top_k, self.key_dim = hidden_size, num_keys, heads, top_k, key_dim
        self.temperature = float(temperature)
        d, half = hidden_size, key_dim // 2
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("inv_scale", torch.ones(d))
        self.query = nn.Linear(d, heads * key_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(heads, 2, num_keys, half))  # (H, 2, N, Dk/2)
        self.gate_proj = nn.Linear(d, d, bias=False)  # W_g
        self.out_proj = nn.Linear(d, d, bias=False)  # W_o
        with torch.no_grad():
            self.query.weight.normal_(0.0, d ** -0.5, generator=generator)
            self.keys.normal_(0.0, 1.0, generator=generator)
            self.keys.copy_(F.normalize(self.keys, dim=-1))
            self.gate_proj.weight.normal_(0.0, d ** -0.5, generator=generator)
            # random, not zero: the pool starts at zero, so the memory is an exact no-op and the values
            # get a gradient from the first step (a zero W_o would hold them at zero until W_o grows)
            self.out_proj.weight.normal_(0.0, d ** -0.5, generator=generator)

    @property
    def num_slots(self) -> int:
        return self.num_keys ** 2

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the input statistics from sample hidden states x: (T, D) (any leading shape)."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.center.copy_(x.mean(0))
        self.inv_scale.copy_(1.0 / x.std(0, correction=0).clamp_min(1e-4))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """z = (x - center) * inv_scale in float32; x: (..., D)."""
        return (x.float() - self.center) * self.inv_scale

    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and weights for normalised inputs.

        Args:
            z: (B, D) normalised inputs.

        Returns:
            idx (B, H, K) slot indices and weights (B, H, K), softmax over each head's K scores.
        """
        b = z.shape[0]
        q = self.query(z).view(b, self.heads, 2, self.key_dim // 2)  # (B, H, 2, Dk/2)
        q = F.normalize(q, dim=-1)
        keys = F.normalize(self.keys, dim=-1)  # (H, 2, N, Dk/2)
        scores = torch.einsum("bhpd,hpnd->bhpn", q, keys) * self.temperature  # (B, H, 2, N)
        best, idx = product_key_topk(scores[:, :, 0], scores[:, :, 1], self.top_k)  # (B, H, K) each
        return idx, torch.softmax(best, dim=-1)

    def forward(self, x: torch.Tensor, values: torch.Tensor, *, sparse: bool = False,
                z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory output for each token.

        Args:
            x: (B, D) MLP inputs (any dtype; the memory runs in float32).
            values: (M, D) the shared value pool.
            sparse: sparse gradient for the pool.
            z: the normalised input when already computed.

        Returns:
            out (B, D) float32, idx (B, H, K), weights (B, H, K).
        """
        with torch.autocast(x.device.type, enabled=False):  # the memory always runs in float32
            z = self.normalise(x) if z is None else z.float()
            idx, w = self.route(z)
            b = z.shape[0]
            v = read_values(idx.reshape(b, -1), w.reshape(b, -1), values, sparse=sparse)  # (B, D), heads summed
            out = self.out_proj(F.silu(self.gate_proj(z)) * v)  # (B, D)
        return out, idx, w
