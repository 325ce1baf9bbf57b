"""Retrieval vectors from the model's own states: KV-Embedding pooled vectors, token vectors, whitening.

How this works (KV-Embedding, arXiv 2601.01046, as used by Neural Native Memory):

- **Token layout.** A chunk is ``[BOS] + prefix + content + suffix`` (each part tokenised on its own, so
  the content positions are known exactly); a query is ``[BOS] + query_prefix + content``. Token vectors
  come only from *content* positions (template and BOS excluded).
- **Pass 1** (:func:`~.kv.capture`) over ``layout + compression prompt`` gives, at once, the chunk's
  payload KV (a causal model's KV of the first P tokens does not depend on what follows), the token
  vectors (retrieval layer output at content positions) and the last token's pre-RoPE KV.
- **Pass 2, KV-Embedding re-routing.** The last token's KV of each re-routed layer becomes a one-slot
  prefix (rotated to position 0) that every token can attend to, with a logit bias ``b``; in the other
  layers the slot is masked out. Per-layer masks are set by scoped pre-hooks on the attention modules.
  Pooled vector = (last token + mean over content tokens) / 2 of the retrieval layer's output.
- **Transform.** z-score, then PCA whitening with covariance shrinkage (optionally fewer dimensions),
  fitted on a fit set and applied identically to documents and queries. Qdrant's cosine does the L2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from ...hooks import resolve_site
from .kv import ChunkKV, _layer_types, _text_model, capture, kv_geometry, rotate_keys

__all__ = ["Layout", "Encoded", "Transform", "reroute_pass", "pool", "fit_transform", "twonn",
           "choose_reroute_layers"]


@dataclass(frozen=True)
class Layout:
    """Token ids of one chunk or query and where its content sits.

    Attributes:
        ids: full sequence (BOS, prefix, content, suffix) - the payload for chunks.
        content: (start, end) of the content tokens in ``ids``.
        compress: ids of the compression prompt that follows ``ids`` in pass 1 and pass 2.
    """

    ids: tuple[int, ...]
    content: tuple[int, int]
    compress: tuple[int, ...]

    @property
    def pass_ids(self) -> list[int]:
        return [*self.ids, *self.compress]


@dataclass
class Encoded:
    """Raw (untransformed) retrieval states of one sequence, plus the payload capture when requested."""

    tokens: torch.Tensor  # (n_content, D) retrieval-layer output at content positions, float32
    pooled: torch.Tensor | None  # (D,), float32
    captured: object = None  # kv.Captured of the payload positions (None for queries)
    start: int = 0  # leading ids of the layout that were not run in this pass (a cached frame)


# ---------------------------------------------------------------------------- pass 2 (re-routing)
@contextmanager
def _slot_masks(model: nn.Module, lengths: Sequence[int], reroute: set[int], bias: float) -> Iterator[None]:
    """Pre-hooks that give every attention module its own 4D mask over ``[slot] + tokens``."""
    geo = kv_geometry(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    T = max(lengths)
    neg = torch.finfo(dtype).min
    q = torch.arange(T, device=device).view(T, 1) + 1  # query positions 1..T (the slot is at 0)
    k = torch.arange(T + 1, device=device).view(1, T + 1)
    types = _layer_types(model) or []
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    handles = []

    def make(layer: int):
        allowed = k <= q
        if window and layer < len(types) and types[layer] == "sliding_attention":
            allowed &= (q - k) < window
        mask = torch.where(allowed, 0.0, neg)
        mask[:, 0] = bias if layer in reroute else neg  # the slot: visible (with bias) or masked
        mask = mask.to(dtype).view(1, 1, T, T + 1).expand(len(lengths), 1, T, T + 1)

        def hook(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    try:
        for layer in range(geo.num_layers):
            attn = resolve_site(model, "attn", layer).module
            handles.append(attn.register_forward_pre_hook(make(layer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def reroute_pass(model: nn.Module, sequences: Sequence[Sequence[int]], slots: Sequence[dict[int, tuple]],
                 reroute: Sequence[int], hidden_layers: Sequence[int], bias: float = 1.0,
                 pad_id: int = 0) -> list[dict[int, torch.Tensor]]:
    """KV-Embedding pass 2: rerun ``sequences`` with each one's last-token KV as a one-slot prefix.

    Args:
        sequences: the pass-1 token ids.
        slots: per sequence, ``{layer: (key (H, Dh) pre-RoPE, value (H, Dh))}`` for the re-routed layers.
        reroute: layers whose slot is visible; the slot is masked out elsewhere.
        hidden_layers: layers whose output is returned.
        bias: attention-logit bias added to the slot column.

    Returns:
        Per sequence, ``{layer: (T, D)}`` outputs of ``hidden_layers``.
    """
    from transformers import DynamicCache

    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("eager", "sdpa"):
        raise InputError(f"KV-Embedding re-routing needs eager or sdpa attention, the model uses {impl!r}")
    geo = kv_geometry(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    B = len(sequences)
    lengths = [len(s) for s in sequences]
    T = max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), device=device)
    cache = DynamicCache(config=model.config)
    zero = torch.zeros((B, geo.num_kv_heads, 1, geo.head_dim), dtype=dtype, device=device)
    pos0 = torch.zeros((B, 1), dtype=torch.long, device=device)
    reroute = set(int(l) for l in reroute)
    hidden: dict[int, torch.Tensor] = {}
    from ...hooks import hooks

    def grab(layer):
        def fn(module, args, kwargs, output):
            hidden[layer] = (output if isinstance(output, torch.Tensor) else output[0]).detach()

        return fn

    with torch.inference_mode():
        for layer in range(geo.num_layers):
            if layer in reroute:
                k = torch.stack([s[layer][0] for s in slots]).to(device=device, dtype=dtype).unsqueeze(2)
                v = torch.stack([s[layer][1] for s in slots]).to(device=device, dtype=dtype).unsqueeze(2)
                cache.update(rotate_keys(model, k, pos0, layer), v, layer)
            else:
                cache.update(zero, zero, layer)
        with _slot_masks(model, lengths, reroute, bias), hooks(model, [("residual_post", l, grab(l))
                                                                       for l in hidden_layers]):
            _text_model(model)(input_ids=ids, past_key_values=cache, use_cache=True)
    return [{l: h[i, :n].clone() for l, h in hidden.items()} for i, n in enumerate(lengths)]


def pool(hidden: torch.Tensor, content: tuple[int, int]) -> torch.Tensor:
    """(last token + mean over content tokens) / 2, float32. hidden: (T, D)."""
    h = hidden.float()
    start, end = content
    return 0.5 * (h[-1] + h[start:end].mean(0))


def encode(model: nn.Module, layouts: Sequence[Layout], *, layer: int, reroute: Sequence[int], bias: float,
           pooled: bool = True, payload: bool = False, checkpoint_layer: int | None = None,
           pad_id: int = 0, frame: ChunkKV | None = None) -> list[Encoded]:
    """Pass 1 (payload KV + token vectors + slot KV) and, when ``pooled``, pass 2 (KV-Embedding vector).

    Args:
        layouts: sequences to encode (one batch).
        layer: retrieval layer.
        reroute: re-routed layers of pass 2.
        payload: return the pass-1 capture of the payload positions (KV, and the checkpoint residual).
        frame: pre-RoPE KV of the first ``frame.length`` ids, which every layout starts with; pass 1 then
            runs only the rest (the pooled pass 2 still runs whole sequences).
    """
    # the compression prompt only serves the pooled vector; causal attention keeps the rest independent of it
    skip = frame.length if frame is not None and not pooled else 0
    seqs = [lay.pass_ids if pooled else list(lay.ids)[skip:] for lay in layouts]
    inputs = [checkpoint_layer] if (payload and checkpoint_layer is not None) else []
    # a query (no payload, no pooled pass) runs only up to the retrieval layer
    stop = layer if not (payload or pooled or inputs) else None
    # payload KV is stacked and quantised per chunk right after (a copy), so the capture hands out views
    caps = capture(model, seqs, kv=payload or pooled, hidden_layers=[layer], input_layers=inputs, pad_id=pad_id,
                   past=frame if skip else None, stop_after=stop, clone=not payload)
    hiddens = [None] * len(seqs)
    if pooled:
        slots = [{l: (cap.kv.keys[l][:, -1], cap.kv.values[l][:, -1]) for l in reroute} for cap in caps]
        hiddens = reroute_pass(model, seqs, slots, reroute, [layer], bias, pad_id)
    out = []
    for lay, cap, hid in zip(layouts, caps, hiddens):
        start, end = lay.content
        tokens = cap.hidden[layer][start - skip:end - skip].float()
        vec = pool(hid[layer], lay.content) if hid is not None else None
        if payload:
            n = len(lay.ids) - skip
            cap.kv.keys = [k[:, :n] for k in cap.kv.keys]
            cap.kv.values = [v[:, :n] for v in cap.kv.values]
            cap.hidden = {l: h[:n] for l, h in cap.hidden.items() if l < 0}
        out.append(Encoded(tokens, vec, cap if payload else None, skip))
    return out


# ---------------------------------------------------------------------------- transform
@dataclass
class Transform:
    """y = ((x - mean) / scale) @ proj; each part optional. Identity until fitted.

    ``mode`` is "whiten" (z-score, then PCA whitening), "center" (mean removed, optionally projected on the
    leading principal components without rescaling) or "" (identity).
    """

    mean: torch.Tensor | None = None  # (D,)
    scale: torch.Tensor | None = None  # (D,)
    proj: torch.Tensor | None = None  # (D, d)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @property
    def mode(self) -> str:
        if self.mean is None:
            return ""
        return "whiten" if self.scale is not None else "center"

    def dim(self, hidden_size: int) -> int:
        return int(self.proj.shape[1]) if self.proj is not None else hidden_size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.scale is not None:
            x = x / self.scale.to(x.device)
        if self.proj is not None:
            x = x @ self.proj.to(x.device)
        return x

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        parts = {"mean": self.mean, "scale": self.scale, "proj": self.proj}
        return {f"{prefix}_{k}": v for k, v in parts.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> Transform:
        get = lambda k: state[f"{prefix}_{k}"].float() if f"{prefix}_{k}" in state else None  # noqa: E731
        t = cls(get("mean"), get("scale"), get("proj"))
        if t.mean is None and (t.scale is not None or t.proj is not None):
            from ...errors import MemoryFormatError

            raise MemoryFormatError(f"{prefix} transform has a scale or projection but no mean")
        return t


def fit_transform(x: torch.Tensor, *, dim: int | None, zscore: bool = True, shrinkage: float = 0.1,
                  whiten: bool = True) -> Transform:
    """Fit a retrieval transform on rows of ``x`` (N, D).

    ``whiten=True``: z-score (if ``zscore``), then PCA whitening: covariance C shrunk toward (tr C / D)·I,
    the leading ``dim`` components kept and scaled by λ^-½ (with all components, PCA whitening equals ZCA
    whitening up to a rotation, which cosine ignores). At most N-1 components are kept: directions the fit
    set does not span have no variance estimate, and amplifying them drowns the signal (measured: full
    whitening from 40 fit vectors of SmolLM2 made retrieval worse than chance).
    ``whiten=False``: centring only, plus an unscaled projection on the leading ``dim`` components.
    """
    x = x.double()
    n, d = x.shape
    if n < 2:
        raise InputError(f"fitting a transform needs at least 2 fit vectors, got {n}")
    mean = x.mean(0)
    z = x - mean
    scale = None
    if whiten and zscore:
        scale = z.std(0)
        scale = torch.where(scale < 1e-6, torch.ones_like(scale), scale)
        z = z / scale
    k = min(dim or d, d)
    if whiten:
        k = min(k, n - 1)
    if not whiten and k >= d:
        return Transform(mean.float(), None, None)
    cov = z.T @ z / (n - 1)
    cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=x.dtype)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    keep = torch.argsort(evals, descending=True)[:k]
    proj = evecs[:, keep] / evals[keep].clamp_min(1e-12).sqrt() if whiten else evecs[:, keep]
    if scale is None and whiten:
        scale = torch.ones(d, dtype=x.dtype)  # marks the whitening mode
    return Transform(mean.float(), None if scale is None else scale.float(), proj.float())


# ---------------------------------------------------------------------------- TwoNN and layer choice
def twonn(x: torch.Tensor) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): N_valid / Σ ln(r2/r1); NaN if undefined. x: (N, D)."""
    x = x.double()
    if x.shape[0] < 4:
        return float("nan")
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(2, largest=False).values  # (N, 2)
    r1, r2 = r[:, 0], r[:, 1]
    ok = (r1 > 1e-10) & (r2 > r1)
    mu = torch.log(r2[ok] / r1[ok])
    if int(ok.sum()) < 4 or float(mu.sum()) <= 0:
        return float("nan")
    return float(ok.sum()) / float(mu.sum())


def choose_reroute_layers(curve: Sequence[float]) -> tuple[list[int], str]:
    """Neural Native Memory's rule: a window after the ID minimum if the curve is U-shaped, else the
    lowest-ID layers after the first 20 %. Returns (layers, rule used)."""
    L = len(curve)
    span = max(1, L // 10)
    finite = [(i, c) for i, c in enumerate(curve) if c == c]
    if not finite:
        return [max(0, (2 * L) // 3)], "no finite ID: 2/3 depth"
    m = min(finite, key=lambda t: t[1])[0]
    vals = [c for _, c in finite]
    idx = [i for i, _ in finite]
    mpos = idx.index(m)
    left, right = vals[: mpos + 1], vals[mpos:]
    if len(vals) >= 5 and len(left) >= 2 and len(right) >= 2:
        bad = sum(1 for a, b in zip(left, left[1:]) if b > a) + sum(1 for a, b in zip(right, right[1:]) if b < a)
        if bad <= 0.2 * (len(vals) - 1):
            return list(range(m, min(L - 1, m + span) + 1)), f"U-shaped: window after the minimum at layer {m}"
    start = L // 5
    rest = [(i, c) for i, c in finite if i >= start] or finite
    chosen = sorted(i for i, _ in sorted(rest, key=lambda t: t[1])[: span + 1])
    return chosen, f"not U-shaped: the {span + 1} lowest-ID layers after layer {start}"


def encode_layers(model: nn.Module, layouts: Sequence[Layout], *, layers: Sequence[int], reroute: Sequence[int],
                  bias: float, pooled: bool = True, pad_id: int = 0) -> list[dict[int, tuple]]:
    """Like :func:`encode` for several candidate retrieval layers at once (used by the layer probe).

    Returns:
        Per layout, ``{layer: (tokens (n_content, D), pooled (D,) or None)}``, float32.
    """
    seqs = [lay.pass_ids for lay in layouts]
    caps = capture(model, seqs, kv=bool(pooled), hidden_layers=list(layers), pad_id=pad_id)
    hiddens = [None] * len(seqs)
    if pooled:
        slots = [{l: (c.kv.keys[l][:, -1], c.kv.values[l][:, -1]) for l in reroute} for c in caps]
        hiddens = reroute_pass(model, seqs, slots, reroute, list(layers), bias, pad_id)
    out = []
    for lay, cap, hid in zip(layouts, caps, hiddens):
        start, end = lay.content
        out.append({l: (cap.hidden[l][start:end].float(), pool(hid[l], lay.content) if hid is not None else None)
                    for l in layers})
    return out
