"""Capture a chunk's per-layer KV with keys *before* rotary encoding, and turn stored chunks into a prefix cache.

How this works:

- **Capture.** One forward pass over ``[BOS] + chunk tokens`` (a batch, right-padded) with scoped hooks on
  each layer's key path (``k_norm`` where the architecture has QK-norm, else ``k_proj``) and ``v_proj``.
  Those outputs are the keys and values exactly as the attention module computes them, before
  ``apply_rotary_pos_emb``; they are position-free, so a chunk can later sit anywhere in a prefix.
  The same pass can record residual streams at chosen layers (retrieval vectors, checkpoints).
- **Inject.** :func:`build_cache` concatenates the stored keys/values of several segments along the
  sequence, rotates the keys for positions ``0..P-1`` with the model's *own* rotary module and its own
  ``apply_rotary_pos_emb`` (so RoPE variants, scaling and Gemma 3's per-layer-type bases come for free),
  and fills a ``transformers.DynamicCache`` built from the model config (sliding-window layers get
  sliding cache layers). With one segment equal to a text prefix, the cache equals the one a forward pass
  over that text would leave, so logits match the text prompt (tested on every tiny architecture).
- **BOS.** At position 0 a causal model's first token sees only itself, so its KV does not depend on what
  follows. Chunks are captured after a BOS and stored without it; a prefix is ``[BOS] + chunk 1 + chunk 2
  ...`` with one shared BOS (models without a BOS token start directly with the first chunk).
- **Residual checkpoints.** :func:`recompute_kv` runs only layers ``c..L-1`` on a stored residual stream
  (layers below ``c`` are swapped for pass-through stubs for the duration of the call, restored in
  ``finally``) and captures their KV with the same hooks.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError, SiteResolutionError
from ...hooks import decoder_layers, hooks, resolve_site

__all__ = ["ChunkKV", "Captured", "capture", "build_cache", "rotate_keys", "rotate_layers", "kv_geometry", "quantize_int8",
           "dequantize_int8", "recompute_kv", "KVGeometry"]


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one layer's KV for a model: ``num_layers`` x (``num_kv_heads``, T, ``head_dim``)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    qk_norm: bool

    def bytes_per_token(self, kv_dtype: str, payload: str = "kv", checkpoint_layer: int | None = None) -> int:
        """Payload bytes per stored token (the formulas of :class:`ActivationConfig`: codes and per-token value
        scales; the per-chunk key scales, token ids and record header are spread over a chunk's tokens)."""
        H, D = self.num_kv_heads, self.head_dim
        per_layer = {"int8": 2 * H * D + 2 * H, "int4": H * D + 2 * H, "float32": 8 * H * D}.get(kv_dtype, 4 * H * D)
        if payload == "kv":
            return self.num_layers * per_layer
        width = 4 if kv_dtype == "float32" else 2
        return int(checkpoint_layer) * per_layer + width * self.hidden_size


@dataclass
class ChunkKV:
    """Pre-RoPE keys and values of one token sequence: ``keys[l]``, ``values[l]``: (H, T, Dh), model dtype."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0


@dataclass
class Captured:
    """What one capture pass returns per sequence (padding removed).

    Attributes:
        kv: pre-RoPE KV of the captured layers (None where KV was not requested).
        hidden: layer index -> output of that layer (T, D); ``-c-1`` keys hold the *input* of layer c.
    """

    kv: ChunkKV | None
    hidden: dict[int, torch.Tensor]


_GEOMETRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kv_geometry(model: nn.Module) -> KVGeometry:
    """KV geometry of ``model`` (cached); raises if attention has no k_proj/v_proj or rotary module."""
    geo = _GEOMETRY.get(model)
    if geo is not None:
        return geo
    cfg = model.config.get_text_config(decoder=True)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    _, layers = decoder_layers(model)
    try:
        resolve_site(model, "k_norm", 0)
        qk_norm = True
    except SiteResolutionError:
        qk_norm = False
    for site in ("k_proj", "v_proj"):
        resolve_site(model, site, 0)  # raises a clear SiteResolutionError for unsupported attention
    _rotary(model)
    geo = KVGeometry(len(layers), kv_heads, head_dim, int(cfg.hidden_size), qk_norm)
    _GEOMETRY[model] = geo
    return geo


# ---------------------------------------------------------------------------- capture
def _key_layout(model: nn.Module, geo: KVGeometry) -> str:
    """'bthd' or 'bhtd': layout of the k_norm output (Qwen3 normalises before the transpose, Gemma 3 after)."""
    if not geo.qk_norm:
        return "bt(hd)"
    cached = _LAYOUT.get(model)
    if cached is not None:
        return cached
    shapes = []

    def grab(module, args, kwargs, output):
        shapes.append(tuple(output.shape))

    n = geo.num_kv_heads + 2  # a length that differs from the head count makes the layout unambiguous
    with torch.inference_mode(), hooks(model, [("k_norm", 0, grab)]):
        _text_model(model)(input_ids=torch.zeros((1, n), dtype=torch.long, device=_device(model)), use_cache=False)
    layout = "bthd" if shapes[0][1] == n else "bhtd"
    _LAYOUT[model] = layout
    return layout


def _to_bhtd(x: torch.Tensor, layout: str, geo: KVGeometry) -> torch.Tensor:
    if layout == "bt(hd)":  # projection output (B, T, H*Dh)
        return x.view(x.shape[0], x.shape[1], geo.num_kv_heads, geo.head_dim).transpose(1, 2)
    if layout == "bthd":
        return x.transpose(1, 2)
    return x


def capture(model: nn.Module, sequences: Sequence[Sequence[int]], *, kv: bool = True,
            hidden_layers: Sequence[int] = (), input_layers: Sequence[int] = (),
            pad_id: int = 0, past: ChunkKV | None = None, stop_after: int | None = None,
            clone: bool = True) -> list[Captured]:
    """One forward pass over a right-padded batch, returning pre-RoPE KV and residual streams per sequence.

    Args:
        model: a causal LM (or its decoder).
        sequences: token id lists (each is run from position 0, or right after ``past``).
        past: pre-RoPE KV of a prefix every sequence continues (computed once, e.g. a memory's frame);
            only the sequences' own positions are run and captured.
        kv: capture every layer's pre-RoPE keys and values.
        hidden_layers: layers whose *output* residual stream is returned (``Captured.hidden[l]``).
        input_layers: layers whose *input* residual stream is returned (``Captured.hidden[-l-1]``).
        pad_id: id used for right padding (never attended by real tokens: the model is causal).
        stop_after: end the pass after this layer (early exit: the layers above it and the LM head are not
            run); only with ``kv=False`` and hidden states of layers up to it.
        clone: return each sequence's tensors as copies of their own (False: views into the batch's
            tensors, for a caller that copies them anyway; saves two copies per layer and sequence).
    """
    geo = kv_geometry(model)
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("capture needs non-empty token sequences")
    lengths = [len(s) for s in sequences]
    T = max(lengths)
    device = _device(model)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), T), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, : len(s)] = 1
    layout = _key_layout(model, geo) if kv else ""
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    hidden: dict[int, torch.Tensor] = {}
    specs = []
    if kv:
        key_site = "k_norm" if geo.qk_norm else "k_proj"
        for layer in range(geo.num_layers):
            specs.append((key_site, layer, _store(keys, layer, lambda x: _to_bhtd(x, layout, geo))))
            specs.append(("v_proj", layer, _store(values, layer, lambda x: _to_bhtd(x, "bt(hd)", geo))))
    for layer in hidden_layers:
        specs.append(("residual_post", layer, _store(hidden, layer % geo.num_layers, _hidden_of)))
    for layer in input_layers:
        specs.append(("residual_pre", layer, _store_pre(hidden, -(layer % geo.num_layers) - 1)))
    if stop_after is not None:
        stop_after %= geo.num_layers
        if kv or any(l % geo.num_layers > stop_after for l in [*hidden_layers, *input_layers]):
            raise InputError("stop_after needs kv=False and no captured layer above it")
        if stop_after < geo.num_layers - 1:
            specs.append(("residual_post", stop_after, _stop))  # after the capture hooks of that layer
    # padding is on the right and the model is causal, so no attention mask is needed for real tokens;
    # passing none keeps the batched pass numerically identical to the same sequences run alone
    kwargs: dict = {"use_cache": False}
    if past is not None and past.length:
        from transformers import DynamicCache

        start, B = past.length, len(sequences)
        dtype = next(model.parameters()).dtype
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            for layer in range(geo.num_layers):
                k = past.keys[layer].to(device=device, dtype=dtype).unsqueeze(0)
                pos = torch.arange(start, device=device).unsqueeze(0)
                k = rotate_keys(model, k, pos, layer).expand(B, -1, -1, -1).contiguous()
                v = past.values[layer].to(device=device, dtype=dtype).unsqueeze(0).expand(B, -1, -1, -1).contiguous()
                cache.update(k, v, layer)
        positions = torch.arange(start, start + T, device=device).unsqueeze(0).expand(len(sequences), -1)
        kwargs = {"use_cache": True, "past_key_values": cache, "position_ids": positions}
    with torch.inference_mode(), hooks(model, specs):
        try:
            _text_model(model)(input_ids=ids, **kwargs)
        except _EarlyExit:
            pass
    out = []
    own = (lambda x: x.clone()) if clone else (lambda x: x)
    for i, n in enumerate(lengths):
        chunk = None
        if kv:
            chunk = ChunkKV([own(keys[l][i, :, :n]) for l in range(geo.num_layers)],
                            [own(values[l][i, :, :n]) for l in range(geo.num_layers)])
        out.append(Captured(chunk, {l: own(h[i, :n]) for l, h in hidden.items()}))
    return out


class _EarlyExit(Exception):
    """Raised by the stop hook of :func:`capture` once the last needed layer has run."""


def _stop(module, args, kwargs, output):
    raise _EarlyExit


def _hidden_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _store(into: dict, layer: int, transform):
    def fn(module, args, kwargs, output):
        into[layer] = transform(_hidden_of(output)).detach()

    return fn


def _store_pre(into: dict, key: int):
    def fn(module, args, kwargs):
        into[key] = (args[0] if args else kwargs["hidden_states"]).detach()

    return fn


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (the module owning the layer list), so no LM head is computed while capturing."""
    path, _ = decoder_layers(model)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return model.get_submodule(parent) if parent else model


# ---------------------------------------------------------------------------- rotation and cache
def _rotary(model: nn.Module):
    """(rotary module, accepts layer_type, apply_rotary_pos_emb of the architecture's modeling file)."""
    text = _text_model(model)
    rotary = getattr(text, "rotary_emb", None)
    if rotary is None:
        raise SiteResolutionError(
            f"{type(model).__name__} has no shared rotary embedding module (model.rotary_emb): activation "
            "memory needs a RoPE decoder (llama, mistral, qwen2, qwen3, gemma3 are supported)")
    _, layers = decoder_layers(model)
    attn = resolve_site(model, "attn", 0).module
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise SiteResolutionError(f"{type(attn).__module__} defines no apply_rotary_pos_emb")
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    return rotary, takes_type, apply


def _layer_types(model: nn.Module) -> list[str] | None:
    return getattr(model.config.get_text_config(decoder=True), "layer_types", None)


def rotate_keys(model: nn.Module, keys: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Apply the model's rotary encoding of ``layer`` to pre-RoPE keys (B, H, T, Dh) at ``positions`` (B, T)."""
    rotary, takes_type, apply = _rotary(model)
    types = _layer_types(model)
    if takes_type:
        cos, sin = rotary(keys, positions, types[layer] if types else None)
    else:
        cos, sin = rotary(keys, positions)
    return apply(keys, keys, cos, sin)[1]


def rotate_layers(model: nn.Module, keys: Sequence[torch.Tensor], positions: torch.Tensor) -> list[torch.Tensor]:
    """:func:`rotate_keys` for every layer's keys (H, T, Dh) at once, one rotary call per layer type (float32
    inside; returned in the keys' dtype). ``positions`` (T,); negative positions rotate back."""
    types = _layer_types(model) or []
    groups: dict[str | None, list[int]] = {}
    for layer in range(len(keys)):
        groups.setdefault(types[layer] if layer < len(types) else None, []).append(layer)
    out: list[torch.Tensor] = [torch.empty(0)] * len(keys)
    for layer_type, layers in groups.items():
        k = torch.stack([keys[n] for n in layers]).float()
        pos = positions.to(k.device).unsqueeze(0).expand(len(layers), -1)
        rotated = rotate_keys(model, k, pos, layers[0])
        for n, r in zip(layers, rotated):
            out[n] = r.to(keys[n].dtype)
    return out


def build_cache(model: nn.Module, segments: Sequence[ChunkKV], *, start: int = 0):
    """A DynamicCache holding the segments back to back, keys rotated for positions ``start..start+P-1``.

    Args:
        model: the model the segments were captured with.
        segments: pre-RoPE KV per segment, in prefix order (cast to the model's dtype here).
        start: position of the first segment token.

    Returns:
        ``transformers.DynamicCache`` of length P (fresh tensors; the segments are not modified).
    """
    from transformers import DynamicCache

    geo = kv_geometry(model)
    dtype, device = next(model.parameters()).dtype, _device(model)
    cache = DynamicCache(config=model.config)
    total = sum(s.length for s in segments)
    positions = torch.arange(start, start + total, device=device).unsqueeze(0)
    with torch.inference_mode():
        for layer in range(geo.num_layers):
            k = torch.cat([s.keys[layer].to(device=device, dtype=dtype) for s in segments], dim=1).unsqueeze(0)
            v = torch.cat([s.values[layer].to(device=device, dtype=dtype) for s in segments], dim=1).unsqueeze(0)
            cache.update(rotate_keys(model, k, positions, layer), v, layer)
    return cache


# ---------------------------------------------------------------------------- int8
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (head, token) over the head dimension: x ≈ q · scale. x: (H, T, Dh)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0  # (H, T, 1)
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


# ---------------------------------------------------------------------------- residual checkpoints
class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the checkpoint: returns its input unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for attr in ("attention_type", "layer_type"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def _skip_layers(model: nn.Module, below: int) -> Iterator[None]:
    """Swap layers ``0..below-1`` for pass-through stubs; the originals are put back in finally."""
    _, layers = decoder_layers(model)
    originals = [layers[i] for i in range(below)]
    try:
        for i in range(below):
            layers[i] = _PassThrough(originals[i])
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def recompute_kv(model: nn.Module, residual: torch.Tensor, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV of layers ``layer..L-1`` from the residual stream entering ``layer``.

    Args:
        residual: (T, D) input of ``layer`` for positions ``0..T-1`` (BOS included when the model has one).
        layer: the checkpoint layer c.

    Returns:
        ``[(keys, values)]`` for layers c..L-1, each (H, T, Dh), pre-RoPE.
    """
    geo = kv_geometry(model)
    dtype, device = next(model.parameters()).dtype, _device(model)
    residual = residual.to(device=device, dtype=dtype).unsqueeze(0)  # (1, T, D)
    T = residual.shape[1]
    layout = _key_layout(model, geo)
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    key_site = "k_norm" if geo.qk_norm else "k_proj"

    def swap_in(module, args, kwargs):
        if args:
            return (residual, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": residual}

    specs = [("residual_pre", layer, swap_in)]
    for i in range(layer, geo.num_layers):
        specs.append((key_site, i, _store(keys, i, lambda x: _to_bhtd(x, layout, geo))))
        specs.append(("v_proj", i, _store(values, i, lambda x: _to_bhtd(x, "bt(hd)", geo))))
    dummy = torch.zeros((1, T), dtype=torch.long, device=device)  # embeddings are replaced at `layer`
    with torch.inference_mode(), _skip_layers(model, layer), hooks(model, specs):
        _text_model(model)(input_ids=dummy, use_cache=False)
    return [(keys[i][0], values[i][0]) for i in range(layer, geo.num_layers)]
