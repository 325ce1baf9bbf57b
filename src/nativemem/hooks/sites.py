"""Abstract hook sites, resolved per architecture.

A site is a name such as ``"mlp"`` or ``"residual_post"`` plus a layer index. A small table per
``model_type`` maps site names to module paths (``{layers}`` is the decoder-layer list); unknown
architectures fall back to the first ``nn.ModuleList`` whose length equals ``num_hidden_layers``
and common child names. Every resolution failure raises :class:`SiteResolutionError`.

Sites and where the hook sits:

=================  ======================================  ==========
site               module                                  hook
=================  ======================================  ==========
``embed``          token embedding                         forward
``layer``          decoder layer i                         forward
``residual_pre``   decoder layer i (its input)             pre
``residual_post``  decoder layer i (its output)            forward
``attn``           attention block of layer i              forward
``mlp``            MLP of layer i                          forward
``q_proj`` ...     projections inside attention / MLP      forward
``final_norm``     the final norm before the LM head       forward
=================  ======================================  ==========
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SiteResolutionError, UnknownNameError

__all__ = ["SITES", "Site", "resolve_site", "decoder_layers", "ARCHITECTURES"]

_DECODER = {
    "layers": "model.layers",
    "embed": "model.embed_tokens",
    "final_norm": "model.norm",
    "attn": "self_attn",
    "mlp": "mlp",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}

# model_type -> path table; the Llama-style layout covers most current decoders
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma3_text": _DECODER,
    "gemma3": {**_DECODER, "layers": "model.language_model.layers", "embed": "model.language_model.embed_tokens",
               "final_norm": "model.language_model.norm"},
}

# site name -> (path key, hook type, needs a layer index)
SITES: dict[str, tuple[str, str, bool]] = {
    "embed": ("embed", "forward", False),
    "final_norm": ("final_norm", "forward", False),
    "layer": ("", "forward", True),
    "residual_pre": ("", "pre", True),
    "residual_post": ("", "forward", True),
    **{k: (k, "forward", True) for k in
       ("attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj", "down_proj")},
}

_FALLBACK_CHILDREN = {
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
    "embed": ("embed_tokens", "wte", "word_embeddings", "embed_in"),
    "final_norm": ("norm", "ln_f", "final_layernorm", "final_layer_norm"),
}


@dataclass(frozen=True)
class Site:
    """A resolved site: the module, its dotted name, and the kind of hook to register."""

    name: str
    layer: int | None
    module: nn.Module
    path: str
    hook: str  # "forward" or "pre"


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _table(model: nn.Module) -> dict[str, str] | None:
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list of a causal LM and its dotted path."""
    table = _table(model)
    if table is not None:
        layers = _get(model, table["layers"])
        if isinstance(layers, nn.ModuleList):
            return table["layers"], layers
    n = getattr(model.config, "num_hidden_layers", None)
    n = n if n is not None else getattr(getattr(model.config, "text_config", None), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return path, module
    raise SiteResolutionError(f"cannot find the decoder layers of {type(model).__name__}")


def resolve_site(model: nn.Module, site: str, layer: int | None = None) -> Site:
    """Resolve an abstract site (and layer index) to a module.

    Raises:
        UnknownNameError: ``site`` is not a known site name.
        SiteResolutionError: the site does not exist in this model (or the layer is out of range).
    """
    if site not in SITES:
        raise UnknownNameError(site, "hook site", SITES)
    key, hook, needs_layer = SITES[site]
    table = _table(model)
    if not needs_layer:
        if layer is not None:
            raise SiteResolutionError(f"site {site!r} takes no layer index (got {layer})")
        if table:
            paths = [table[key]]
        else:  # generic: look beside the decoder-layer list
            layers_path = decoder_layers(model)[0]
            base = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
            paths = [f"{base}.{c}" if base else c for c in _FALLBACK_CHILDREN[key]]
        for path in paths:
            module = _get(model, path)
            if module is not None:
                return Site(site, None, module, path, hook)
        raise SiteResolutionError(f"site {site!r} not found in {type(model).__name__} (tried {paths})")
    layers_path, layers = decoder_layers(model)
    if layer is None:
        raise SiteResolutionError(f"site {site!r} needs a layer index")
    if not -len(layers) <= layer < len(layers):
        raise SiteResolutionError(f"layer {layer} is out of range: the model has {len(layers)} layers")
    layer = layer % len(layers)
    block = layers[layer]
    if not key:
        return Site(site, layer, block, f"{layers_path}.{layer}", hook)
    candidates = [table[key]] if table else []
    if not table:
        base = "attn" if key in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "attn") else "mlp"
        children = _FALLBACK_CHILDREN[base]
        candidates = list(children) if key in ("attn", "mlp") else [f"{c}.{key}" for c in children]
    for path in candidates:
        module = _get(block, path)
        if module is not None:
            return Site(site, layer, module, f"{layers_path}.{layer}.{path}", hook)
    raise SiteResolutionError(
        f"site {site!r} not found in layer {layer} of {type(model).__name__} (tried {candidates})")
