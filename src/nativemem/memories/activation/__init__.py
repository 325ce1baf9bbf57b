"""Activation memory: chunks stored as the model's own KV, retrieved by the model's own states, injected as a
KV prefix (keys re-rotated for their new positions).

The method follows KV-Embedding (arXiv 2601.01046) as Neural Native Memory
(github.com/tobiasbrummer/neural-native-memory) uses it; :mod:`.memory` says what ``add``, ``search`` and
``active`` do. Modules: :mod:`.config`, :mod:`.kv` (capture, rotation, cache),
:mod:`.encode` (KV-Embedding, token vectors, whitening, TwoNN), :mod:`.fit`, :mod:`.store` (Qdrant Edge or
qdrant-client index, payload blobs, lock), :mod:`.catalog` (the log every chunk's text is kept in, which
``repair`` and ``reencode`` rebuild from).
"""

from ..base import register_memory
from .config import ActivationConfig
from .kv import ChunkKV, build_cache, capture, kv_geometry
from .memory import ActivationMemory, ChunkSkippedWarning, Turns, reencode_memory
from .store import BlobError

__all__ = ["ActivationConfig", "ActivationMemory", "ChunkSkippedWarning", "BlobError", "ChunkKV", "build_cache",
           "capture", "kv_geometry", "reencode_memory", "Turns"]

register_memory(ActivationMemory)
