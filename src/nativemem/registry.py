"""A small generic registry with lazy ``"module:attr"`` targets and did-you-mean errors."""

from __future__ import annotations

import importlib
import threading
from typing import Generic, TypeVar

from .errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (or lazy ``"package.module:attr"`` string, imported on first use).

    Args:
        what: how the registered things are called in error messages ("memory kind", "task", ...).
    """

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T | str] = {}
        self._lock = threading.Lock()

    def register(self, name: str, obj: T | str, *, replace: bool = False) -> None:
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"{self.what} name must be lowercase snake_case, got {name!r}")
        with self._lock:
            old = self._items.get(name)
            lazy_resolved = isinstance(old, str) and not isinstance(obj, str)  # the module a lazy target names
            if name in self._items and not replace and old is not obj and not lazy_resolved:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj

    def decorator(self, name: str, *, replace: bool = False):
        """Class decorator: register the class under ``name`` and set its ``name`` attribute."""

        def deco(cls):
            self.register(name, cls, replace=replace)
            cls.name = name
            return cls

        return deco

    def unregister(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            obj = self._items[name]
        except KeyError:
            raise UnknownNameError(name, self.what, self._items) from None
        if isinstance(obj, str):  # lazy target
            module, _, attr = obj.partition(":")
            loaded = getattr(importlib.import_module(module), attr)
            with self._lock:
                self._items[name] = loaded
            obj = loaded
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self.names())
