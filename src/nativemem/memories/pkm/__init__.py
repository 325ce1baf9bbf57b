"""Product-key memory (``pkm``): trainable product-key memory layers added to frozen MLP outputs.

Facts go in with ``add`` (answer-only loss, one fact per sequence, a row-sparse optimiser on a value pool
shared by the memory layers); a learned per-token relevance gate keeps general text untouched. The method is
Memory Layers at Scale (arXiv 2412.09764); :mod:`.memory` says what each operation does.

Example::

    import nativemem as nm
    from nativemem.memories.pkm import generate_facts, load_facts

    lm = nm.load_model()
    mem = nm.open_memory("facts.mem", lm, kind="pkm")
    receipt = mem.add(load_facts("facts.jsonl"))          # or [{"prompt": ..., "answer": ...}, ...]
    mem.gate = True                                       # the relevance gate (trained by add)
    print(lm.chat("In which city was Stefurk Lerkqueildork born?", memory=mem))
    mem.save()
"""

from ..base import register_memory
from .config import PKMConfig, resolve_layers
from .facts import RELATIONS, Fact, generate_facts, load_facts, parse_facts, save_facts
from .gate import RelevanceGate
from .layer import PKMLayer, product_key_topk, read_values
from .memory import PKMMemory

__all__ = ["PKMConfig", "PKMMemory", "PKMLayer", "RelevanceGate", "Fact", "RELATIONS", "parse_facts", "load_facts",
           "save_facts", "generate_facts", "product_key_topk", "read_values", "resolve_layers"]

register_memory(PKMMemory)
