"""Arms of the ``facts`` benchmark: ways of knowing a set of synthetic facts.

Each arm prepares once (train a memory, index the fact sentences) and is then asked questions, scored on
neutral text and on general QA through three small methods (:class:`FactArm`). The arms:

- ``none``: the bare model (the reference every drift is measured against).
- ``rag_bm25``: the top-``k`` fact sentences by BM25 pasted into the question (the model is unchanged).
- ``pkm`` / ``pkm_gated`` (:mod:`.arms_pkm`): a product-key memory trained on the facts, gate off / on.
- ``side_ffn`` (:mod:`.arms_side_ffn`) / ``lora`` (:mod:`.arms_lora`): the side-FFN memory and a LoRA baseline
  trained on the same facts with the same answer-only loop, stop rule and epoch cap as ``pkm``
  (:func:`train_learner`).

Every arm asks in the library's one prompt layout (:mod:`nativemem.prompting`, what ``LanguageModel.chat``
and ``nativemem ask`` use); RAG adds a ``Context:`` block as ``chat(context=)`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from ..prompting import DEFAULT_SYSTEM, user_content
from ..registry import Registry

__all__ = ["FactArm", "register_fact_arm", "get_fact_arm", "list_fact_arms", "FACTS_SYSTEM"]

FACTS_SYSTEM = DEFAULT_SYSTEM
"""System prompt of every facts-benchmark prompt (and of the pkm memory's training format)."""


class FactArm:
    """Base class of a facts-benchmark arm.

    Args:
        lm: the LanguageModel.
        shared: a dict shared by the arms of one run (lets ``pkm_gated`` reuse ``pkm``'s training).
        options: run options (``k``, ``memory_options``, ``gate_negatives``, ``gate_questions``, ``progress``).
    """

    name: ClassVar[str] = ""

    def __init__(self, lm, *, shared: dict[str, Any], options: dict[str, Any]):
        self.lm, self.shared, self.options = lm, shared, options

    def prepare(self, facts: Sequence[Any]) -> dict[str, Any]:
        """Learn or index the facts; returns cost figures (seconds, bytes, training details)."""
        return {}

    def memory(self):
        """The memory passed to ``lm`` calls (None: the bare model)."""
        return None

    @contextmanager
    def session(self) -> Iterator[None]:
        """Scope in which the arm is evaluated (LoRA keeps its adapters in the model only inside)."""
        yield

    def content(self, question: str) -> tuple[str, list[str]]:
        """The user message for a question, and the ids of any retrieved facts."""
        return user_content(question), []

    def bytes_stored(self) -> int:
        return 0

    def close(self) -> None:
        """Release what the arm holds (called once after its evaluation)."""


_ARMS: Registry[type[FactArm]] = Registry("facts arm")
A = TypeVar("A", bound=type[FactArm])


def register_fact_arm(name: str, *, replace: bool = False) -> Callable[[A], A]:
    """Class decorator registering a :class:`FactArm` under ``name``."""

    def deco(cls: A) -> A:
        cls.name = name
        _ARMS.register(name, cls, replace=replace)
        return cls

    return deco


def get_fact_arm(name: str) -> type[FactArm]:
    """The facts arm registered as ``name`` (UnknownNameError suggests the closest)."""
    return _ARMS.get(name)


def list_fact_arms() -> list[str]:
    return _ARMS.names()


@register_fact_arm("none")
class NoneArm(FactArm):
    """The bare model."""


@register_fact_arm("rag_bm25")
class RagBM25Arm(FactArm):
    """BM25 over the fact sentences; the top ``k`` go into the prompt."""

    def prepare(self, facts):
        from ..retrieval import BM25Retriever
        from .tasks import Chunk

        start = time.perf_counter()
        self.sentences = {f.id: f.sentence or f"{f.prompt} {f.answer}" for f in facts}
        self.retriever = BM25Retriever()
        self.retriever.index([Chunk(fid, text) for fid, text in self.sentences.items()])
        return {"train_s": time.perf_counter() - start, "train_s_per_fact": (time.perf_counter() - start) / len(facts)}

    def content(self, question):
        hits = self.retriever.search(question, int(self.options.get("k", 3)))
        return user_content(question, [self.sentences[cid] for cid, _ in hits]), [cid for cid, _ in hits]

    def bytes_stored(self) -> int:
        return int(self.retriever.nbytes)


# ---------------------------------------------------------------------- optional baselines (same training loop)
def train_learner(lm, facts, *, params, scope, lowest: int, options: dict[str, Any]) -> dict[str, Any]:
    """Train any hooked/adapted parameters on the facts with pkm's loop (answer-only loss, one fact per
    sequence, same stop rule and epoch cap), memory acting on every position (no prefix caching)."""
    import torch

    from ..memories.pkm.train import PrefixCache, cache_items, encode_fact, frozen, train_items

    from .arms_pkm import pkm_options

    cfg = pkm_options(options, len(facts))
    from ..memories.pkm.config import PKMConfig

    from ..memories.pkm.augment import phrasings
    from ..memories.pkm.facts import Fact

    pk = PKMConfig(**{k: v for k, v in cfg.items() if k in PKMConfig.__dataclass_fields__})
    items = []  # the same phrasings as the pkm arms train (pk.phrasings per fact)
    for i, f in enumerate(facts):
        for p in phrasings(f, pk.phrasings).items:
            it = encode_fact(lm, Fact(p.prompt, p.answer, f.id, p.chat), system=FACTS_SYSTEM, prefix=[],
                             train_prefix=True)
            it.index, it.fact, it.kind = len(items), i, p.kind
            items.append(it)
    start = time.perf_counter()
    cache_items(lm.model, items, lowest, pad_id=lm.eos_token_ids[0], dtype=torch.float32)
    opt = torch.optim.Adam(params, lr=float(options.get("baseline_lr", 1e-3)))
    for p in params:
        p.requires_grad_(True)
    autocast = torch.bfloat16 if pk.train_autocast == "bfloat16" and lm.dtype == torch.float32 else None
    with frozen(lm.model):
        for p in params:
            p.requires_grad_(True)
        result = train_items(lm.model, items, lowest, PrefixCache(lm.model), memory_scope=scope, optimizers=[opt],
                             params=params, batch_size=pk.batch_size, max_epochs=pk.max_epochs, margin=pk.margin,
                             autocast=autocast, recheck_every=pk.recheck_every, progress=options.get("progress_fn"))
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    train_s = time.perf_counter() - start
    own = torch.tensor([it.kind == "own prompt" for it in items])
    recall = float((result.margins[own] > 0).float().mean()) if result.margins is not None else 0.0
    return {"train_s": train_s, "train_s_per_fact": train_s / len(facts), "steps": result.steps,
            "epochs": result.epochs, "exposures_per_fact": result.exposures, "train_recall": recall,
            "phrasings": pk.phrasings, "trained_phrasings": len(items), "train_recall_phrasings": result.recall,
            "final_loss": result.final_loss, "stopped": result.stopped, "parameters": sum(p.numel() for p in params)}


# the families' arms, registered lazily: the facts task knows every name without importing them
for _name, _target in {"pkm": "arms_pkm:PKMArm", "pkm_gated": "arms_pkm:PKMGatedArm",
                       "side_ffn": "arms_side_ffn:SideFFNFactArm", "lora": "arms_lora:LoRAFactArm"}.items():
    _ARMS.register(_name, f"nativemem.bench.{_target}")
