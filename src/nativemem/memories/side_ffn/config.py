"""Configuration of the side-FFN (Locas-GLU) memory.

Defaults follow Locas (arXiv 2602.05085) scaled to a laptop CPU:
width 16 (the paper sweeps 16-512 on 1.7B models), windows of 512 new tokens behind 512 tokens of
context, one Adam step per window, score before training. Every field is stored in
``memory_config.json`` and can be overridden per call of :meth:`SideFFNMemory.train_stream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import InputError
from ..base import MemoryConfig

__all__ = ["SideFFNConfig", "INIT_STRATEGIES", "LOSSES"]

INIT_STRATEGIES = ("highest", "lowest", "random_index", "random")
LOSSES = ("ntp", "sd", "mix")


@dataclass
class SideFFNConfig(MemoryConfig):
    """Side-FFN memory: ``width`` cloned GLU neurons per layer, refined by test-time training.

    Parameter count: 3 · layers · hidden · neurons (as in Locas).
    """

    width: int = field(default=16, metadata={"help": "neurons added per layer by each memorize (r). The paper "
                                                     "saturates near r=64 on 1.7B models (Table 3)."})
    layers: tuple[int, ...] | None = field(default=None, metadata={
        "help": "decoder layers that get a side FFN (negative indices allowed); None = every layer"})
    init: str = field(default="highest", metadata={
        "help": "which backbone neurons to clone: highest | lowest | random_index (by mean |act(gate)*up| over "
                "the text) | random (Gaussian unit rows). Table 2: cloning any neuron is the large effect."})
    grow: bool = field(default=False, metadata={
        "help": "when True every add() memorizes its text again and appends `width` new neurons per layer; "
                "when False only the first add() memorizes and later ones only train"})
    memorize_tokens: int = field(default=1024, metadata={
        "help": "tokens of the text read by memorize (the paper initialises from the first window)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the memory (paper: 4e-3 at r=64)"})
    steps_per_window: int = field(default=1, metadata={"help": "optimiser steps per window (score first, then train)"})
    window: int = field(default=512, metadata={"help": "new tokens per window"})
    context: int = field(default=512, metadata={"help": "tokens of preceding text the model sees before each window"})
    loss: str = field(default="ntp", metadata={
        "help": "ntp (next-token loss on the window's tokens) | sd (self-distillation: the frozen model with "
                "`teacher_context` tokens of context teaches the memory model with `context`) | mix"})
    mix_weight: float = field(default=0.5, metadata={"help": "weight of ntp in mix (1 - weight goes to sd)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the sd loss (KL × T²)"})
    teacher_context: int | None = field(default=None, metadata={
        "help": "context tokens the sd teacher sees; None = 4 × context, capped by the model's window"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient-norm clip; None = off"})
    seed: int = field(default=0, metadata={"help": "seed of random_index / random initialisation"})

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise InputError("layers must name at least one decoder layer (or be None for all)")
        check_positive("width", self.width)
        check_positive("memorize_tokens", self.memorize_tokens)
        check_positive("steps_per_window", self.steps_per_window)
        check_positive("window", self.window)
        if not isinstance(self.context, int) or self.context < 0:
            raise InputError(f"context must be a non-negative number of tokens, got {self.context!r}")
        if self.init not in INIT_STRATEGIES:
            raise InputError(f"unknown init {self.init!r}; use one of {', '.join(INIT_STRATEGIES)}")
        check_train_options(lr=self.lr, loss=self.loss, mix_weight=self.mix_weight, temperature=self.temperature)
        if self.teacher_context is not None and self.teacher_context < 0:
            raise InputError(f"teacher_context must be >= 0, got {self.teacher_context}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_train_options(*, lr: float, loss: str, mix_weight: float, temperature: float) -> None:
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if not 0.0 <= mix_weight <= 1.0:
        raise InputError(f"mix_weight must be in [0, 1], got {mix_weight}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
