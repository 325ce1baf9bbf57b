"""The streamed arms: a model that reads a token stream window by window and learns as it goes.

Every benchmark that streams a text into the model (``pg19`` scores each window before learning it, ``mmlu``
asks questions after a whole book) runs its ``window_only``, ``side_ffn`` and ``lora`` arms through
:func:`stream_trained`, so the three are trained by one loop (:func:`~nativemem.memories.side_ffn.stream`) at
one budget (windows, context, steps): only what learns differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

__all__ = ["STREAM_ARMS", "Streamed", "stream_trained"]

STREAM_ARMS = ("window_only", "side_ffn", "lora")


@dataclass
class Streamed:
    """What an arm learnt from a stream.

    Attributes:
        result: the loop's :class:`~nativemem.memories.side_ffn.StreamResult` (NLL of every window before
            it was learnt, steps, tokens).
        memory: the side-FFN memory to pass to ``lm`` calls (None for the other arms).
        lora: the LoRA adapters, in the model while the ``with`` block of :func:`stream_trained` runs.
        parameters: parameters the arm added to the model.
    """

    result: Any
    memory: Any = None
    lora: Any = None
    parameters: int = 0


@contextmanager
def stream_trained(arm: str, lm, ids: Sequence[int], *, stream: dict[str, Any], lr: float, lora_lr: float,
                   side_ffn: dict[str, Any] | None = None, lora: dict[str, Any] | None = None, seed: int = 0,
                   progress=None, source: str = "") -> Iterator[Streamed]:
    """Stream ``ids`` through arm ``arm`` and yield what it learnt (LoRA adapters stay in the model inside).

    Args:
        stream: :class:`~nativemem.memories.side_ffn.StreamOptions` fields shared by the arms (window,
            context, steps, loss, ...), without ``lr``.
        lr / lora_lr: learning rate of the side-FFN values / of the LoRA adapters.
        side_ffn: :class:`~nativemem.memories.side_ffn.SideFFNConfig` fields (width, layers, init); the
            window, context, learning rate and seed are the stream's.
        lora: ``rank``, ``alpha``, ``target_modules`` of the adapters.
        source: recorded with the side-FFN memory's training.
    """
    from ..memories.side_ffn import SideFFNConfig, SideFFNMemory, StreamOptions
    from ..memories.side_ffn import stream as run_stream

    if arm == "window_only":
        yield Streamed(run_stream(lm.model, ids, None, StreamOptions(**stream), max_context=lm.max_context,
                                  progress=progress))
    elif arm == "side_ffn":
        window = stream["window"]
        mem = SideFFNMemory(lm, SideFFNConfig(**(side_ffn or {}), lr=lr, window=window, context=stream["context"],
                                              seed=seed, memorize_tokens=window + 1))
        mem.memorize(ids[: window + 1])  # the first window (values zero: it is still scored unchanged)
        result = run_stream(lm.model, ids, mem, StreamOptions(lr=lr, **stream), max_context=lm.max_context,
                            progress=progress)
        mem.record(result, metadata={"source": source})
        yield Streamed(result, memory=mem, parameters=mem.num_parameters)
    elif arm == "lora":
        from .lora import LoRABaseline

        cfg = lora or {}
        with LoRABaseline(lm, rank=cfg.get("rank", 8), alpha=cfg.get("alpha"),
                          target_modules=cfg.get("target_modules", "all-linear"), seed=seed) as adapters:
            result = adapters.train_stream(ids, StreamOptions(lr=lora_lr, **stream), progress=progress)
            yield Streamed(result, lora=adapters, parameters=adapters.num_parameters)
    else:
        raise InputError(f"unknown streamed arm {arm!r}; use {', '.join(STREAM_ARMS)}")
