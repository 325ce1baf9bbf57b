"""The product-key memory family of benchmark arms (facts task): ``pkm`` (gate off) and ``pkm_gated``, one
training shared by both."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from .arms_facts import FACTS_SYSTEM, FactArm, register_fact_arm

__all__ = ["PKMArm", "PKMGatedArm", "trained_pkm", "pkm_options"]


def pkm_options(options: dict[str, Any], n: int) -> dict[str, Any]:
    from ..memories.pkm.config import PKMConfig

    cfg = {"system": FACTS_SYSTEM, **(options.get("memory_options") or {})}
    per = cfg.get("slots_per_fact", PKMConfig.slots_per_fact)
    if "num_keys" not in cfg:  # the default pool, or the smallest that holds the facts
        keys = PKMConfig.num_keys
        while keys * keys < n * per:
            keys += 16
        cfg["num_keys"] = keys
    return cfg


def trained_pkm(lm, facts: Sequence[Any], shared: dict[str, Any], options: dict[str, Any]):
    """The run's pkm memory, trained on first use (then shared by ``pkm`` and ``pkm_gated``)."""
    if "pkm" not in shared:
        from ..memories.pkm import PKMConfig, PKMMemory

        progress = options.get("progress_fn")
        cfg = PKMConfig(**{**pkm_options(options, len(facts)), "gate_auto": False})
        mem = PKMMemory(lm, cfg)
        start = time.perf_counter()
        receipt = mem.add(list(facts), progress=progress)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        gate = mem.train_gate(negatives=options.get("gate_negatives") or (),
                              questions=options.get("gate_questions") or ())
        shared["pkm"] = (mem, receipt, train_s, time.perf_counter() - start, gate)
    return shared["pkm"]


def _pkm_cost(mem, receipt, train_s: float, n: int) -> dict[str, Any]:
    d = receipt.details
    return {"train_s": train_s, "train_s_per_fact": train_s / max(1, n), "steps": receipt.steps,
            "epochs": d.get("epochs"), "exposures_per_fact": d.get("exposures_per_fact"),
            "train_recall": d.get("recall"), "final_loss": receipt.final_loss, "pool_slots": mem.num_slots,
            "pool_slots_used": mem.slots_used(), "pool_bytes": mem.values.numel() * mem.values.element_size(),
            "layers": list(mem.layer_ids), "polished": d.get("polished"), "stopped": d.get("stopped"),
            **{k: d[k] for k in ("calibrate_s", "cache_s", "eval_s", "phrasings", "trained_phrasings",
                                 "recall_phrasings", "augmentation", "templates_skipped", "recall_gated") if k in d}}


@register_fact_arm("pkm")
class PKMArm(FactArm):
    """Product-key memory, relevance gate off."""

    gate = False

    def prepare(self, facts):
        mem, receipt, train_s, gate_s, gate_report = trained_pkm(self.lm, facts, self.shared, self.options)
        self.mem = mem
        cost = _pkm_cost(mem, receipt, train_s, len(facts))
        if self.gate:
            cost.update(gate_train_s=gate_s, gate_report=gate_report)
        return cost

    def memory(self):
        return self.mem

    @contextmanager
    def session(self):
        before = self.mem.gate
        self.mem.gate = self.gate
        try:
            yield
        finally:
            self.mem.gate = before

    def bytes_stored(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.mem.state_dict().values()))


@register_fact_arm("pkm_gated")
class PKMGatedArm(PKMArm):
    """The same product-key memory with the relevance gate on."""

    gate = True
