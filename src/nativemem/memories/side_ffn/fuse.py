"""Structural fuse: append memory neurons to each MLP's intermediate dimension (Locas, arXiv 2602.05085).

For every decoder layer the MLP ``down(act(gate(x)) * up(x))`` becomes one with m + M neurons:

- ``gate_proj.weight`` ← [W_gate ; clip(G)]      (m + M, D)
- ``up_proj.weight``   ← [W_up ; clip(K)]        (m + M, D)
- ``down_proj.weight`` ← [W_down , τ · clip(V)ᵀ] (D, m + M)

which computes the frozen MLP plus the memory exactly (up to float summation order). Layers without
memory get M zero neurons, so every layer has the same width and ``intermediate_size`` stays one
number. The original ``nn.Linear`` modules are kept in the undo record, so :func:`unfuse_model`
restores them bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from .layer import glu_sites

__all__ = ["fuse_model", "unfuse_model", "FuseRecord"]


@dataclass
class FuseRecord:
    """What :func:`fuse_model` replaced: per layer the original (gate, up, down) modules."""

    originals: dict[int, tuple[nn.Linear, nn.Linear, nn.Linear]]
    intermediate_size: int


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _widen(linear: nn.Linear, extra: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with ``extra`` appended along ``dim`` of the weight (0: outputs, 1: inputs)."""
    w = linear.weight.detach()
    weight = torch.cat([w, extra.to(device=w.device, dtype=w.dtype)], dim=dim)
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            if dim == 0:  # new neurons have no bias
                bias = torch.cat([bias, bias.new_zeros(extra.shape[0])])
            new.bias.copy_(bias)
    new.requires_grad_(linear.weight.requires_grad)
    return new


def fuse_model(model: nn.Module, weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               *, safe: bool = True) -> FuseRecord:
    """Append neurons to every decoder layer's MLP of ``model`` in place.

    Args:
        model: a causal LM whose every MLP is a GLU MLP.
        weights: layer -> (gate rows (M, D), up rows (M, D), scaled down columns (M, D)); every layer the
            same M; layers not in the dict get M zero neurons.
        safe: refuse non-finite weights.

    Returns:
        The undo record for :func:`unfuse_model`.
    """
    widths = {g.shape[0] for g, _, _ in weights.values()}
    if len(widths) != 1:
        raise InputError(f"every memory layer must have the same number of neurons to fuse, got {sorted(widths)}")
    width = widths.pop()
    if safe and not all(torch.isfinite(t).all() for ws in weights.values() for t in ws):
        raise InputError("the memory holds non-finite weights: refusing to fuse (safe=True)")
    sites = glu_sites(model)  # all layers: intermediate_size must stay one number
    cfg = _text_config(model)
    m = sites[0].intermediate_size
    if any(s.intermediate_size != m for s in sites) or getattr(cfg, "intermediate_size", m) != m:
        raise InputError("cannot fuse: the model's MLPs do not share one intermediate_size")
    dtype = sites[0].gate.weight.dtype
    if dtype != torch.float32:
        warnings.warn(f"fusing float32 memory weights into a {dtype} model rounds them", stacklevel=2)
    record = FuseRecord({}, m)
    for s in sites:
        d = s.hidden_size
        gate, up, down = weights.get(s.layer, (torch.zeros(width, d),) * 3)
        record.originals[s.layer] = (s.gate, s.up, s.down)
        s.mlp.gate_proj = _widen(s.gate, gate, 0)
        s.mlp.up_proj = _widen(s.up, up, 0)
        s.mlp.down_proj = _widen(s.down, down.T, 1)
        if hasattr(s.mlp, "intermediate_size"):
            s.mlp.intermediate_size = m + width
    cfg.intermediate_size = m + width
    return record


def unfuse_model(model: nn.Module, record: FuseRecord) -> None:
    """Put back the original MLP projections replaced by :func:`fuse_model`."""
    sites = {s.layer: s for s in glu_sites(model)}
    for layer, (gate, up, down) in record.originals.items():
        mlp = sites[layer].mlp
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = record.intermediate_size
    _text_config(model).intermediate_size = record.intermediate_size
