"""The value pool's optimiser: :class:`torch.optim.SparseAdam`'s update, computed on the gathered rows.

SparseAdam is lazy Adam: only the rows a batch reads change, and their moments are the only ones that
decay. It does the arithmetic on sparse tensors (masks, sparse adds, a sparse update), which made it 16 %
of a facts training step on SmolLM2 (~18,000 of 65,536 rows of 576 touched per step: 0.19 s on one core).
:class:`RowAdam` gathers the touched rows of the moments, updates them with dense kernels and writes them
back (0.10 s); the result equals SparseAdam's (``tests/unit/test_pkm_layer.py``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["RowAdam"]


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam on the rows of a sparse gradient (one sparse dimension: an embedding-style gradient).

    Args:
        params: parameters whose gradients are sparse (``F.embedding(..., sparse=True)``).
        lr, betas, eps: as in :class:`torch.optim.SparseAdam` (no weight decay).

    Raises:
        ValueError: a bad hyperparameter.
        RuntimeError (from ``step``): a dense gradient.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    raise RuntimeError("RowAdam takes row-sparse gradients (an embedding read with sparse=True)")
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
        return loss
