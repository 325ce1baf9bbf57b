"""QA arms for parametric memory and for truncated full context.

- ``full_context``: the item's whole source in document order, as much as fits: the oldest chunks are
  dropped until prompt + ``max_new_tokens`` fit the window (or ``max_prompt_tokens``); the number of
  chunks kept is recorded per item in :attr:`MemoryArmBase.last_info` (never silent).
- ``side_ffn``: one side-FFN memory per source document (a conversation, an article), trained by
  ``add`` on the document's chunks joined in order (memorize + test-time training); the question is
  asked with the memory of its own source and no passages.
- ``side_ffn_ctx``: the same memory, plus the ``full_context`` passages.
- ``lora`` / ``lora_ctx``: LoRA adapters (peft) per source document trained by the *same* streaming
  loop and budget (windows, context, steps) as ``side_ffn``; the adapters are injected for each
  answer and removed after it, so no other arm ever sees them.

Options are class attributes a caller may override on the instance before ``prepare``:
``max_prompt_tokens``, ``memory_config`` (SideFFNConfig fields) and ``lora_config`` (rank, alpha,
lr, target_modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .arms import Arm, ArmOutput, register_arm
from ..prompting import build_messages
from .tasks import Chunk, QAItem, Task

__all__ = ["FullContextArm", "SideFFNArm", "SideFFNContextArm", "LoRAArm", "LoRAContextArm", "fit_recent"]


def fit_recent(lm, question: str, chunks: Sequence[str], budget: int) -> tuple[list[str], int]:
    """The longest suffix of ``chunks`` whose prompt has at most ``budget`` tokens, and that prompt's size.

    Binary search over how many of the most recent chunks are kept (prompt size grows with them).
    """
    def size(n: int) -> int:
        return int(lm.chat_ids(build_messages(question, chunks[len(chunks) - n:] if n else [])).shape[-1])

    lo, hi = 0, len(chunks)
    if size(hi) <= budget:
        return list(chunks), size(hi)
    while lo < hi:  # largest n with size(n) <= budget
        mid = (lo + hi + 1) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return list(chunks[len(chunks) - lo:]) if lo else [], size(lo)


class MemoryArmBase(Arm):
    """Shared plumbing: per-item info, the full-context passages, documents of the pool."""

    max_prompt_tokens: ClassVar[int | None] = None
    uses_context: ClassVar[bool] = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.last_info: dict[str, Any] = {}

    def prompt_budget(self) -> int:
        limit = int(self.lm.max_context)
        if self.max_prompt_tokens:
            limit = min(limit, int(self.max_prompt_tokens))
        return limit - self.max_new_tokens

    def context_passages(self, item: QAItem) -> list[str]:
        """The item's source, most recent chunks kept; records what was kept in ``last_info``."""
        texts = [c.text for c in self.task.source_of(item)]
        kept, tokens = fit_recent(self.lm, item.question, texts, self.prompt_budget())
        self.last_info.update(context_chunks_kept=len(kept), context_chunks_total=len(texts),
                              context_truncated=len(kept) < len(texts), context_prompt_tokens=tokens)
        return kept

    @staticmethod
    def documents(pool: Sequence[Chunk]) -> dict[str, list[Chunk]]:
        """Pool chunks grouped by ``doc_id`` (pool order kept)."""
        docs: dict[str, list[Chunk]] = {}
        for chunk in pool:
            docs.setdefault(chunk.doc_id or chunk.id, []).append(chunk)
        return docs

    def doc_of(self, item: QAItem) -> str:
        source = self.task.source_of(item)
        if not source:
            raise ValueError(f"item {item.id} has no source chunks: a memory arm needs to know its document")
        return source[0].doc_id or source[0].id


@register_arm("full_context")
class FullContextArm(MemoryArmBase):
    """The item's whole source, oldest chunks dropped until it fits (truncation recorded)."""

    uses_context = True

    def answer(self, item: QAItem) -> ArmOutput:
        self.last_info = {}
        return self.generate_answer(item, self.context_passages(item))


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
