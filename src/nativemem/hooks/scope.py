"""Scoped hooks: registered inside a context manager, removed in ``finally``.

How this works: :func:`hooks` resolves *every* requested site first and raises if any does not
resolve, so a half-registered set never exists. It then registers the hooks, yields, and removes
exactly the handles it registered, also when the body raises. Scopes nest: an inner scope removes
only its own hooks, and the outer ones keep working.

Hook functions:

- ``"forward"`` sites: ``fn(module, args, kwargs, output) -> new output or None``
- ``"pre"`` sites: ``fn(module, args, kwargs) -> (args, kwargs) or None``

Decoder layers return a tensor in recent transformers and a tuple in older ones;
:func:`output_hidden` and :func:`replace_output_hidden` handle both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .sites import Site, resolve_site

__all__ = ["HookScope", "hooks", "count_hooks", "output_hidden", "replace_output_hidden"]

HookSpec = tuple[str, int | None, Callable]


def output_hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[0]


def replace_output_hidden(output, hidden: torch.Tensor):
    """The same kind of output with its hidden state replaced."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output[0] = hidden
    return output


def count_hooks(model: nn.Module) -> int:
    """Number of forward and forward-pre hooks registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class HookScope:
    """A group of hooks on one model that are removed together.

    Use :func:`hooks` for the common case; use the class when hooks are added step by step::

        with HookScope(model) as scope:
            scope.add("residual_post", 3, fn)
            model(x)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list = []
        self.sites: list[Site] = []

    def add(self, site: str, layer: int | None, fn: Callable) -> Site:
        """Resolve and register one hook; raises if the site does not resolve."""
        resolved = resolve_site(self.model, site, layer)
        self._register(resolved, fn)
        return resolved

    def add_many(self, specs: Iterable[HookSpec]) -> list[Site]:
        """Resolve all sites first, then register all hooks (all or nothing)."""
        specs = list(specs)
        resolved = [resolve_site(self.model, site, layer) for site, layer, _ in specs]
        for r, (_, _, fn) in zip(resolved, specs):
            self._register(r, fn)
        return resolved

    def _register(self, site: Site, fn: Callable) -> None:
        if site.hook == "pre":
            handle = site.module.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            handle = site.module.register_forward_hook(fn, with_kwargs=True)
        self._handles.append(handle)
        self.sites.append(site)

    def remove(self) -> None:
        """Remove every hook of this scope (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self.sites.clear()

    def __enter__(self) -> HookScope:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def hooks(model: nn.Module, specs: Iterable[HookSpec]) -> Iterator[HookScope]:
    """Register ``(site, layer, fn)`` hooks for the duration of the block.

    Raises:
        SiteResolutionError / UnknownNameError: before anything is registered, if any site fails.
    """
    scope = HookScope(model)
    try:
        scope.add_many(specs)
        yield scope
    finally:
        scope.remove()
