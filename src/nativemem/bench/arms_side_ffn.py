"""The side-FFN family of benchmark arms (PG-19 streams its books into memories of its own).

- ``side_ffn``: on a task of documents, one memory per source document (a conversation, an article),
  trained by ``add`` on the document's chunks joined in order (memorize + test-time training); the question
  is asked with the memory of its own source and no passages. On the facts task, one memory of neurons
  cloned from the fact sentences, trained with pkm's loop (:func:`.arms_pkm.train_learner`).
- ``side_ffn_ctx``: the same memory plus the ``full_context`` passages.

The ``side_ffn`` option (SideFFNConfig fields) configures the memory; the ``side_ffn_memory`` option (a saved
memory's folder, e.g. one PG-19 wrote with ``save_dir``) asks every item with that memory instead of training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from .arms import ArmOutput, MemoryArmBase, register_arm
from .tasks import Chunk, QAItem, Task

__all__ = ["SideFFNArm", "SideFFNContextArm"]


@register_arm("side_ffn")
class SideFFNArm(MemoryArmBase):
    """A side-FFN memory per source document (or one of the task's facts), asked without passages."""

    def _new_memory(self, lm):
        from ..memories.side_ffn import SideFFNConfig, SideFFNMemory

        return SideFFNMemory(lm, SideFFNConfig(**(self.options.get("side_ffn") or {})))

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        from tqdm.auto import tqdm

        super().prepare(pool, lm, items=items, task=task)
        self.memories: dict[str | None, Any] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        saved = self.options.get("side_ffn_memory")
        if saved is not None:
            from ..memories import open_memory

            mem = self.memories[None] = open_memory(saved, lm)
            self.receipts[str(saved)] = {"steps": mem.stats()["steps"], "tokens": mem.stats()["tokens_trained"]}
            return
        facts = self.facts()
        if facts:
            from .arms_pkm import train_learner

            mem = self.memories[None] = self._new_memory(lm)
            mem.memorize(" ".join(f.sentence or f"{f.prompt} {f.answer}" for f in facts))
            self.cost = train_learner(lm, facts, params=mem.trainable_parameters(),
                                      scope=lambda: mem.active(lm=lm), lowest=min(mem.layers),
                                      options=self.options, memory_options=self.memory_options)
            return
        docs = self.documents(pool)
        if not docs:
            raise InputError(f"the {self.name} arm learns the task's documents or facts, and this run has none "
                             "(or pass the side_ffn_memory option)")
        for doc, chunks in tqdm(docs.items(), desc=f"{self.name}: training", disable=not self.progress):
            mem = self._new_memory(lm)
            receipt = mem.add("\n\n".join(c.text for c in chunks))
            self.memories[doc] = mem
            self.receipts[doc] = {"steps": receipt.steps, "tokens": receipt.tokens, "notes": receipt.notes,
                                  "final_loss": receipt.final_loss}

    @property
    def extra_params(self) -> int:
        """Parameters of one document's memory."""
        return max((m.num_parameters for m in self.memories.values()), default=0)

    def memory(self):
        return self.memories.get(None)

    def _memory_of(self, item: QAItem):
        return self.memories[None] if None in self.memories else self.memories[self.doc_of(item)]

    def scoring(self, item: QAItem) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self._memory_of(item))

    def answer(self, item: QAItem) -> ArmOutput:
        self.last_info = {}
        passages = self.context_passages(item) if self.uses_context else []
        return self.generate_answer(item, passages, memory=self._memory_of(item))

    def bytes_stored(self) -> int:
        return sum(4 * m.num_parameters for m in self.memories.values())


@register_arm("side_ffn_ctx")
class SideFFNContextArm(SideFFNArm):
    """The side-FFN memory plus the full-context passages."""

    uses_context = True
