"""Benchmark arms of the QA tasks (ways of answering a question), their registry, and the text family.

An arm is a model plus an optional memory. :meth:`Arm.prepare` is called once per run with the task's
chunk pool and the model (build an index, write a memory, train on the task's facts, ...); then
:meth:`Arm.answer` generates the answer to one item, and tasks that score log-likelihood (the facts task's
perplexity and MMLU letters) call the model with :meth:`Arm.memory` inside :meth:`Arm.session`. Every
task uses the same arms from one registry. One module per family: this one (text in the prompt),
:mod:`.arms_activation`, :mod:`.arms_side_ffn`, :mod:`.arms_lora`, :mod:`.arms_pkm`. The text arms differ
only in which passages go into the shared prompt (:mod:`nativemem.prompting`):

- ``none``: the question alone (closed book).
- ``rag_bm25``: the top-``k`` pool chunks by BM25 (bm25s); with the ``min_score`` option, only those scoring at
  least that (the relevance benchmark's ``rag_bm25_gated``).
- ``rag_dense``: the top-``k`` pool chunks by cosine similarity of all-MiniLM-L6-v2 embeddings.
- ``long_context``: the item's whole source in document order (for SQuAD, all paragraphs of the
  question's own article), only where it fits the model's window.
- ``full_context``: the item's whole source, oldest chunks dropped until it fits (the truncation is recorded).

A prompt that does not fit (prompt tokens + ``max_new_tokens`` > ``lm.max_context``) is never cut:
:meth:`Arm.generate_answer` returns a skipped :class:`ArmOutput` with the reason instead.

Adding an arm in another module::

    @register_arm("my_arm")
    class MyArm(Arm):
        def prepare(self, pool, lm, *, items, task): ...
        def answer(self, item): return self.generate_answer(item, passages=[...])
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ContextOverflowError
from ..registry import Registry
from ..prompting import build_messages, postprocess_answer
from ..retrieval import BM25Retriever, DenseRetriever, Retriever
from .tasks import Chunk, QAItem, Task

__all__ = [
    "ArmOutput",
    "Arm",
    "RetrievalArm",
    "register_arm",
    "get_arm",
    "list_arms",
    "SKIP_CONTEXT_OVERFLOW",
]

SKIP_CONTEXT_OVERFLOW = "context_overflow"
"""Skip reason: the prompt plus ``max_new_tokens`` does not fit the model's window."""


@dataclass(frozen=True)
class ArmOutput:
    """What an arm produced for one item.

    Attributes:
        text: Post-processed answer (what is scored).
        raw_text: The model's raw generation.
        ttft_s: Time to first token in seconds (None if skipped).
        total_s: Generation time in seconds (None if skipped).
        prompt_tokens: Tokens prefilled (also set for skipped items when known).
        new_tokens: Tokens generated.
        prefix_tokens: Tokens a memory supplied as a KV prefix (0 for the built-in arms).
        retrieved: ``(chunk_id, score)`` pairs, best first (retrieval arms only).
        skip_reason: Short reason key (e.g. ``"context_overflow"``) if the item was not answered.
        skip_detail: Human-readable explanation of the skip.
        search_s: Retrieval time in seconds (retrieval arms; outside ``ttft_s``, which starts at generation).
        scores: Metrics measured while answering, added to the item's scores (e.g. the log-probability of the
            right option on a task that scores log-likelihoods).
    """

    text: str = ""
    raw_text: str = ""
    ttft_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefix_tokens: int = 0
    retrieved: tuple[tuple[str, float], ...] = ()
    skip_reason: str | None = None
    skip_detail: str | None = None
    search_s: float | None = None
    scores: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        """Whether the item was not answered."""
        return self.skip_reason is not None


class Arm:
    """Base class of an arm.

    Args:
        k: Passages retrieved per question (retrieval arms).
        max_new_tokens: Generation cap.
        progress: Show progress bars while preparing.
        memory_options: Overrides of the memory config for arms that build a memory (e.g. ``kv_dtype``).
        options: What a family's arms read besides: ``max_prompt_tokens`` (context arms), ``side_ffn``
            (SideFFNConfig fields), ``lora`` (rank, alpha, lr, target_modules), ``baseline_lr`` (side_ffn and lora
            trained on facts), ``gate_negatives`` / ``gate_questions`` (pkm_gated), ``progress_fn`` (called with
            epoch, items trained, loss), ``shared`` (a dict the arms of one run share, e.g. one pkm training).
    """

    name: ClassVar[str] = ""
    uses_retrieval: ClassVar[bool] = False
    """Whether the arm retrieves from the pool (then ``hit@k``/``ndcg@k`` are scored)."""
    needs_facts: ClassVar[bool] = False
    """Whether the arm learns facts only (then it runs on the facts task, not on a task of documents)."""

    def __init__(self, *, k: int = 3, max_new_tokens: int = 32, progress: bool = False,
                 memory_options: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> None:
        self.k = k
        self.memory_options = dict(memory_options or {})
        self.options = dict(options or {})
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.lm: Any = None
        self.task: Task | None = None
        self.cost: dict[str, Any] = {}
        """What preparing cost and did (seconds, steps, ...), set by arms that learn."""
        self._open = False

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        """Called once per run before any :meth:`answer`.

        Args:
            pool: The chunks this run's questions are asked against.
            lm: The ``LanguageModel``.
            items: The selected items (an arm must not peek at their answers).
            task: The task (e.g. for :meth:`Task.source_of`).
        """
        self.lm = lm
        self.task = task

    def answer(self, item: QAItem) -> ArmOutput:
        """Answer one item (default: the question alone)."""
        return self.generate_answer(item)

    def bytes_stored(self) -> int:
        """Bytes of whatever the arm stored for the run (index, memory); 0 if none."""
        return 0

    def memory(self) -> Any:
        """The memory passed to ``lm`` calls outside :meth:`answer` (None: the bare model)."""
        return None

    @contextlib.contextmanager
    def scoring(self, item: QAItem) -> Iterator[Any]:
        """The arm's model as it would answer ``item``, for tasks that score log-likelihoods instead of generating:
        yields the memory to pass to ``lm`` calls (None: none); adapters are in the model inside."""
        with self.session():
            yield self.memory()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Scope in which the model carries the arm's memory (adapters in, gate set); re-entrant."""
        if self._open:
            yield
            return
        with self.open_memory():
            self._open = True
            try:
                yield
            finally:
                self._open = False

    def open_memory(self) -> contextlib.AbstractContextManager:
        """What :meth:`session` enters (families override)."""
        return contextlib.nullcontext()

    def facts(self) -> Sequence[Any] | None:
        """The facts of the run's task (the facts task), or None for a task of documents."""
        return getattr(self.task, "facts", None)

    def generate_answer(
        self,
        item: QAItem,
        passages: Sequence[str] = (),
        retrieved: tuple[tuple[str, float], ...] = (),
        **generate_kwargs: Any,
    ) -> ArmOutput:
        """Build the shared prompt, check that it fits, generate greedily and post-process.

        Args:
            item: The item.
            passages: Context passages for the prompt.
            retrieved: Retrieval results to record.
            **generate_kwargs: Passed on to ``lm.generate`` (e.g. ``memory=`` for memory arms).

        Returns:
            The answer, or a skipped output when the prompt does not fit the window.
        """
        messages = build_messages(item.question, passages)
        limit = int(self.lm.max_context)
        try:
            ids = self.lm.chat_ids(messages)
        except ContextOverflowError as e:
            return self._overflow(e.tokens, limit, retrieved)
        n_prompt = int(ids.shape[-1])
        if n_prompt + self.max_new_tokens > limit:
            return self._overflow(n_prompt, limit, retrieved)
        try:
            gen = self.lm.generate(ids, max_new_tokens=self.max_new_tokens, **generate_kwargs)
        except ContextOverflowError as e:
            return self._overflow(e.tokens, limit, retrieved)
        return ArmOutput(
            text=postprocess_answer(gen.text),
            raw_text=gen.text,
            ttft_s=float(gen.ttft_s),
            total_s=float(gen.total_s),
            prompt_tokens=int(gen.prompt_tokens),
            new_tokens=int(gen.new_tokens),
            prefix_tokens=int(getattr(gen, "prefix_tokens", 0)),
            retrieved=retrieved,
        )

    def _overflow(self, n_prompt: int, limit: int, retrieved: tuple[tuple[str, float], ...]) -> ArmOutput:
        detail = f"{n_prompt} prompt tokens + {self.max_new_tokens} new tokens > window of {limit} tokens"
        return ArmOutput(prompt_tokens=n_prompt, retrieved=retrieved, skip_reason=SKIP_CONTEXT_OVERFLOW,
                         skip_detail=detail)


class RetrievalArm(Arm):
    """An arm that puts the top-``k`` retrieved pool chunks into the prompt."""

    uses_retrieval = True

    def make_retriever(self) -> Retriever:
        """The retriever to index the pool with."""
        raise NotImplementedError

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        """Index the pool."""
        super().prepare(pool, lm, items=items, task=task)
        self.chunks = {c.id: c for c in pool}
        self.retriever = self.make_retriever()
        self.retriever.index(pool, progress=self.progress)

    def answer(self, item: QAItem) -> ArmOutput:
        """Retrieve ``k`` chunks for the question (those scoring at least the ``min_score`` option, when set) and
        answer from them."""
        start = time.perf_counter()
        floor = self.options.get("min_score")
        hits = tuple((c, s) for c, s in self.retriever.search(item.question, self.k) if floor is None or s >= floor)
        search_s = time.perf_counter() - start
        out = self.generate_answer(item, [self.chunks[cid].text for cid, _ in hits], hits)
        return dataclasses.replace(out, search_s=search_s)

    def bytes_stored(self) -> int:
        """Size of the index."""
        return self.retriever.nbytes


_ARMS: Registry[type[Arm]] = Registry("arm")
register_arm = _ARMS.decorator
"""Class decorator registering a :class:`Arm` subclass under a lower-case snake_case name (``replace=True``
replaces one registered under that name; another class under a taken name is a ValueError)."""
get_arm = _ARMS.get
"""The arm class registered under a name (UnknownNameError suggests the closest)."""
list_arms = _ARMS.names
"""Names of every registered arm, sorted."""


@register_arm("none")
class NoContextArm(Arm):
    """Closed book: the question alone."""


@register_arm("rag_bm25")
class BM25Arm(RetrievalArm):
    """Top-``k`` chunks by BM25."""

    def make_retriever(self) -> Retriever:
        """A bm25s retriever."""
        return BM25Retriever()


@register_arm("rag_dense")
class DenseArm(RetrievalArm):
    """Top-``k`` chunks by MiniLM cosine similarity (encoder on the model's device)."""

    def make_retriever(self) -> Retriever:
        """A MiniLM retriever."""
        return DenseRetriever(device=str(getattr(self.lm, "device", "cpu")))


@register_arm("long_context")
class LongContextArm(Arm):
    """The item's whole source in the prompt, in document order; skipped where it does not fit."""

    def answer(self, item: QAItem) -> ArmOutput:
        """Answer from every chunk of the item's source."""
        return self.generate_answer(item, [c.text for c in self.task.source_of(item)])



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

    uses_context: ClassVar[bool] = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.last_info: dict[str, Any] = {}

    def prompt_budget(self) -> int:
        limit = int(self.lm.max_context)
        if self.options.get("max_prompt_tokens"):
            limit = min(limit, int(self.options["max_prompt_tokens"]))
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


# arms of the memory kinds: registered lazily so that `get_arm("activation")` works without importing them first
for _name, _target in {
    "activation": "ActivationArm", "activation_gated": "ActivationGatedArm", "activation_pooled": "ActivationPooledArm",
    "activation_tokens": "ActivationTokensArm", "activation_hybrid": "ActivationHybridArm",
    "activation_oracle": "OracleArm", "random_memory": "RandomMemoryArm", "text_same_order": "TextSameOrderArm",
}.items():
    _ARMS.register(_name, f"nativemem.bench.arms_activation:{_target}")
for _name, _target in {"side_ffn": "arms_side_ffn:SideFFNArm", "side_ffn_ctx": "arms_side_ffn:SideFFNContextArm",
                       "lora": "arms_lora:LoRAArm", "lora_ctx": "arms_lora:LoRAContextArm",
                       "pkm": "arms_pkm:PKMArm", "pkm_gated": "arms_pkm:PKMGatedArm"}.items():
    _ARMS.register(_name, f"nativemem.bench.{_target}")
