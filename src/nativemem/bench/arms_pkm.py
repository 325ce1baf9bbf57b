"""The product-key memory family of benchmark arms, and the facts training loop other families share.

- ``pkm`` (gate off) and ``pkm_gated``: a product-key memory trained on the task's facts (the facts task);
  one training, shared by both through the run's ``shared`` option.
- :func:`train_learner`: any hooked or adapted parameters trained on the facts with pkm's loop (the same
  phrasings, answer-only loss, stop rule and epoch cap); the side_ffn and lora arms use it on the facts task.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import InputError
from ..prompting import DEFAULT_SYSTEM
from .arms import Arm, ArmOutput, register_arm
from .tasks import Chunk, QAItem, Task

__all__ = ["PKMArm", "PKMGatedArm", "trained_pkm", "pkm_options", "train_learner"]


def pkm_options(memory_options: dict[str, Any], n: int) -> dict[str, Any]:
    """PKMConfig fields of a run: its overrides, and a pool that holds ``n`` facts unless they set ``num_keys``."""
    from ..memories.pkm.config import PKMConfig

    cfg = {"system": DEFAULT_SYSTEM, **memory_options}
    per = cfg.get("slots_per_fact", PKMConfig.slots_per_fact)
    if "num_keys" not in cfg:  # the default pool, or the smallest that holds the facts
        keys = PKMConfig.num_keys
        while keys * keys < n * per:
            keys += 16
        cfg["num_keys"] = keys
    return cfg


def trained_pkm(lm, facts: Sequence[Any], shared: dict[str, Any], options: dict[str, Any],
                memory_options: dict[str, Any]):
    """The run's pkm memory, trained on first use (then shared by ``pkm`` and ``pkm_gated``)."""
    if "pkm" not in shared:
        from ..memories.pkm import PKMConfig, PKMMemory

        mem = PKMMemory(lm, PKMConfig(**{**pkm_options(memory_options, len(facts)), "gate_auto": True}))
        mem.add_gate_examples(options.get("gate_negatives") or (), options.get("gate_questions") or ())
        start = time.perf_counter()
        receipt = mem.add(list(facts), progress=options.get("progress_fn"))  # trains the gate too, as a user's add
        gate_s = receipt.details.get("gate_s", 0.0)
        shared["pkm"] = (mem, receipt, time.perf_counter() - start - gate_s, gate_s, receipt.details.get("gate"))
    return shared["pkm"]


def _pkm_cost(mem, receipt, train_s: float, n: int) -> dict[str, Any]:
    d = receipt.details
    return {"train_s": train_s, "train_s_per_fact": train_s / max(1, n), "steps": receipt.steps,
            "epochs": d.get("epochs"), "exposures_per_fact": d.get("exposures_per_fact"),
            "train_recall": d.get("recall"), "final_loss": receipt.final_loss, "pool_slots": mem.num_slots,
            "pool_slots_used": mem.slots_used(), "pool_bytes": mem.values.numel() * mem.values.element_size(),
            "layers": list(mem.layer_ids), "polished": d.get("polished"), "stopped": d.get("stopped"),
            **{k: d[k] for k in ("calibrate_s", "cache_s", "eval_s", "phrasings", "trained_phrasings",
                                 "recall_phrasings", "augmentation", "templates_skipped", "recall_gated",
                                 "epoch_active", "epoch_missed", "epoch_share") if k in d}}


@register_arm("pkm")
class PKMArm(Arm):
    """Product-key memory trained on the task's facts, relevance gate off."""

    gate = False
    needs_facts = True  # a task of documents has nothing for it to learn

    def prepare(self, pool: Sequence[Chunk], lm: Any, *, items: Sequence[QAItem], task: Task) -> None:
        super().prepare(pool, lm, items=items, task=task)
        facts = self.facts()
        if not facts:
            raise InputError(f"the {self.name} arm stores facts: run it on the facts task")
        shared = self.options.setdefault("shared", {})
        mem, receipt, train_s, gate_s, gate_report = trained_pkm(lm, facts, shared, self.options, self.memory_options)
        self.mem = mem
        self.cost = _pkm_cost(mem, receipt, train_s, len(facts))
        if self.gate:
            self.cost.update(gate_train_s=gate_s, gate_report=gate_report)

    def memory(self):
        return self.mem

    def open_memory(self):
        return _gate_set(self.mem, self.gate)

    def answer(self, item: QAItem) -> ArmOutput:
        with self.session():
            return self.generate_answer(item, memory=self.mem)

    def bytes_stored(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.mem.state_dict().values()))


@register_arm("pkm_gated")
class PKMGatedArm(PKMArm):
    """The same product-key memory with the relevance gate on."""

    gate = True


@contextlib.contextmanager
def _gate_set(mem, gate: bool) -> Iterator[None]:
    before, mem.gate = mem.gate, gate
    try:
        yield
    finally:
        mem.gate = before


def train_learner(lm, facts, *, params, scope, lowest: int, options: dict[str, Any],
                  memory_options: dict[str, Any]) -> dict[str, Any]:
    """Train any hooked/adapted parameters on the facts with pkm's loop (answer-only loss, one fact per
    sequence, same stop rule and epoch cap), memory acting on every position (no prefix caching).

    Args:
        params: the trained parameters (Adam at ``options["baseline_lr"]``, default 1e-3).
        scope: returns the context manager under which ``params`` act on the model.
        lowest: lowest decoder layer they act on (hidden states below it are cached).
        memory_options: PKMConfig fields; its ``phrasings``, ``batch_size``, ``max_epochs``, ``margin``,
            ``recheck_every`` and ``train_autocast`` set the loop.
    """
    import torch

    from ..memories.pkm.augment import phrasings
    from ..memories.pkm.config import PKMConfig
    from ..memories.pkm.facts import Fact
    from ..memories.pkm.train import PrefixCache, cache_items, encode_fact, frozen, train_items

    cfg = pkm_options(memory_options, len(facts))
    pk = PKMConfig(**{k: v for k, v in cfg.items() if k in PKMConfig.__dataclass_fields__})
    items = []  # the same phrasings as the pkm arms train (pk.phrasings per fact)
    for i, f in enumerate(facts):
        for p in phrasings(f, pk.phrasings).items:
            it = encode_fact(lm, Fact(p.prompt, p.answer, f.id, p.chat), system=DEFAULT_SYSTEM, prefix=[],
                             train_prefix=True)
            it.index, it.fact, it.kind = len(items), i, p.kind
            items.append(it)
    start = time.perf_counter()
    cache_items(lm.model, items, lowest, pad_id=lm.eos_token_ids[0], dtype=torch.float32)
    opt = torch.optim.Adam(params, lr=float(options.get("baseline_lr", 1e-3)))
    autocast = torch.bfloat16 if pk.train_autocast == "bfloat16" and lm.dtype == torch.float32 else None
    with frozen(lm.model):
        for p in params:
            p.requires_grad_(True)
        result = train_items(lm.model, items, lowest, PrefixCache(lm.model), memory_scope=scope, optimizers=[opt],
                             params=params, batch_size=pk.batch_size, max_epochs=pk.max_epochs, margin=pk.margin,
                             autocast=autocast, recheck_every=pk.recheck_every, progress=options.get("progress_fn"))
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    train_s = time.perf_counter() - start
    own = torch.tensor([it.kind == "own prompt" for it in items])
    recall = float((result.margins[own] > 0).float().mean()) if result.margins is not None else 0.0
    return {"train_s": train_s, "train_s_per_fact": train_s / len(facts), "steps": result.steps,
            "epochs": result.epochs, "exposures_per_fact": result.exposures, "train_recall": recall,
            "phrasings": pk.phrasings, "trained_phrasings": len(items), "train_recall_phrasings": result.recall,
            "final_loss": result.final_loss, "stopped": result.stopped, "parameters": sum(p.numel() for p in params)}
