"""The LoRA family of benchmark arms (the baseline itself, :class:`~.lora.LoRABaseline`, is in :mod:`.lora`).

- ``lora``: on a task of documents, adapters per source document trained by the *same* streaming loop and
  budget (windows, context, steps) as ``side_ffn``; on the facts task, adapters on all linear layers
  trained on the facts with pkm's loop (:func:`.arms_pkm.train_learner`). The adapters are in the model
  only inside :meth:`~.arms.Arm.session` (each answer opens one), so no other arm ever sees them.
- ``lora_ctx``: the same adapters plus the full-context passages.

The ``lora`` option (rank, alpha, lr, target_modules, seed) configures the adapters; on documents the
``side_ffn`` option sets the windows, context and steps. The ``lora_state`` option (a folder of
:func:`~.lora.save_lora_state`, e.g. from PG-19's ``save_dir``) asks every item with those adapters instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import InputError
from .arms import ArmOutput, MemoryArmBase, register_arm
from .tasks import Chunk, QAItem, Task

__all__ = ["LoRAArm", "LoRAContextArm"]


@register_arm("lora")
class LoRAArm(MemoryArmBase):
    """LoRA per source document (the side-FFN streaming loop and budget), or on the task's facts."""

    def _lora(self):
        from .lora import LoRABaseline

        cfg = {"rank": 8, **(self.options.get("lora") or {}), **self._saved_shape}
        return LoRABaseline(self.lm, rank=int(cfg["rank"]), alpha=cfg.get("alpha"),
                            target_modules=cfg.get("target_modules", "all-linear"), seed=cfg.get("seed", 0))

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        from tqdm.auto import tqdm

        from ..memories.side_ffn import SideFFNConfig, stream_options, token_stream

        super().prepare(pool, lm, items=items, task=task)
        self.states: dict[str | None, dict] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        self.num_parameters = 0
        self._doc: str | None = None
        self._saved_shape: dict[str, Any] = {}
        if self.options.get("lora_state") is not None:
            from .lora import load_lora_state

            meta, self.states[None] = load_lora_state(lm, self.options["lora_state"])
            self._saved_shape = {"rank": meta["rank"], "alpha": meta["alpha"], "target_modules": meta["target_modules"],
                                 "seed": meta.get("seed", 0)}
            with self._lora() as lora:
                self.num_parameters = lora.num_parameters
            return
        facts = self.facts()
        if facts:
            from .arms_pkm import train_learner

            with self._lora() as lora:
                self.cost = train_learner(lm, facts, params=lora.trainable_parameters(), scope=contextlib.nullcontext,
                                          lowest=0, options=self.options, memory_options=self.memory_options)
                self.states[None], self.num_parameters = lora.snapshot(), lora.num_parameters
            return
        cfg = SideFFNConfig(**(self.options.get("side_ffn") or {}))  # the same windows, context, steps as side_ffn
        lr = (self.options.get("lora") or {}).get("lr", 1e-3)
        docs = self.documents(pool)
        if not docs:
            raise InputError(f"the {self.name} arm learns the task's documents or facts, and this run has none "
                             "(or pass the lora_state option)")
        for doc, chunks in tqdm(docs.items(), desc=f"{self.name}: training", disable=not self.progress):
            ids = token_stream(lm, "\n\n".join(c.text for c in chunks))
            opts = stream_options(cfg, n_targets=len(ids) - 1, max_context=lm.max_context, lr=lr)
            with self._lora() as lora:
                result = lora.train_stream(ids, opts)
                self.states[doc], self.num_parameters = lora.snapshot(), lora.num_parameters
            self.receipts[doc] = {"steps": result.steps, "tokens": result.tokens, "stopped": result.stopped,
                                  "final_loss": result.final_loss}

    @property
    def extra_params(self) -> int:
        return self.num_parameters

    @contextlib.contextmanager
    def open_memory(self) -> Iterator[None]:
        with self._lora() as lora:
            lora.restore(self.states[self._doc])
            yield

    def scoring(self, item: QAItem) -> contextlib.AbstractContextManager:
        self._doc = None if None in self.states else self.doc_of(item)
        return super().scoring(item)

    def answer(self, item: QAItem) -> ArmOutput:
        self.last_info = {}
        passages = self.context_passages(item) if self.uses_context else []
        with self.scoring(item):
            return self.generate_answer(item, passages)

    def bytes_stored(self) -> int:
        return 4 * self.num_parameters * len(self.states)


@register_arm("lora_ctx")
class LoRAContextArm(LoRAArm):
    """The LoRA adapters plus the full-context passages."""

    uses_context = True
