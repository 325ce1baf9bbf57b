"""Side-FFN memory (Locas-GLU): cloned GLU neurons beside each frozen MLP, refined by test-time training.

The method is Locas (arXiv 2602.05085); :mod:`.memory` says what ``add`` does.
"""

from ..base import register_memory
from .config import INIT_STRATEGIES, LOSSES, SideFFNConfig
from .fuse import fuse_model, unfuse_model
from .layer import SideFFNLayer, glu_sites
from .memory import SideFFNMemory, stream_options, token_stream
from .ttt import StreamOptions, StreamResult, WindowRecord, stream

__all__ = ["SideFFNConfig", "SideFFNMemory", "SideFFNLayer", "StreamOptions", "StreamResult",
           "WindowRecord", "stream", "glu_sites", "token_stream", "stream_options", "fuse_model", "unfuse_model", "INIT_STRATEGIES", "LOSSES"]

register_memory(SideFFNMemory)
