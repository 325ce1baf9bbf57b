"""The side GLU FFN inserted beside each frozen MLP, and the checks that find GLU MLPs.

One :class:`SideFFNLayer` per decoder layer computes

    memory(x) = τ · clip(V)ᵀ (act(clip(G) x) ⊙ clip(K) x)        x: (B, T, D)

with G, K, V of shape (M, D) (one row per memory neuron: gate, up/key, value), ``act`` the backbone
MLP's own activation, τ = mean L2 norm of the backbone down-projection columns / width (the
output scale of Locas, arXiv 2602.05085), and clip(w) = w / max(‖w‖, 1) per row, a differentiable
reparametrisation that bounds every neuron's norm. Its
output is added to the frozen MLP's output by a forward hook on the MLP (the same input feeds both).

Parameters are float32 whatever the backbone dtype; the output is cast back to the hidden dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from ...hooks import decoder_layers, resolve_site

__all__ = ["GLUSite", "SideFFNLayer", "glu_sites", "clip_rows", "down_column_norm"]


def clip_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row divided by max(its L2 norm, 1): rows with norm <= 1 are unchanged. (M, D) -> (M, D)."""
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1.0)


@dataclass(frozen=True)
class GLUSite:
    """A gated MLP of one decoder layer: ``down(act(gate(x)) * up(x))``."""

    layer: int
    path: str
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def hidden_size(self) -> int:
        return int(self.gate.in_features)

    @property
    def intermediate_size(self) -> int:
        return int(self.gate.out_features)


def glu_sites(model: nn.Module, layers: tuple[int, ...] | None = None) -> list[GLUSite]:
    """The GLU MLPs of ``layers`` (all decoder layers when None), in layer order.

    Raises:
        InputError: a layer index is out of range, or an MLP is not a gated (GLU) MLP; the message says
            "not supported for this architecture" and names the module.
    """
    _, blocks = decoder_layers(model)
    n = len(blocks)
    if layers is None:
        wanted = list(range(n))
    else:
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise InputError(f"layers {bad} are out of range: the model has {n} decoder layers")
        wanted = sorted({i % n for i in layers})
    sites = []
    for i in wanted:
        site = resolve_site(model, "mlp", i)
        mlp = site.module
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        act = getattr(mlp, "act_fn", None)
        if not all(isinstance(p, nn.Linear) for p in parts) or not callable(act):
            raise InputError(
                f"side_ffn memory is not supported for this architecture: {site.path} ({type(mlp).__name__}) is "
                "not a gated GLU MLP with gate_proj, up_proj, down_proj and act_fn")
        gate, up, down = parts
        if not (gate.out_features == up.out_features == down.in_features and gate.in_features == up.in_features
                == down.out_features):
            raise InputError(f"side_ffn memory is not supported for this architecture: the projections of "
                             f"{site.path} ({type(mlp).__name__}) do not have GLU shapes")
        sites.append(GLUSite(i, site.path, mlp, gate, up, down, act))
    return sites


def down_column_norm(site: GLUSite) -> float:
    """Mean L2 norm of the down-projection columns (one per backbone neuron), in float64."""
    return float(site.down.weight.detach().double().norm(dim=0).mean())


class SideFFNLayer(nn.Module):
    """The memory neurons of one decoder layer.

    Args:
        hidden_size: D.
        act: the backbone MLP's activation function.
        tau: output scale τ (fixed, not trained).
    """

    def __init__(self, hidden_size: int, act: Callable[[torch.Tensor], torch.Tensor], tau: float,
                 device: torch.device | str | None = None):
        super().__init__()
        empty = torch.zeros(0, hidden_size, device=device)
        self.gate = nn.Parameter(empty.clone())  # (M, D), like gate_proj rows
        self.up = nn.Parameter(empty.clone())  # (M, D), like up_proj rows ("keys")
        self.value = nn.Parameter(empty.clone())  # (M, D), like down_proj columns
        self.register_buffer("source", torch.zeros(0, dtype=torch.long, device=device))  # cloned neuron or -1
        self.tau = float(tau)
        self._act = [act]  # a list, so the backbone's activation module is not registered as a child

    @property
    def num_neurons(self) -> int:
        return int(self.gate.shape[0])

    @property
    def act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._act[0]

    def clipped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, value) rows after norm clipping, each (M, D)."""
        return clip_rows(self.gate), clip_rows(self.up), clip_rows(self.value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) in any dtype -> memory output (B, T, D) in x's dtype."""
        gate, up, value = self.clipped()
        xf = x.to(gate.dtype)
        h = self.act(xf @ gate.T) * (xf @ up.T)  # (B, T, M)
        return ((h @ value) * self.tau).to(x.dtype)

    def append(self, gate: torch.Tensor, up: torch.Tensor, value: torch.Tensor, source: torch.Tensor) -> None:
        """Append neurons (rows) to the memory; replaces the parameters (optimisers must be rebuilt)."""
        with torch.no_grad():
            self.gate = nn.Parameter(torch.cat([self.gate.detach(), gate.to(self.gate)]))
            self.up = nn.Parameter(torch.cat([self.up.detach(), up.to(self.up)]))
            self.value = nn.Parameter(torch.cat([self.value.detach(), value.to(self.value)]))
            self.source = torch.cat([self.source, source.to(self.source)])

    def remove(self, start: int, end: int) -> None:
        """Remove neurons ``start:end``."""
        keep = torch.ones(self.num_neurons, dtype=torch.bool, device=self.source.device)
        keep[start:end] = False
        with torch.no_grad():
            self.gate = nn.Parameter(self.gate.detach()[keep].clone())
            self.up = nn.Parameter(self.up.detach()[keep].clone())
            self.value = nn.Parameter(self.value.detach()[keep].clone())
            self.source = self.source[keep].clone()

    def extra_repr(self) -> str:
        return f"neurons={self.num_neurons}, hidden={self.gate.shape[1]}, tau={self.tau:.4g}"
