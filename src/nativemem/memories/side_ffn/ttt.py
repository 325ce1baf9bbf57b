"""Streaming test-time training: score each window with the current state, then train on it.

How this works (the online protocol of Temp-LoRA / Locas ``compute_nll``, arXiv 2602.05085):

- The token stream ``ids`` (BOS first when the tokenizer has one) is cut into windows of ``window``
  *new* tokens. Every token but the first is a target exactly once.
- For each window the model sees up to ``context`` preceding tokens (at least the one token that
  predicts the window's first target), then the window. Positions restart at 0 in every window.
- **Score first.** The first forward of a window runs with the current state; its next-token NLL on
  the new tokens is what the window is scored with. With ``steps >= 1`` that same forward (with
  gradients) also gives the first training loss, so scoring costs no extra pass and no token is ever
  scored after the state has trained on it.
- **Then train** ``steps`` optimiser steps on the window. Losses: ``ntp`` (mean NLL of the new tokens),
  ``sd`` (self-distillation: the frozen model, seeing ``teacher_context`` preceding tokens, teaches
  the student, which sees ``context``; KL(teacher ‖ student) at temperature T, × T²), ``mix``
  (``mix_weight`` · ntp + (1 − mix_weight) · sd).
- With ``context_grad=False`` (default) the context is encoded without gradients (with the current
  state) and only the window's forward is differentiated: identical scores, about half the backward
  cost, no gradient through the context's keys and values.
- **NaN guard.** A non-finite loss or gradient, or a step that makes the state non-finite, stops the
  stream: the state goes back to the last state that gave a finite loss and the result says where and
  why. Nothing is raised.

The loop trains anything that implements :class:`Learner`: the side-FFN memory and the LoRA baseline use
the same code, so their budgets (windows, steps, optimiser) are identical. ``learner=None`` only scores
(the window-only baseline).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ...errors import InputError
from ...turns import model_step
from .config import check_positive, check_train_options

__all__ = ["Learner", "WindowRecord", "StreamResult", "StreamOptions", "stream", "windows", "frozen_except"]


class Learner(Protocol):
    """What the streaming loop trains."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def student(self) -> contextlib.AbstractContextManager: ...  # forward with the learned state

    def teacher(self) -> contextlib.AbstractContextManager: ...  # forward of the frozen base model

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...


@dataclass
class StreamOptions:
    """Options of one streaming run (see the module docstring)."""

    window: int = 512
    context: int = 512
    steps: int = 1
    lr: float = 1e-3
    loss: str = "ntp"
    mix_weight: float = 0.5
    temperature: float = 1.0
    teacher_context: int | None = None
    max_grad_norm: float | None = 1.0
    context_grad: bool = False
    train: bool = True

    def check(self, max_context: int) -> None:
        check_positive("window", self.window)
        check_positive("steps", self.steps)
        if self.context < 0:
            raise InputError(f"context must be >= 0, got {self.context}")
        check_train_options(lr=self.lr, loss=self.loss, mix_weight=self.mix_weight, temperature=self.temperature)
        if self.window + max(self.context, 1) > max_context:
            raise InputError(f"window ({self.window}) + context ({self.context}) tokens exceed the model's "
                             f"window of {max_context} tokens")

    def resolved_teacher_context(self, max_context: int) -> int:
        if self.teacher_context is not None:
            return min(self.teacher_context, max_context - self.window)
        return min(4 * max(self.context, 1), max_context - self.window)


@dataclass
class WindowRecord:
    """One window: targets ``ids[start:end]``, scored before training on them."""

    index: int
    start: int
    end: int
    nll_sum: float  # summed NLL of the window's targets under the state before training on it
    loss: float | None = None  # training loss at the first step (None when not training)
    steps: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start": self.start, "end": self.end, "tokens": self.tokens,
                "nll_sum": self.nll_sum, "loss": self.loss, "steps": self.steps, "seconds": self.seconds}


@dataclass
class StreamResult:
    """What a streaming run did: per-window scores, per-token NLLs, steps, and whether it stopped early."""

    windows: list[WindowRecord] = field(default_factory=list)
    token_nll: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (n_scored,) float32
    stopped: bool = False
    stop_reason: str | None = None
    elapsed_s: float = 0.0
    total_windows: int = 0

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.windows)

    @property
    def nll_sum(self) -> float:
        return sum(w.nll_sum for w in self.windows)

    @property
    def ppl(self) -> float:
        """Cumulative perplexity exp(Σ NLL / Σ tokens) of everything scored."""
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def steps(self) -> int:
        return sum(w.steps for w in self.windows)

    @property
    def final_loss(self) -> float | None:
        losses = [w.loss for w in self.windows if w.loss is not None]
        return losses[-1] if losses else None

    def cumulative(self) -> list[tuple[int, float]]:
        """(tokens read, cumulative ppl) after every window."""
        out, tokens, nll = [], 0, 0.0
        for w in self.windows:
            tokens, nll = tokens + w.tokens, nll + w.nll_sum
            out.append((tokens, math.exp(nll / tokens)))
        return out

    def ppl_at(self, tokens: int) -> float | None:
        """Cumulative ppl over the first ``tokens`` scored tokens (None if fewer were scored)."""
        if tokens > self.token_nll.numel() or tokens < 1:
            return None
        return math.exp(float(self.token_nll[:tokens].double().sum()) / tokens)


def windows(n_ids: int, window: int) -> list[tuple[int, int]]:
    """Target ranges ``[start, end)`` over ids 1..n_ids-1 in steps of ``window``."""
    return [(s, min(s + window, n_ids)) for s in range(1, n_ids, window)]


@contextlib.contextmanager
def frozen_except(model: nn.Module, keep: Sequence[nn.Parameter]) -> Iterator[None]:
    """Turn off requires_grad on every model parameter not in ``keep`` (restored in finally)."""
    keep_ids = {id(p) for p in keep}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            if id(p) not in keep_ids:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _logits(model: nn.Module, inp: torch.Tensor, n_new: int, scope, *, split: int = 0,
            grad: bool = True) -> torch.Tensor:
    """Logits (n_new, V) float32 predicting the last ``n_new`` targets.

    ``inp`` is (1, L); with ``split`` > 0 the first ``split`` tokens are encoded without gradients and
    handed over as a KV cache (inside the same ``scope``, so the state is active for both).
    """
    with scope():
        if split > 0:
            with torch.no_grad():
                past = model(input_ids=inp[:, :split], use_cache=True).past_key_values
            with torch.set_grad_enabled(grad):
                out = model(input_ids=inp[:, split:], past_key_values=past, use_cache=True, logits_to_keep=n_new)
        else:
            with torch.set_grad_enabled(grad):
                out = model(input_ids=inp, use_cache=False, logits_to_keep=n_new)
    return out.logits[0, -n_new:].float()


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at ``temperature``, times T²."""
    t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    s = torch.log_softmax(student_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def _finite(params: Sequence[torch.Tensor], grads: bool = False) -> bool:
    for p in params:
        t = p.grad if grads else p
        if t is not None and not torch.isfinite(t).all():
            return False
    return True


def stream(model: nn.Module, ids: torch.Tensor | Sequence[int], learner: Learner | None, options: StreamOptions,
           *, max_context: int, progress: Callable[[WindowRecord, int], None] | None = None,
           loss_hook: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None) -> StreamResult:
    """Score then train, window by window, over ``ids`` (see the module docstring).

    Args:
        model: the causal LM (frozen except the learner's parameters during the run).
        ids: the token stream (T,), BOS first if the model uses one.
        learner: what to train, or None to only score (window-only baseline).
        options: window, context, steps, lr, loss, ...
        max_context: the model's window in tokens.
        progress: called after each window with (record, number of windows).
        loss_hook: test hook ``(window, step, loss) -> loss`` applied before the finiteness check.

    Raises:
        InputError: bad options, or a stream with fewer than two tokens.
    """
    options.check(max_context)
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() < 2:
        raise InputError(f"the text has {ids.numel()} token(s): at least 2 are needed to score a next token")
    spans = windows(ids.numel(), options.window)
    result = StreamResult(total_windows=len(spans))
    train = learner is not None and options.train
    params = learner.trainable_parameters() if train else []
    if train and not params:
        raise InputError("nothing to train: the memory has no neurons (memorize first)")
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0) if train else None
    student = learner.student if learner is not None else contextlib.nullcontext
    teacher = learner.teacher if learner is not None else contextlib.nullcontext
    context = max(options.context, 1)
    t_context = options.resolved_teacher_context(max_context)
    nlls: list[torch.Tensor] = []
    start_time = time.perf_counter()
    last_good = learner.snapshot() if train else None
    with frozen_except(model, params):
        for index, (s, e) in enumerate(spans):
            t0 = time.perf_counter()
            n_new = e - s
            a = max(0, s - context)
            inp = ids[a:e - 1].unsqueeze(0)  # (1, L): the last target is never an input
            split = 0 if options.context_grad else max(0, s - 1 - a)
            targets = ids[s:e]
            record = WindowRecord(index, s, e, nll_sum=float("nan"))
            teacher_logits = None
            if train and options.loss in ("sd", "mix"):
                at = max(0, s - max(t_context, 1))
                with torch.no_grad(), model_step():
                    teacher_logits = _logits(model, ids[at:e - 1].unsqueeze(0), n_new, teacher, grad=False)
            for step in range(options.steps if train else 1):
                with model_step():  # forward, backward and update: one turn on a shared model
                    logits = _logits(model, inp, n_new, student, split=split, grad=train)
                    token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")  # (n_new,)
                    if step == 0:  # the score: the state before any step on this window
                        record.nll_sum = float(token_nll.detach().double().sum())
                        window_nll = token_nll.detach().cpu()
                    if not train:
                        break
                    ntp = token_nll.mean()
                    if options.loss == "ntp":
                        loss = ntp
                    else:
                        sd = _kl(teacher_logits, logits, options.temperature)
                        loss = sd if options.loss == "sd" else options.mix_weight * ntp + (1 - options.mix_weight) * sd
                    if loss_hook is not None:
                        loss = loss_hook(index, step, loss)
                    if not torch.isfinite(loss):
                        return _stop(result, learner, last_good, nlls, start_time, record, window_nll,
                                     f"non-finite loss ({float(loss.detach())}) in window {index} step {step}; the memory was "
                                     "restored to its last state with a finite loss")
                    if step == 0:
                        record.loss = float(loss.detach())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if not _finite(params, grads=True):
                        return _stop(result, learner, None, nlls, start_time, record, window_nll,
                                     f"non-finite gradient in window {index} step {step}; the memory was kept as it "
                                     "was before this step")
                    if options.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                    last_good = learner.snapshot()
                    opt.step()
                    record.steps += 1
                    if not _finite(params):
                        return _stop(result, learner, last_good, nlls, start_time, record, window_nll,
                                     f"a step made the memory non-finite in window {index} step {step}; the memory was "
                                     "restored to its state before that step")
            if not math.isfinite(record.nll_sum):
                return _stop(result, learner, None, nlls, start_time, record, None,
                             f"non-finite NLL in window {index}; the memory was kept as it was")
            record.seconds = time.perf_counter() - t0
            result.windows.append(record)
            nlls.append(window_nll)
            if progress is not None:
                progress(record, len(spans))
    result.token_nll = torch.cat(nlls) if nlls else torch.zeros(0)
    result.elapsed_s = time.perf_counter() - start_time
    return result


def _stop(result: StreamResult, learner: Learner | None, restore_to, nlls, start_time, record: WindowRecord,
          window_nll: torch.Tensor | None, reason: str) -> StreamResult:
    """End a run early: restore the last good state (when given), keep the windows scored so far.

    The failing window is kept when its score (taken before any step on it) is finite.
    """
    if learner is not None and restore_to is not None:
        learner.restore(restore_to)
    if window_nll is not None and math.isfinite(record.nll_sum):
        result.windows.append(record)
        nlls.append(window_nll)
    result.stopped, result.stop_reason = True, reason
    result.token_nll = torch.cat(nlls) if nlls else torch.zeros(0)
    result.elapsed_s = time.perf_counter() - start_time
    return result
