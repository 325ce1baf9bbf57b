"""The LoRA family of benchmark arms (the baseline itself, :class:`~.lora.LoRABaseline`, is in :mod:`.lora`).

- ``lora`` / ``lora_ctx`` (QA tasks): adapters per source document trained by the *same* streaming loop and
  budget (windows, context, steps) as ``side_ffn``; injected for each answer and removed after it, so no
  other arm ever sees them. ``lora_config`` (rank, alpha, lr, target_modules) is a class attribute.
- facts ``lora``: adapters on all linear layers trained on the facts with pkm's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

from .arms import ArmOutput, MemoryArmBase, register_arm
from .arms_facts import FactArm, register_fact_arm, train_learner
from .tasks import Chunk, QAItem, Task

__all__ = ["LoRAArm", "LoRAContextArm", "LoRAFactArm"]


@register_arm("lora")
class LoRAArm(MemoryArmBase):
    """LoRA per source document, trained by the side-FFN streaming loop with the same budget."""

    memory_config: ClassVar[dict[str, Any]] = {}
    lora_config: ClassVar[dict[str, Any]] = {"rank": 8, "lr": 1e-3}

    def _lora(self):
        from .lora import LoRABaseline

        cfg = {"rank": 8, **self.lora_config}
        return LoRABaseline(self.lm, rank=cfg["rank"], alpha=cfg.get("alpha"),
                            target_modules=cfg.get("target_modules", "all-linear"), seed=cfg.get("seed", 0))

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        from tqdm.auto import tqdm

        from ..memories.side_ffn import SideFFNConfig, stream_options, token_stream

        super().prepare(pool, lm, items=items, task=task)
        cfg = SideFFNConfig(**self.memory_config)  # the same windows, context, steps as side_ffn
        self.states: dict[str, dict] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        self.num_parameters = 0
        for doc, chunks in tqdm(self.documents(pool).items(), desc=f"{self.name}: training", disable=not self.progress):
            ids = token_stream(lm, "\n\n".join(c.text for c in chunks))
            opts = stream_options(cfg, n_targets=len(ids) - 1, max_context=lm.max_context,
                                  lr=self.lora_config.get("lr", 1e-3))
            with self._lora() as lora:
                result = lora.train_stream(ids, opts)
                self.states[doc] = lora.snapshot()
                self.num_parameters = lora.num_parameters
            self.receipts[doc] = {"steps": result.steps, "tokens": result.tokens, "stopped": result.stopped,
                                  "final_loss": result.final_loss}

    @property
    def extra_params(self) -> int:
        return self.num_parameters

    def answer(self, item: QAItem) -> ArmOutput:
        self.last_info = {}
        passages = self.context_passages(item) if self.uses_context else []
        with self._lora() as lora:
            lora.restore(self.states[self.doc_of(item)])
            return self.generate_answer(item, passages)

    def bytes_stored(self) -> int:
        return 4 * self.num_parameters * len(self.states)


@register_arm("lora_ctx")
class LoRAContextArm(LoRAArm):
    """The LoRA adapters plus the full-context passages."""

    uses_context = True


@register_fact_arm("lora")
class LoRAFactArm(FactArm):
    """LoRA (peft, all linear layers) trained on the facts with pkm's loop."""

    def prepare(self, facts):
        from .lora import LoRABaseline

        self.lora = LoRABaseline(self.lm, rank=int(self.options.get("lora_rank", 8)))
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.lora)
        try:
            return train_learner(self.lm, facts, params=self.lora.trainable_parameters(),
                                 scope=contextlib.nullcontext, lowest=0, options=self.options)
        except BaseException:
            self.close()
            raise

    def bytes_stored(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.lora.trainable_parameters()))

    def close(self) -> None:
        stack, self._stack = getattr(self, "_stack", None), None
        if stack is not None:
            stack.close()
