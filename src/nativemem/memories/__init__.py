"""Memory kinds. Each kind is a subpackage that ends with one ``register_memory`` call."""

from .base import (
    Hit,
    Injection,
    Memory,
    MemoryConfig,
    Receipt,
    get_memory_class,
    memory_kinds,
    open_memory,
    register_memory,
)

__all__ = ["Memory", "MemoryConfig", "Receipt", "Hit", "Injection", "register_memory", "memory_kinds",
           "get_memory_class", "open_memory"]
from . import side_ffn  # noqa: E402,F401  (registers the side_ffn kind)
from . import activation  # noqa: E402,F401  (registers the activation kind)
from . import pkm  # noqa: E402,F401  (registers the pkm kind)
