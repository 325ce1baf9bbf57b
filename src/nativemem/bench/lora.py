"""The LoRA baseline of the benchmarks (peft), trained by the same streaming loop as the side-FFN memory.

LoRA is not a memory kind of the library: it lives with the benchmark that compares against it. Every
benchmark that runs a ``lora`` arm (QA per document, facts, PG-19, MMLU) builds it here.

The Temp-LoRA recipe as Locas (arXiv 2602.05085) runs it (LoRA on all linear layers, values B = 0 so the start is
an exact no-op) with our loop: the same windows, context, optimiser (AdamW, no weight decay), steps
per window, losses and NaN guard as :class:`~.memory.SideFFNMemory`, so the comparison is at matched
budget. Only the learning rate is its own (LoRA usually wants a smaller one).

Adapters live in the model only inside ``with LoRABaseline(lm, ...) as lora:``; on exit peft unloads
them and the original modules (and ``requires_grad`` flags) are back, so the model is bit-identical to
before.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, InputError
from ..memories.side_ffn.ttt import StreamOptions, StreamResult, stream

__all__ = ["LoRABaseline", "save_lora_state", "load_lora_state"]


class LoRABaseline:
    """LoRA adapters on ``lm.model`` for the duration of a ``with`` block.

    Args:
        lm: the LanguageModel.
        rank: LoRA rank r.
        alpha: LoRA alpha (default: equal to rank, scale 1, as Temp-LoRA).
        target_modules: peft target modules ("all-linear" excludes the LM head).
        seed: seed of the A-matrix initialisation.
    """

    def __init__(self, lm, *, rank: int = 8, alpha: float | None = None,
                 target_modules: str | Sequence[str] = "all-linear", seed: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InputError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.lm = lm
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.seed = seed
        self.peft_model = None
        self._flags: list[tuple[nn.Parameter, bool]] = []

    # ------------------------------------------------------------------ attach / detach
    def __enter__(self) -> LoRABaseline:
        from peft import LoraConfig, get_peft_model

        self._flags = [(p, p.requires_grad) for p in self.lm.model.parameters()]
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                            target_modules=self.target_modules)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method that is deprecated; nothing for us to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(self.seed)
            self.peft_model = get_peft_model(self.lm.model, config)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.peft_model is not None:
                self.peft_model.unload()  # puts the original Linear modules back into lm.model
        finally:
            self.peft_model = None
            for p, flag in self._flags:
                p.requires_grad_(flag)
            self._flags = []

    def _check(self) -> None:
        if self.peft_model is None:
            raise InputError("use LoRABaseline inside a `with` block")

    # ------------------------------------------------------------------ learner protocol
    def trainable_parameters(self) -> list[nn.Parameter]:
        self._check()
        return [p for n, p in self.lm.model.named_parameters() if "lora_" in n]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def student(self):
        return contextlib.nullcontext()  # the adapters are in the model while the block runs

    def teacher(self):
        self._check()
        return self.peft_model.disable_adapter()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.lm.model.named_parameters() if "lora_" in n}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.lm.model.named_parameters():
                if n in snapshot:
                    p.copy_(snapshot[n])

    # ------------------------------------------------------------------ streaming
    def train_stream(self, ids: torch.Tensor | Sequence[int], options: StreamOptions, *, progress=None,
                     loss_hook=None) -> StreamResult:
        """Score-then-train over ``ids`` with the same loop as the side-FFN memory."""
        self._check()
        return stream(self.lm.model, ids, self, options, max_context=self.lm.max_context, progress=progress,
                      loss_hook=loss_hook)

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules,
                "parameters": self.num_parameters}


def save_lora_state(lora: LoRABaseline, path: str | Path) -> Path:
    """Save trained LoRA adapters (safetensors + a JSON with rank, alpha, targets and the model fingerprint)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in lora.snapshot().items()}, str(path / "lora.safetensors"))
    meta = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": lora.target_modules, "seed": lora.seed,
            "fingerprint": lora.lm.fingerprint.to_dict()}
    (path / "lora.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_lora_state(lm, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of :func:`save_lora_state`; checks the model fingerprint."""
    from safetensors.torch import load_file

    from ..fingerprint import Fingerprint

    path = Path(path)
    if not (path / "lora.json").is_file():
        raise DataError(f"{path}: no lora.json (save LoRA states with save_lora_state)")
    meta = json.loads((path / "lora.json").read_text())
    Fingerprint.from_dict(meta["fingerprint"]).check(lm.fingerprint, what="LoRA state")
    return meta, load_file(str(path / "lora.safetensors"), device=str(lm.device))
