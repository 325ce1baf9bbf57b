"""Errors raised by nativemem.

Every error a user can cause (bad text, a missing file, a memory built for another model, an unknown
name) is a subclass of :class:`NativememError` with one clear message, so the CLI can print it and
exit non-zero instead of showing a traceback from deep inside a library.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "NativememError",
    "InputError",
    "DataError",
    "UnknownNameError",
    "ModelLoadError",
    "FingerprintMismatchError",
    "ContextOverflowError",
    "SiteResolutionError",
    "MemoryFormatError",
    "MemoryLockedError",
    "StoreUnavailableError",
    "UnsupportedError",
]


class NativememError(Exception):
    """Base class of every error nativemem raises on purpose."""


class InputError(NativememError, ValueError):
    """Text or arguments a user passed are unusable (empty, binary, too long, out of range)."""


class UnsupportedError(InputError, NotImplementedError):
    """An operation that this memory kind cannot do (the message names the kind and the operation)."""


class DataError(NativememError):
    """A data file is missing or does not have the expected format."""


class ModelLoadError(NativememError):
    """A model could not be found or read."""


class MemoryFormatError(NativememError):
    """A memory folder is missing files, corrupted, or of an unknown format version."""


class MemoryLockedError(NativememError):
    """A memory folder is already open for writing in another process (embedded stores allow one)."""


class StoreUnavailableError(NativememError):
    """A store the memory lives in (a Redis server shared by replicas) cannot be reached; retrying may help."""


class ContextOverflowError(NativememError):
    """A prompt does not fit the model's context window (it is never cut silently)."""

    def __init__(self, tokens: int, limit: int, what: str = "prompt"):
        self.tokens = tokens
        self.limit = limit
        super().__init__(f"{what} needs {tokens} tokens but the model's window is {limit} tokens")


class SiteResolutionError(NativememError):
    """One or more requested hook sites did not resolve to a module of the model."""


class UnknownNameError(NativememError, KeyError):
    """A task, arm, memory kind or site name is not registered; the message suggests the closest."""

    def __init__(self, name: str, what: str, choices: Iterable[str]):
        self.name = name
        self.what = what
        self.choices = sorted(choices)
        close = difflib.get_close_matches(str(name), self.choices, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(self.choices) if self.choices else "none"
        super().__init__(f"unknown {what} {name!r}.{hint} Known: {known}.")

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.args[0]


class FingerprintMismatchError(NativememError):
    """A memory (or other artifact) was built for a different model than the one given."""

    def __init__(self, field: str, expected, actual, what: str = "memory"):
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"this {what} was built for another model: fingerprint field {field!r} is {expected!r} "
            f"in the {what} but {actual!r} for the loaded model"
        )
