"""Configuration of the product-key memory (``pkm``).

Defaults follow Memory Layers at Scale (Memory+, arXiv 2412.09764), scaled to a tiny CPU version, with the
changes this project measured (see the kind's module docstring in :mod:`.memory`): values start at zero
and the output projection is random (so the memory is an exact no-op and the values get a gradient from
the first step), the router (query projection and keys) and the projections stay fixed by default, and
the value pool trains with a row-sparse Adam at its own, larger learning rate.

Every field is stored in ``memory_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import InputError
from ...model import DEFAULT_SYSTEM
from ..base import MemoryConfig

__all__ = ["PKMConfig", "POOL_OPTIMIZERS", "GATE_MODES", "resolve_layers"]

POOL_OPTIMIZERS = ("sparse_adam", "adam")
GATE_MODES = ("hard", "soft")


@dataclass
class PKMConfig(MemoryConfig):
    """Product-key memory layers added to frozen MLP outputs, trained on facts.

    Sizes: the value pool has ``num_keys**2`` slots of the model's hidden size, shared by every memory
    layer; each memory layer adds a query projection (hidden x heads*key_dim), ``2*heads*num_keys``
    half keys, and two hidden x hidden projections (SiLU gate and output).
    """

    layers: tuple[float, ...] = field(default=(0.5, 0.7, 0.9), metadata={
        "help": "memory layers: an int is a decoder-layer index (negative allowed), a float in [0, 1] a fraction "
                "of depth (round(f * (num_layers - 1))). Default 0.5/0.7/0.9 = layers 14/20/26 of SmolLM2's 30 "
                "(measured against 7/15/23: same recall, ~40% less training time)"})
    num_keys: int = field(default=128, metadata={
        "help": "keys per half codebook (N); the pool holds N**2 slots. 128 -> 16,384 slots (enough "
                "for ~4k facts at 4 slots each); use 256 (65,536 slots) for several thousand facts"})
    heads: int = field(default=4, metadata={"help": "query heads (H); Meta and Lample use 4"})
    top_k: int = field(default=8, metadata={
        "help": "top-k per half and slots read per head (K); each token reads heads*top_k slots per layer"})
    key_dim: int = field(default=128, metadata={"help": "query/key size per head (split into two halves)"})
    temperature: float = field(default=10.0, metadata={
        "help": "scale of the cosine scores before the softmax over the top-k (recon: 20 per half)"})
    slots_per_fact: int = field(default=4, metadata={
        "help": "capacity rule checked before training: facts stored <= slots / slots_per_fact"})
    train_router: bool = field(default=False, metadata={
        "help": "also train the query projection and keys (moves the routing of stored facts; off by default "
                "so later adds and deletes stay local)"})
    train_projections: bool = field(default=False, metadata={
        "help": "also train the SiLU-gate and output projections (shared by all facts)"})
    lr: float = field(default=0.1, metadata={"help": "learning rate of the value pool (Meta: 1e-3 for "
                                                      "pretraining; a frozen backbone takes far more)"})
    projection_lr: float = field(default=1e-3, metadata={"help": "learning rate of router/projections when trained"})
    pool_optimizer: str = field(default="sparse_adam", metadata={
        "help": "sparse_adam (row-sparse lazy Adam, optim.RowAdam: only rows read in the batch change, state for all "
                "rows) | adam (dense Adam, no weight decay)"})
    batch_size: int = field(default=16, metadata={"help": "facts per step, one fact per sequence (no packing)"})
    max_epochs: int = field(default=40, metadata={"help": "upper bound on passes; training stops earlier once "
                                                          "every fact is recalled"})
    margin: float = field(default=1.0, metadata={
        "help": "a fact leaves the training set once every answer token beats the runner-up logit by this "
                "much; it is checked again every epoch and comes back when it slips"})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "clip of the gradient norm of the dense trained parameters; None = off"})
    train_autocast: str = field(default="bfloat16", metadata={
        "help": "dtype of the frozen backbone's matmuls while training: bfloat16 (about 2x faster on CPUs with "
                "bf16 units; facts the float32 model then misses get a float32 polish) | float32 (none)"})
    recheck_every: int = field(default=3, metadata={
        "help": "epochs between checks of the facts left out of training (they come back when they slip); with "
                "phrasing_recall < 1 each epoch checks a random sample of the phrasings left out (1/recheck_every "
                "of them, at most as many as it trained) and of the own prompts (every one near the margin)"})
    phrasings: int = field(default=8, metadata={
        "help": "phrasings each fact is trained under, its own prompt first: question templates of its relation, "
                "declarative sentences, surface variants of a plain question (augment.py), plus a reverse question "
                "where the relation has one; 1 = its own prompt only (stores the string, not the fact). On 100 facts "
                "held-out paraphrase recall was 0.12 at 1, 0.53 at 4, 0.92 at 8, at 5.4x the training time of 1"})
    phrasing_recall: float = field(default=1.0, metadata={
        "help": "training stops once every fact is recalled in its own prompt and this share of all trained "
                "phrasings is (1.0: every phrasing). Below 1 it trades the last phrasings, which keep slipping "
                "back at 1,000 facts and more, for time"})
    max_answer_tokens: int = field(default=64, metadata={
        "help": "a fact whose answer is longer than this many tokens is refused (a memory of facts, not texts)"})
    system: str | None = field(default=DEFAULT_SYSTEM, metadata={
        "help": "system prompt of the chat format facts are trained in; the default matches LanguageModel.chat "
                "(so `nativemem ask` uses the same prompt). None = the tokenizer's own default"})
    train_prefix: bool = field(default=False, metadata={
        "help": "apply the memory on the shared chat prefix (system prompt) while training; off: the prefix "
                "is computed once per batch, which halves the training cost"})
    cache_dtype: str = field(default="float32", metadata={
        "help": "dtype of cached hidden states below the lowest memory layer: float32 | bfloat16"})
    gate: bool = field(default=True, metadata={
        "help": "relevance gate on (True) or off; add() trains it when gate_auto, train_gate() retrains it. On by "
                "default: on 100 facts it kept recall at 1.0 and removed the perplexity and MMLU drift"})
    gate_auto: bool = field(default=True, metadata={"help": "retrain the gate at the end of every add()"})
    gate_hidden: int = field(default=128, metadata={"help": "hidden units of each per-layer gate MLP"})
    gate_mode: str = field(default="hard", metadata={
        "help": "hard: the memory speaks only on tokens whose gate value > gate_threshold (and is not computed "
                "elsewhere) | soft: the memory output is scaled by the gate value"})
    gate_threshold: float = field(default=0.5, metadata={"help": "open/closed threshold of the hard gate"})
    gate_steps: int = field(default=300, metadata={"help": "Adam steps of gate training (batches of 1024 tokens)"})
    gate_lr: float = field(default=2e-3, metadata={"help": "learning rate of gate training (Adam)"})
    seed: int = field(default=0, metadata={"help": "seed of the random router and projections"})

    def __post_init__(self) -> None:
        if isinstance(self.layers, (int, float)):
            self.layers = (self.layers,)
        self.layers = tuple(self.layers)
        if not self.layers:
            raise InputError("layers must name at least one decoder layer")
        for v in self.layers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"layers must be ints (indices) or floats in [0, 1] (fractions), got {v!r}")
            if isinstance(v, float) and not 0.0 <= v <= 1.0:
                raise InputError(f"a fractional layer must be in [0, 1], got {v}")
        for name in ("num_keys", "heads", "top_k", "key_dim", "slots_per_fact", "batch_size", "max_epochs",
                     "gate_hidden", "gate_steps", "recheck_every", "phrasings", "max_answer_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.key_dim % 2:
            raise InputError(f"key_dim must be even (two halves), got {self.key_dim}")
        if self.top_k > self.num_keys:
            raise InputError(f"top_k ({self.top_k}) cannot exceed num_keys ({self.num_keys})")
        for name in ("lr", "projection_lr", "temperature", "gate_lr"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.phrasing_recall <= 1.0:
            raise InputError(f"phrasing_recall must be in (0, 1], got {self.phrasing_recall}")
        if self.margin < 0:
            raise InputError(f"margin must be >= 0, got {self.margin}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.pool_optimizer not in POOL_OPTIMIZERS:
            raise InputError(f"unknown pool_optimizer {self.pool_optimizer!r}; use {' | '.join(POOL_OPTIMIZERS)}")
        if self.gate_mode not in GATE_MODES:
            raise InputError(f"unknown gate_mode {self.gate_mode!r}; use {' | '.join(GATE_MODES)}")
        if not 0.0 < self.gate_threshold < 1.0:
            raise InputError(f"gate_threshold must be in (0, 1), got {self.gate_threshold}")
        if self.train_autocast not in ("bfloat16", "float32"):
            raise InputError(f"train_autocast must be bfloat16 or float32, got {self.train_autocast!r}")
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise InputError(f"cache_dtype must be float32 or bfloat16, got {self.cache_dtype!r}")

    @property
    def num_slots(self) -> int:
        return self.num_keys ** 2


def resolve_layers(spec: tuple[float, ...], num_layers: int) -> list[int]:
    """Decoder-layer indices of a ``layers`` spec for a model with ``num_layers`` layers (sorted, unique).

    Raises:
        InputError: an index is out of range.
    """
    out = set()
    for v in spec:
        if isinstance(v, float):
            out.add(int(round(v * (num_layers - 1))))
        else:
            if not -num_layers <= v < num_layers:
                raise InputError(f"memory layer {v} is out of range: the model has {num_layers} layers")
            out.add(v % num_layers)
    return sorted(out)
