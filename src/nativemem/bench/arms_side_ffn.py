"""The side-FFN family of benchmark arms: a side-FFN memory per source document (QA tasks) and one trained on
the facts (the facts task). PG-19 and MMLU stream a book into it through :mod:`.streaming`.

- ``side_ffn``: one memory per source document (a conversation, an article), trained by ``add`` on the
  document's chunks joined in order (memorize + test-time training); the question is asked with the memory
  of its own source and no passages. ``side_ffn_ctx``: the same memory plus the ``full_context`` passages.
  ``memory_config`` (SideFFNConfig fields) is a class attribute a caller may override before ``prepare``.
- facts ``side_ffn``: neurons cloned from the fact sentences, trained with pkm's loop (:func:`.arms_facts.train_learner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .arms import ArmOutput, MemoryArmBase, register_arm
from .arms_facts import FactArm, register_fact_arm, train_learner
from .tasks import Chunk, QAItem, Task

__all__ = ["SideFFNArm", "SideFFNContextArm", "SideFFNFactArm"]


@register_arm("side_ffn")
class SideFFNArm(MemoryArmBase):
    """A side-FFN memory per source document, asked without passages."""

    memory_config: ClassVar[dict[str, Any]] = {}

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        from tqdm.auto import tqdm

        from ..memories.side_ffn import SideFFNConfig, SideFFNMemory

        super().prepare(pool, lm, items=items, task=task)
        self.memories: dict[str, SideFFNMemory] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        for doc, chunks in tqdm(self.documents(pool).items(), desc=f"{self.name}: training", disable=not self.progress):
            mem = SideFFNMemory(lm, SideFFNConfig(**self.memory_config))
            receipt = mem.add("\n\n".join(c.text for c in chunks))
            self.memories[doc] = mem
            self.receipts[doc] = {"steps": receipt.steps, "tokens": receipt.tokens, "notes": receipt.notes,
                                  "final_loss": receipt.final_loss}

    @property
    def extra_params(self) -> int:
        """Parameters of one document's memory."""
        return max((m.num_parameters for m in self.memories.values()), default=0)

    def answer(self, item: QAItem) -> ArmOutput:
        self.last_info = {}
        passages = self.context_passages(item) if self.uses_context else []
        return self.generate_answer(item, passages, memory=self.memories[self.doc_of(item)])

    def bytes_stored(self) -> int:
        return sum(4 * m.num_parameters for m in self.memories.values())


@register_arm("side_ffn_ctx")
class SideFFNContextArm(SideFFNArm):
    """The side-FFN memory plus the full-context passages."""

    uses_context = True


@register_fact_arm("side_ffn")
class SideFFNFactArm(FactArm):
    """Side-FFN memory (cloned neurons from the fact sentences), trained with pkm's loop."""

    def prepare(self, facts):
        from ..memories.side_ffn import SideFFNConfig, SideFFNMemory

        self.mem = SideFFNMemory(self.lm, SideFFNConfig(**(self.options.get("side_ffn_options") or {})))
        self.mem.memorize(" ".join(f.sentence or f"{f.prompt} {f.answer}" for f in facts))
        params = self.mem.trainable_parameters()
        return train_learner(self.lm, facts, params=params, scope=lambda: self.mem.active(lm=self.lm),
                             lowest=min(self.mem.layers), options=self.options)

    def memory(self):
        return self.mem

    def bytes_stored(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.mem.state_dict().values()))

