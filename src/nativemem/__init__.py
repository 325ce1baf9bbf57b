"""nativemem: memory that lives in a language model's own representations.

Quick start::

    import nativemem as nm
    lm = nm.load_model()                       # SmolLM2-135M-Instruct, offline, CPU
    print(lm.chat("What is the capital of France?"))
"""

__version__ = "0.1.0"

from .errors import NativememError  # noqa: E402
from .fingerprint import Fingerprint  # noqa: E402
from .loading import load_model  # noqa: E402
from .memories import Memory, MemoryConfig, Receipt, memory_kinds, open_memory, register_memory  # noqa: E402
from .model import Generation, LanguageModel, Sampling  # noqa: E402

__all__ = [
    "__version__",
    "load_model",
    "LanguageModel",
    "Generation",
    "Sampling",
    "Fingerprint",
    "Memory",
    "MemoryConfig",
    "Receipt",
    "open_memory",
    "register_memory",
    "memory_kinds",
    "NativememError",
]
