"""Abstract hook sites and scoped hook registration."""

from .scope import HookScope, count_hooks, hooks, output_hidden, replace_output_hidden
from .sites import SITES, Site, decoder_layers, resolve_site

__all__ = ["SITES", "Site", "resolve_site", "decoder_layers", "HookScope", "hooks", "count_hooks",
           "output_hidden", "replace_output_hidden"]
