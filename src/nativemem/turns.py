"""Taking turns on a shared model: long model work (training a memory, consolidation) marks each of its model
steps with :func:`model_step`, and whoever shares the model (the server, between its users' requests) hands it
over between steps by running the work inside :func:`taking_turns`.

A step is one forward (or one forward, backward and optimiser step) with everything it registers on the model
(hooks, replaced layers) registered and removed inside it, so another request that runs between two steps sees
the bare model. Outside :func:`taking_turns`, :func:`model_step` does nothing. Steps nest: a step inside a step
is part of it (the turn is taken once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

__all__ = ["model_step", "taking_turns"]

_turn: ContextVar[Callable[[], AbstractContextManager] | None] = ContextVar("nativemem_turn", default=None)
_inside: ContextVar[bool] = ContextVar("nativemem_inside_step", default=False)


@contextmanager
def taking_turns(turn: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Run the block's model steps each inside ``turn()`` (e.g. a context manager that takes a model lock and may
    raise to abandon the work: a timeout, a cancelled job)."""
    token = _turn.set(turn)
    try:
        yield
    finally:
        _turn.reset(token)


@contextmanager
def model_step() -> Iterator[None]:
    """One step of model work: inside :func:`taking_turns` it holds the turn; elsewhere it does nothing."""
    turn = _turn.get()
    if turn is None or _inside.get():
        yield
        return
    with turn():
        token = _inside.set(True)
        try:
            yield
        finally:
            _inside.reset(token)
