"""PKMMemory: product-key memory layers beside frozen MLPs, written with facts, with a relevance gate.

What the operations do:

- ``add(facts)``: parse the facts (see :mod:`.facts` for every accepted form; plain sentences become
  completion facts), resolve duplicates (a later fact with the same prompt replaces the earlier one and
  the receipt says so), check the pool's capacity, then train the value pool with the answer-only loss,
  one fact per sequence, until every new fact is recalled (:mod:`.train`). On the first add the router's
  input statistics are measured on the model's own hidden states. With ``gate_auto`` the relevance gate is
  retrained at the end, open on the phrasings of every stored fact (the new ones' inputs come from the final
  check) and closed on the built-in texts and those kept by ``add_gate_examples``. The receipt holds steps,
  time, final loss, recall on the facts just added (greedy-exact, computed as teacher-forced argmax over every
  answer token) and the cost of each phase.
- reading (``active()``): a forward hook on every memory layer's MLP adds the memory output; with the gate
  on, only where the gate opens (``gate_mode="hard"``) or scaled by it (``"soft"``).
- ``delete(fact_id)``: unlearn one fact: the pool rows it reads are retrained so that the model's answer
  distribution on that fact matches the model without memory, while the facts that share those rows keep
  their answers (:meth:`PKMMemory.delete`); the receipt reports recall before and after.

Design choices (measured, see the project's report): values start at zero with a random output
projection (exact no-op, immediate gradient); router and projections are fixed by default, so a fact's
rows depend only on its own hidden states and later adds or deletes stay local; the pool trains with a
row-sparse Adam at its own learning rate. The memory is shared by all users (``user_id`` is recorded
with each fact, not used to scope reads).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, MemoryFormatError
from ...hooks import hooks, output_hidden, replace_output_hidden
from ...prompting import build_messages
from ...turns import model_step
from ..base import Injection, Memory, Receipt, RecordLifecycle
from .config import PKMConfig, resolve_layers
from .augment import KINDS, fact_of_sentence, phrasings
from .facts import Fact, parse_facts
from .gate import GENERAL_QUESTIONS, NEUTRAL_TEXTS, RelevanceGate, fit_gate
from .layer import PKMLayer
from .optim import RowAdam
from .train import (CastWeights, Item, PrefixCache, _Stop, cache_items, chat_prefix, encode_fact, evaluate_items,
                    fact_margins, forward_answers, frozen, recalled_enough, train_items)

__all__ = ["PKMMemory"]

_STEP_TOKENS = 2048  # padded tokens per forward of a capture: one step (one turn on a shared model) stays short
_CALIBRATION_FACTS = 64  # facts whose hidden states (with the built-in texts) set the router statistics
_POLISH_SLACK = 0.005  # with phrasing_recall < 1: share of own prompts the epochs may leave to the float32 polish
# (rounded down: none below 200 facts, where a polish of a few facts on their own pushes others out as often)
_GATE_FACTS = 1000  # facts whose phrasings are the gate's open examples (a sample when more are stored)


class PKMMemory(RecordLifecycle, Memory):
    """Product-key memory layers trained on facts (see the module docstring)."""

    kind = "pkm"
    config_cls = PKMConfig
    param_prefix = "pkm_"

    def __init__(self, lm, config: PKMConfig | None = None, *, path=None):
        super().__init__(lm, config, path=path)
        cfg: PKMConfig = self.config
        d = lm.fingerprint.hidden_size
        self.layer_ids = resolve_layers(cfg.layers, lm.fingerprint.num_layers)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.layers = nn.ModuleDict({
            str(i): PKMLayer(d, num_keys=cfg.num_keys, heads=cfg.heads, top_k=cfg.top_k, key_dim=cfg.key_dim,
                             temperature=cfg.temperature, generator=gen) for i in self.layer_ids}).to(lm.device)
        self.gates = nn.ModuleDict({str(i): RelevanceGate(d, cfg.gate_hidden, generator=gen)
                                    for i in self.layer_ids}).to(lm.device)
        self.values = nn.Parameter(torch.zeros(cfg.num_slots, d, device=lm.device))
        for p in self.parameters():
            p.requires_grad_(False)
        self.records: dict[str, dict[str, Any]] = {}  # fact id -> fact dict (+ user_id), in insertion order
        self.signatures: dict[str, torch.Tensor] = {}  # fact id -> int64 slots it reads most (top-1 per head)
        self.calibrated = False
        self.gate_trained = False
        self.gate_examples: dict[str, list[str]] = {"negatives": [], "questions": []}  # the user's closed examples
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._gate_acc: dict[int, list[float]] | None = None
        self._last_gate: dict[str, Any] | None = None

    # ------------------------------------------------------------------ introspection
    def parameters(self) -> Iterator[nn.Parameter]:
        yield self.values
        yield from self.layers.parameters()
        yield from self.gates.parameters()

    @property
    def lowest_layer(self) -> int:
        return self.layer_ids[0]

    @property
    def gate(self) -> bool:
        """The relevance-gate switch (persisted in the config)."""
        return self.config.gate

    @gate.setter
    def gate(self, on: bool) -> None:
        self.config.gate = bool(on)

    @property
    def num_slots(self) -> int:
        return self.values.shape[0]

    @property
    def max_facts(self) -> int:
        """Capacity rule: slots / slots_per_fact."""
        return self.num_slots // self.config.slots_per_fact

    def slots_used(self) -> int:
        return int((self.values.detach() != 0).any(dim=1).sum())

    def stats(self) -> dict[str, Any]:
        last = self._last_gate or {}
        return {**super().stats(), "facts": len(self.records), "layers": list(self.layer_ids), "slots": self.num_slots,
                "slots_used": self.slots_used(), "max_facts": self.max_facts,
                "pool_bytes": self.values.numel() * self.values.element_size(),
                "gate": bool(self.config.gate), "gate_trained": self.gate_trained,
                "gate_mean_last": last.get("mean"), "gate_open_last": last.get("open"),
                "gate_mean_last_by_layer": last.get("by_layer")}

    # ------------------------------------------------------------------ the hooks
    def _hook(self, layer_id: int, *, gate: bool, sparse: bool, record: dict | None, cell: dict | None = None):
        layer: PKMLayer = self.layers[str(layer_id)]
        gate_net: RelevanceGate = self.gates[str(layer_id)]
        cfg: PKMConfig = self.config
        values = self.values

        def add_memory(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))  # (B, T, D)
            y = output_hidden(output)
            start = cell["start"] if cell is not None else 0  # tokens of a known shared prefix: no memory there
            if start >= x.shape[1]:
                return None
            x_in = x[:, start:] if start else x
            flat = x_in.reshape(-1, x.shape[-1])  # (BT, D)
            z = layer.normalise(flat)
            if record is not None and "z" in record:
                record["z"].setdefault(layer_id, []).append(z.detach())
            if not gate:
                out, idx, _ = layer(flat, values, sparse=sparse, z=z)
                if record is not None and "idx" in record:
                    record["idx"].setdefault(layer_id, []).append(idx.view(*x_in.shape[:-1], *idx.shape[1:]))
            else:
                p = torch.sigmoid(gate_net(z))  # (BT,)
                is_open = p > cfg.gate_threshold
                if self._gate_acc is not None:
                    acc = self._gate_acc.setdefault(layer_id, [0.0, 0, 0])
                    acc[0] += float(p.sum())
                    acc[1] += p.numel()
                    acc[2] += int(is_open.sum())
                if cfg.gate_mode == "soft":
                    out = layer(flat, values, z=z)[0] * p[:, None]
                else:
                    rows = is_open.nonzero().squeeze(1)
                    if rows.numel() == 0:
                        return None  # closed everywhere: the output is untouched
                    out = torch.zeros_like(flat, dtype=torch.float32)
                    out[rows] = layer(flat[rows], values, z=z[rows])[0]
            out = out.view(x_in.shape).to(y.dtype)
            if start:
                out = torch.cat([torch.zeros_like(y[:, :start]), out], dim=1)
            return replace_output_hidden(output, y + out)

        return add_memory

    def known_prefixes(self) -> list[tuple[int, ...]]:
        """Token prefixes the memory never acts on: the chat prefix facts are trained after, and BOS."""
        if getattr(self, "_known", None) is None:
            known = [tuple(chat_prefix(self.lm, self.config.system))]
            bos = self.lm.tokenizer.bos_token_id
            if bos is not None:
                known.append((bos,))
            self._known = sorted(set(known), key=len, reverse=True)
        return self._known

    def _prefix_hook(self, cell: dict):
        """Forward pre-hook on the model: before a prefill, find the known prefix the input starts with."""
        known = [] if self.config.train_prefix else self.known_prefixes()

        def find_start(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            past = kwargs.get("past_key_values")
            cell["start"] = 0
            if ids is None or (past is not None and past.get_seq_length() > 0):
                return None  # a decode step (or embeddings given): every position is new
            for prefix in known:
                n = len(prefix)
                if ids.shape[1] >= n and all(ids[:, :n].eq(torch.tensor(prefix, device=ids.device)).all(dim=1)):
                    cell["start"] = n
                    break
            return None

        return find_start

    @contextmanager
    def _scope(self, *, gate: bool = False, sparse: bool = False, record: dict | None = None,
               skip_prefix: bool = False) -> Iterator[None]:
        """Memory hooks on every memory layer; ``skip_prefix`` (reading) leaves known prefixes untouched."""
        cell = {"start": 0} if skip_prefix else None
        specs = [("mlp", i, self._hook(i, gate=gate, sparse=sparse, record=record, cell=cell)) for i in self.layer_ids]
        handle = self.lm.model.register_forward_pre_hook(self._prefix_hook(cell), with_kwargs=True) if skip_prefix else None
        try:
            with hooks(self.lm.model, specs):
                yield
        finally:
            if handle is not None:
                handle.remove()

    @contextmanager
    def _activate(self, *, user_id: str | None, query: str | None) -> Iterator[Injection]:
        if not self.records:  # nothing stored: the pool is all zeros, skip the work
            yield Injection()
            return
        gate = bool(self.config.gate)
        if gate and not self.gate_trained:
            raise InputError("the relevance gate is on but has not been trained: call train_gate() or turn it off")
        self._gate_acc = {} if gate else None
        try:
            with self._scope(gate=gate, skip_prefix=True):
                yield Injection()
        finally:
            acc, self._gate_acc = self._gate_acc, None
            if acc:
                by_layer = {str(k): v[0] / max(1, v[1]) for k, v in sorted(acc.items())}
                self._last_gate = {"mean": sum(v[0] for v in acc.values()) / max(1, sum(v[1] for v in acc.values())),
                                   "open": sum(v[2] for v in acc.values()) / max(1, sum(v[1] for v in acc.values())),
                                   "by_layer": by_layer}
            elif not gate:
                self._last_gate = None

    # ------------------------------------------------------------------ facts -> items
    def _items(self, facts: Sequence[Fact], *, augment: bool = False) -> tuple[list[Item], int]:
        """Training items of ``facts``: each fact's own prompt, and with ``augment`` its other phrasings
        (:func:`~.augment.phrasings`); returns them and the count of augmentation templates that did not apply."""
        cfg: PKMConfig = self.config
        prefix = chat_prefix(self.lm, cfg.system)
        items, skipped = [], 0
        for i, fact in enumerate(facts):
            aug = phrasings(fact, cfg.phrasings if augment else 1)
            skipped += aug.skipped
            for p in aug.items:
                it = encode_fact(self.lm, Fact(p.prompt, p.answer, fact.id, p.chat), system=cfg.system, prefix=prefix,
                                 train_prefix=cfg.train_prefix)
                it.index, it.fact, it.kind = len(items), i, p.kind
                if len(it.ids) > self.lm.max_context:
                    raise InputError(f"fact {fact.id!r} needs {len(it.ids)} tokens, more than the model's window")
                items.append(it)
        return items, skipped

    def _cache(self, items: Sequence[Item], prefixes: PrefixCache, *, fast: bool = False) -> None:
        """Cache the residual entering the lowest memory layer of every item. ``fast``: phrasings other than a
        fact's own prompt are computed under the training autocast (half the time of float32 on CPU; they are
        trained and checked under it anyway), own prompts in the model's dtype (their recall must be exact)."""
        pad = self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0
        dtype = torch.float32 if self.config.cache_dtype == "float32" else torch.bfloat16
        cast = [it for it in items if it.kind != "own prompt"] if fast and self._cast_dtype() is not None else []
        if cast:
            with self._autocast():
                cache_items(self.lm.model, cast, self.lowest_layer, pad_id=pad, dtype=dtype, prefixes=prefixes)
        skip = {id(it) for it in cast}
        cache_items(self.lm.model, [it for it in items if id(it) not in skip], self.lowest_layer, pad_id=pad,
                    dtype=dtype, prefixes=prefixes)

    @torch.no_grad()
    def _calibrate(self, items: Sequence[Item]) -> None:
        """Router input statistics from the model's own MLP inputs (facts and built-in general text)."""
        seqs = [it.ids for it in items[:_CALIBRATION_FACTS]]
        seqs += [self.lm.chat_ids(build_messages(q, system=self.config.system))[0].tolist() for q in GENERAL_QUESTIONS]
        bos = [self.lm.tokenizer.bos_token_id] if self.lm.tokenizer.bos_token_id is not None else []
        seqs += [bos + self.lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in NEUTRAL_TEXTS]
        with self._autocast():
            grabbed = self._mlp_inputs(seqs)
        for i in self.layer_ids:
            self.layers[str(i)].calibrate(torch.cat(grabbed[i]))
        self.calibrated = True

    @torch.no_grad()
    def _mlp_inputs(self, seqs: Sequence[Sequence[int]], *, memory: bool = False) -> dict[int, list[torch.Tensor]]:
        """MLP inputs (normalised when ``memory``) at every memory layer for every real token of ``seqs``.

        With ``memory`` the memory is on (gate off) and the normalised inputs z are returned; the forward
        stops after the top memory layer.
        """
        model = self.lm.model
        device = self.lm.device
        out: dict[int, list[torch.Tensor]] = {i: [] for i in self.layer_ids}
        top = self.layer_ids[-1]
        for chunk in _token_batches(seqs, rows=16, tokens=_STEP_TOKENS):
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            valid = torch.zeros(len(chunk), width, dtype=torch.bool)
            for b, s in enumerate(chunk):
                ids[b, : len(s)] = torch.tensor(s, device=device)
                valid[b, : len(s)] = True
            grabbed: dict[int, torch.Tensor] = {}

            def make(i):
                def grab(module, args, kwargs, output):
                    x = args[0] if args else next(iter(kwargs.values()))
                    grabbed[i] = x.detach().float().reshape(-1, x.shape[-1])
                    if i == top:
                        raise _Stop
                return grab

            specs = [("mlp", i, make(i)) for i in self.layer_ids]
            with model_step(), hooks(model, specs):
                try:
                    if memory:
                        with self._scope(skip_prefix=True):
                            model(input_ids=ids, use_cache=False)
                    else:
                        model.base_model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
            keep = valid.reshape(-1).to(device)
            for i in self.layer_ids:
                x = grabbed[i]
                out[i].append((self.layers[str(i)].normalise(x) if memory else x)[keep].cpu())
        return out

    # ------------------------------------------------------------------ add
    def _facts_of(self, facts: list[Fact]) -> tuple[list[Fact], int, int]:
        """Plain sentences that state an entity's attribute become entity / relation / value facts (trained with
        the sentence itself among their phrasings) when facts are augmented; answers over the limit are refused.
        Returns the facts and how many sentences became facts or stay text."""
        cfg: PKMConfig = self.config
        out, as_facts, as_text = [], 0, 0
        for f in facts:
            n = len(self.lm.tokenizer(f.answer, add_special_tokens=False)["input_ids"])
            if n > cfg.max_answer_tokens:
                raise InputError(f"fact {f.prompt[:60]!r}: its answer has {n} tokens, more than max_answer_tokens="
                                 f"{cfg.max_answer_tokens} (store long texts in an activation memory)")
            if f.chat:
                out.append(f)
                continue
            made = fact_of_sentence(f.sentence) if cfg.phrasings > 1 else None
            as_facts += made is not None
            as_text += made is None
            out.append(f if made is None else Fact(made.prompt, made.answer, made.id, True, made.paraphrases,
                                                   made.sentence, {**made.meta, "said": [f.prompt, f.answer]}))
        return out, as_facts, as_text

    def add(self, texts, *, user_id: str | None = None, metadata: dict[str, Any] | None = None,
            progress=None) -> Receipt:
        """Store facts (any form :func:`~nativemem.memories.pkm.facts.parse_facts` accepts) and train them in.

        Raises:
            InputError: no facts, an empty answer, a malformed fact, or more facts than the pool holds
                (checked before any training).
        """
        start = time.perf_counter()
        cfg: PKMConfig = self.config
        facts, as_facts, as_text = self._facts_of(parse_facts(texts))
        notes: list[str] = []
        # duplicates: the later fact with the same prompt wins
        latest: dict[str, Fact] = {}
        conflicts = repeats = 0
        for f in facts:
            prev = latest.get(f.key)
            if prev is not None:
                conflicts += prev.answer != f.answer
                repeats += prev.answer == f.answer
            latest[f.key] = f
        stored_by_key = {_key(r): fid for fid, r in self.records.items()}
        new: list[Fact] = []
        replaced: list[str] = []
        already = 0
        for key, f in latest.items():
            old = stored_by_key.get(key)
            if old is not None and self.records[old]["answer"] == f.answer:
                already += 1
                continue
            if old is not None:
                replaced.append(old)
            new.append(f)
        if conflicts:
            notes.append(f"{conflicts} fact(s) repeated a prompt with another answer in this call: the later answer wins")
        if repeats:
            notes.append(f"{repeats} exact duplicate(s) in this call were stored once")
        if already:
            notes.append(f"{already} fact(s) were already stored with the same answer")
        if replaced:
            notes.append(f"{len(replaced)} stored fact(s) got a new answer (the later one wins): {replaced[:5]}")
        if not new:
            return Receipt(self.kind, "add", notes=notes or ["nothing new to store"],
                           elapsed_s=time.perf_counter() - start)
        total = len(self.records) - len(replaced) + len(new)
        if total > self.max_facts:
            raise InputError(
                f"the pool has {self.num_slots:,} slots, room for {self.max_facts:,} facts at {cfg.slots_per_fact} slots "
                f"per fact, but {total:,} facts were requested: create the memory with a larger num_keys "
                f"(num_keys={_keys_for(total, cfg.slots_per_fact)} holds {total:,}) or fewer facts")
        for old in replaced:
            self.records.pop(old)
            self.signatures.pop(old, None)

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        items, skipped = self._items(new, augment=True)
        if not self.calibrated:
            self._calibrate(items)
        timings["calibrate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefixes = PrefixCache(self.lm.model)
        self._cache(items, prefixes, fast=True)
        timings["cache_s"] = time.perf_counter() - t0
        gate_facts = range(len(new))  # whose phrasings the gate opens on: their inputs come from the final check
        if cfg.gate_auto and len(new) > _GATE_FACTS:
            gate_facts = random.Random(cfg.seed).sample(range(len(new)), _GATE_FACTS)
        chosen = set(gate_facts) if cfg.gate_auto else set()
        gate_items = {it.index for it in items if it.fact in chosen}
        result = self._train(items, prefixes, progress=progress, gate_items=gate_items)
        timings["train_s"] = result.train_s
        timings["eval_s"] = result.eval_s
        own = torch.tensor([it.kind == "own prompt" for it in items])
        recall = float((result.margins[own] > 0).float().mean()) if result.margins is not None else 0.0
        if result.stopped.startswith("non-finite"):
            notes.append(f"training stopped: {result.stopped}")
        elif recall < 1.0:
            notes.append(f"recall {recall:.3f} on the new facts after {result.epochs} epochs "
                         f"(max_epochs={cfg.max_epochs}); add them again to train the missed ones further")

        # record the facts and the rows their phrasings read most (for delete)
        sigs = result.signatures
        for n, f in enumerate(new):
            self.records[f.id] = {**f.to_dict(), "user_id": user_id, "metadata": metadata or {}, "created": time.time()}
            self.signatures[f.id] = torch.unique(torch.cat([sigs[it.index] for it in items if it.fact == n]))
        details: dict[str, Any] = {
            "recall": recall, "recall_phrasings": result.recall, "facts": len(new), "phrasings": cfg.phrasings,
            "phrasing_recall_target": cfg.phrasing_recall,
            "trained_phrasings": len(items), "augmentation": {k: sum(it.kind == k for it in items) for k in KINDS},
            "templates_skipped": skipped, "sentences_as_facts": as_facts, "sentences_as_text": as_text,
            "epochs": result.epochs, "exposures_per_fact": result.exposures,
            "epoch_active": result.epoch_active, "epoch_losses": result.epoch_losses, "stopped": result.stopped,
            "epoch_missed": result.epoch_missed, "epoch_share": [round(x, 4) for x in result.epoch_share],
            "polished": result.polished, "replaced": replaced, "slots_used": self.slots_used(),
            "slots": self.num_slots, **timings}
        if cfg.gate_auto and not result.stopped.startswith("non-finite"):
            t0 = time.perf_counter()
            details["gate"] = self.train_gate(positives=(result.gate_inputs, {new[n].id for n in gate_facts}))
            if cfg.gate:  # what the memory answers with: recall of the facts' own prompts through the gate
                margins = evaluate_items(self.lm.model, [it for it, o in zip(items, own) if o], self.lowest_layer,
                                         prefixes, lambda: self._scope(gate=True))
                details["recall_gated"] = float((margins > 0).float().mean())
            details["gate_s"] = time.perf_counter() - t0
        tokens = sum(len(it.ids) for it in items)
        return Receipt(self.kind, "add", ids=[f.id for f in new], tokens=tokens,
                       bytes_written=self.slots_used() * self.values.shape[1] * 4, layers=list(self.layer_ids),
                       steps=result.steps, final_loss=result.final_loss, elapsed_s=time.perf_counter() - start,
                       notes=notes, details=details)

    def _cast_dtype(self) -> torch.dtype | None:
        """The dtype of the frozen backbone's matmuls in training: bf16 when configured and the model is float32."""
        if self.config.train_autocast == "bfloat16" and self.lm.dtype == torch.float32:
            return torch.bfloat16
        return None

    def _autocast(self):
        """Autocast to :meth:`_cast_dtype` when there is one, else nothing."""
        dtype = self._cast_dtype()
        return torch.autocast(self.lm.device.type, dtype=dtype) if dtype is not None else _null_scope()

    def _trainable(self) -> tuple[list[nn.Parameter], list[torch.optim.Optimizer]]:
        cfg: PKMConfig = self.config
        params: list[nn.Parameter] = [self.values]
        if "pool" not in self._optimizers:
            self._optimizers["pool"] = (RowAdam([self.values], lr=cfg.lr)
                                        if cfg.pool_optimizer == "sparse_adam"
                                        else torch.optim.Adam([self.values], lr=cfg.lr))
        dense: list[nn.Parameter] = []
        for layer in self.layers.values():
            if cfg.train_router:
                dense += [layer.query.weight, layer.keys]
            if cfg.train_projections:
                dense += [layer.gate_proj.weight, layer.out_proj.weight]
        if dense and "dense" not in self._optimizers:
            self._optimizers["dense"] = torch.optim.Adam(dense, lr=cfg.projection_lr)
        opts = [self._optimizers["pool"]] + ([self._optimizers["dense"]] if dense else [])
        return params + dense, opts

    def _train(self, items: Sequence[Item], prefixes: PrefixCache, progress=None, loss_hook=None,
               gate_items: set[int] = frozenset()):
        """Train the items in (bf16 autocast if configured), then polish in float32 what the final check missed;
        the final check also records the gate's open examples at the items in ``gate_items`` (indices)."""
        cfg: PKMConfig = self.config
        params, opts = self._trainable()
        sparse = cfg.pool_optimizer == "sparse_adam"
        autocast = self._cast_dtype()
        common = dict(memory_scope=lambda: self._scope(sparse=sparse), optimizers=opts, params=params,
                      batch_size=cfg.batch_size, margin=cfg.margin, max_grad_norm=cfg.max_grad_norm,
                      recheck_every=cfg.recheck_every, progress=progress, loss_hook=loss_hook)
        for p in params:
            p.requires_grad_(True)
        own = torch.tensor([it.kind == "own prompt" for it in items])
        sigs: list[torch.Tensor] = []
        gate_inputs: dict[int, list[torch.Tensor]] = {}

        def check(batch: Sequence[Item]) -> torch.Tensor:  # the final pass: margins, rows read, gate inputs
            own_prompts = [it.kind == "own prompt" for it in batch]
            margins, rows, z = self._check(batch, prefixes, gate_items, exact=own_prompts)
            sigs[:] = rows
            gate_inputs.clear()
            gate_inputs.update(z)
            return margins

        def unmet(margins: torch.Tensor) -> tuple[list[Item], torch.Tensor, float]:
            """What the float32 check says still needs training: the missed items, which of them are required,
            and the share of them that meets the rule once recalled (missed own prompts, and the missed
            phrasings while the share is not met)."""
            enough = recalled_enough(margins, cfg.phrasing_recall, own)
            missed = [(it, bool(o)) for it, m, o in zip(items, margins, own) if m <= 0 and (o or not enough)]
            need = math.ceil(cfg.phrasing_recall * len(items) - 1e-9) - int((margins > 0).sum())
            must = sum(o for _, o in missed)
            share = min(1.0, max(need, must, 1) / max(1, len(missed)))
            return [it for it, _ in missed], torch.tensor([o for _, o in missed], dtype=torch.bool), share

        try:
            with frozen(self.lm.model):
                # with a share below 1, a few own prompts still missed are left to the float32 polish below
                result = train_items(self.lm.model, items, self.lowest_layer, prefixes, max_epochs=cfg.max_epochs,
                                     seed=cfg.seed + len(self.records), autocast=autocast, share=cfg.phrasing_recall,
                                     required=own, slack=int(_POLISH_SLACK * int(own.sum())), final_check=check,
                                     **common)
                # the loop stops on margins measured during training (bf16, before each step); the final float32
                # check may still miss a few facts: train those in float32 until the check passes
                missed, required, share = unmet(result.margins)
                rounds = 0
                while missed and rounds < 5 and result.epochs < cfg.max_epochs and not result.stopped.startswith(
                        "non-finite"):
                    rounds += 1
                    polish = train_items(self.lm.model, missed, self.lowest_layer, prefixes,
                                         max_epochs=cfg.max_epochs - result.epochs, seed=cfg.seed + rounds,
                                         share=share, required=required, **common)
                    result.steps += polish.steps
                    result.epochs += polish.epochs
                    result.epoch_active += polish.epoch_active
                    result.epoch_losses += polish.epoch_losses
                    result.epoch_missed += polish.epoch_missed
                    result.epoch_share += polish.epoch_share
                    result.final_loss = polish.final_loss if polish.final_loss is not None else result.final_loss
                    result.exposures += polish.exposures * len(missed) / len(items)
                    result.train_s += polish.train_s
                    result.polished += len(missed)
                    if polish.stopped.startswith("non-finite"):
                        result.stopped = polish.stopped
                    # measure again in float32 the polished items and every own prompt; the other phrasings keep
                    # the margins, rows read and gate inputs of the full pass (a few dozen polished facts barely
                    # move them, and a second full float32 pass cost about 9 % of a 1,000-fact add)
                    t0 = time.perf_counter()
                    polished = {id(it) for it in missed}
                    again = [i for i, it in enumerate(items) if own[i] or id(it) in polished]
                    margins, rows, _ = self._check([items[i] for i in again], prefixes)
                    result.margins[again] = margins
                    for i, r in zip(again, rows):
                        sigs[i] = r
                    result.eval_s += polish.eval_s + time.perf_counter() - t0
                    missed, required, share = unmet(result.margins)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        result.signatures = sigs
        result.gate_inputs = gate_inputs
        return result

    @torch.no_grad()
    def _check(self, items: Sequence[Item], prefixes: PrefixCache, gate_items: set[int] = frozenset(),
               exact: Sequence[bool] | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor], dict[int, list[torch.Tensor]]]:
        """One pass over ``items`` (gate off): their margins, per item the sorted unique slots read as top-1 of
        each head at its tokens over every layer (what delete looks at), and per memory layer the normalised MLP
        inputs (bfloat16) at every token but the last of the items in ``gate_items`` (indices): the gate's open
        examples (:meth:`_gate_positives`). With ``exact`` (a flag per item) the flagged items are measured in
        float32 and the others under the training autocast, on weights cast once (a third faster on CPU; the
        share of phrasings recalled needs no float32 exactness, a fact's own prompt does)."""
        sigs: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(items)
        z_out: dict[int, list[torch.Tensor]] = {i: [] for i in self.layer_ids}
        rec: dict = {"idx": {}, "z": {}}
        where = {id(it): p for p, it in enumerate(items)}

        def take(chunk: list[Item]) -> None:
            for b, it in enumerate(chunk):
                parts = [rec["idx"][i][0][b, : it.span_len, :, 0].reshape(-1) for i in self.layer_ids]
                sigs[where[id(it)]] = torch.unique(torch.cat(parts)).cpu()
            keep = _open_tokens(chunk, [it.index in gate_items for it in chunk])
            if keep.any():
                for i in self.layer_ids:
                    z_out[i].append(rec["z"][i][0][keep.reshape(-1).to(self.lm.device)].to(torch.bfloat16).cpu())
            rec["idx"].clear()
            rec["z"].clear()

        def measure(part: list[int], weights: CastWeights | None) -> torch.Tensor:
            return evaluate_items(self.lm.model, [items[i] for i in part], self.lowest_layer, prefixes,
                                  lambda: self._scope(record=rec), on_batch=take, weights=weights)

        margins = torch.empty(len(items))
        dtype = self._cast_dtype()
        fast = [] if exact is None or dtype is None else [i for i, e in enumerate(exact) if not e]
        if fast:
            with self._autocast():
                margins[fast] = measure(fast, CastWeights.of(self.lm.model, self.lowest_layer, dtype))
        slow = sorted(set(range(len(items))) - set(fast))
        if slow:
            margins[slow] = measure(slow, None)
        return margins, sigs, z_out

    # ------------------------------------------------------------------ gate
    def add_gate_examples(self, negatives: Sequence[str] = (), questions: Sequence[str] = ()) -> None:
        """Keep closed-set examples for every later gate training (``add``'s included; saved with the memory):
        neutral texts, and general questions asked in the chat format. Repeats are kept once."""
        for key, texts in (("negatives", negatives), ("questions", questions)):
            if isinstance(texts, str):
                raise InputError(f"{key} must be a list of strings, not one string")
            have = set(self.gate_examples[key])
            for t in texts:
                if not isinstance(t, str) or not t.strip():
                    raise InputError(f"{key} must be non-empty strings, got {t!r}")
                if t not in have:
                    self.gate_examples[key].append(t)
                    have.add(t)

    def train_gate(self, negatives: Sequence[str] = (), questions: Sequence[str] = (), *,
                   positives: tuple[dict[int, list[torch.Tensor]], set[str]] | None = None,
                   max_facts: int = _GATE_FACTS) -> dict[str, Any]:
        """Train the per-layer relevance gates (backbone and memory frozen); see :mod:`.gate`.

        Open examples: every token but the last of every phrasing of up to ``max_facts`` stored facts (a sample
        when more are stored). Closed examples: the built-in neutral texts and general questions, and those kept
        by :meth:`add_gate_examples`.

        Args:
            negatives: extra neutral texts the gate should stay closed on (kept for later trainings too).
            questions: extra general questions (asked in the chat format) it should stay closed on (kept too).
            positives: open examples already measured (``add`` passes those its final check recorded) and the
                ids of the facts they cover; the other stored facts fill the rest of ``max_facts``.
            max_facts: cap on stored facts used as open examples.

        Returns:
            per layer: final loss and open rates on open and closed tokens; plus token counts.
        """
        if not self.records:
            raise InputError("no facts stored: nothing to train the gate on")
        cfg: PKMConfig = self.config
        self.add_gate_examples(negatives, questions)
        pos, covered = positives if positives is not None else ({}, set())
        pos = {i: list(pos.get(i, [])) for i in self.layer_ids}
        others = [r for fid, r in self.records.items() if fid not in covered]
        room = max(0, max_facts - len(covered & set(self.records)))
        if others and room:
            if len(others) > room:
                others = random.Random(cfg.seed).sample(others, room)
            items, _ = self._items([_fact_of(r) for r in others], augment=True)
            prefixes = PrefixCache(self.lm.model)
            self._cache(items, prefixes, fast=True)
            for i, z in self._gate_positives(items, prefixes).items():
                pos[i] += z
        negatives, questions = self.gate_examples["negatives"], self.gate_examples["questions"]
        bos = [self.lm.tokenizer.bos_token_id] if self.lm.tokenizer.bos_token_id is not None else []
        seqs = [bos + self.lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (*NEUTRAL_TEXTS, *negatives)]
        seqs = [s[: self.lm.max_context] for s in seqs]
        seqs += [self.lm.chat_ids(build_messages(q, system=cfg.system))[0].tolist() for q in (*GENERAL_QUESTIONS, *questions)]
        with self._autocast():
            neg = self._mlp_inputs(seqs, memory=True)
        report: dict[str, Any] = {}
        for n, i in enumerate(self.layer_ids):
            zp, zn = torch.cat(pos[i]).float(), torch.cat(neg[i])
            z = torch.cat([zp, zn]).to(self.lm.device)
            labels = torch.cat([torch.ones(len(zp)), torch.zeros(len(zn))]).to(self.lm.device)
            gate = self.gates[str(i)]
            for p in gate.parameters():
                p.requires_grad_(True)
            try:
                report[str(i)] = fit_gate(gate, z, labels, steps=cfg.gate_steps, lr=cfg.gate_lr, seed=cfg.seed + n)
            finally:
                for p in gate.parameters():
                    p.requires_grad_(False)
        report["open_tokens"] = int(sum(len(t) for t in pos[self.layer_ids[0]]))
        report["closed_tokens"] = int(sum(len(t) for t in neg[self.layer_ids[0]]))
        self.gate_trained = True
        return report

    def _gate_positives(self, items: Sequence[Item], prefixes: PrefixCache) -> dict[int, list[torch.Tensor]]:
        """The gate's open examples of ``items`` (indexed 0..n-1): :meth:`_check`'s pass under bf16 autocast when
        configured (gate inputs need no float32 exactness)."""
        with self._autocast():
            return self._check(items, prefixes, {it.index for it in items})[2]

    # ------------------------------------------------------------------ delete
    def delete(self, memory_id: str, *, max_steps: int = 200, retain: int = 64) -> Receipt:
        """Unlearn one fact and verify it (see the module docstring).

        The pool rows the fact reads (all its top-k slots) are retrained, and only those rows: a KL loss pulls
        the model's distribution on the fact's answer tokens to the model's without memory, and the answer
        loss keeps ``retain`` stored facts (three quarters: those sharing most rows with it; the rest drawn at
        random, as a check on everything else) recalled. Training
        stops once the fact is back at the no-memory level (recalled exactly when the model without memory
        recalls it; when it does not, the answer must lose by ``margin`` logits) and every retained fact that
        was recalled still is. The receipt also says whether the argmax agrees with the model without memory
        at every answer token.
        """
        start = time.perf_counter()
        if memory_id not in self.records:
            return Receipt(self.kind, "delete", notes=[f"no fact with id {memory_id!r}"])
        rec = self.records.pop(memory_id)
        sig = self.signatures.pop(memory_id, torch.empty(0, dtype=torch.long))
        overlap = sorted(((int(torch.isin(s, sig).sum()), fid) for fid, s in self.signatures.items()), reverse=True)
        keep_ids = [fid for n, fid in overlap[: retain * 3 // 4] if n > 0]  # the facts sharing most rows ...
        rest = [fid for fid in self.records if fid not in set(keep_ids)]
        keep_ids += random.Random(len(self.records)).sample(rest, min(len(rest), retain - len(keep_ids)))  # ... and others
        # every phrasing the fact was trained under is unlearned; the retained facts are checked in their own
        targets, _ = self._items([_fact_of(rec)], augment=True)
        others, _ = self._items([_fact_of(self.records[fid]) for fid in keep_ids])
        prefixes = PrefixCache(self.lm.model)
        self._cache(targets + others, prefixes)
        model = self.lm.model
        with torch.no_grad():
            bare_logits, bare_tgt, bare_own = _forward_all(model, targets, self.lowest_layer, prefixes, _null_scope)
            bare_top = bare_logits.argmax(-1)
            bare_recalled = fact_margins(bare_logits, bare_tgt, bare_own, len(targets)) > 0
            rows = self._rows_read(targets, prefixes)
        memory_scope = lambda: self._scope()  # noqa: E731
        before_t = evaluate_items(model, targets, self.lowest_layer, prefixes, memory_scope)
        before_o = evaluate_items(model, others, self.lowest_layer, prefixes, memory_scope) if others else torch.empty(0)
        opt = RowAdam([self.values], lr=self.config.lr)
        log_bare = F.log_softmax(bare_logits, -1)
        steps, rng = 0, random.Random(0)
        agree, done, slipped = False, False, []
        self.values.requires_grad_(True)
        try:
            with frozen(model):
                for steps in range(max_steps + 1):
                    with torch.no_grad():
                        logits, tgt, own = _forward_all(model, targets, self.lowest_layer, prefixes, memory_scope)
                        agree = bool((logits.argmax(-1) == bare_top).all())
                        m_now = fact_margins(logits, tgt, own, len(targets))
                        # back at the no-memory level: each phrasing recalled exactly when the bare model recalls it
                        done = bool(torch.where(bare_recalled, m_now > 0, m_now < -self.config.margin).all())
                        slipped = []
                        if done and others:  # only then check the neighbours (the costly part)
                            after_o = evaluate_items(model, others, self.lowest_layer, prefixes, memory_scope)
                            slipped = [o for o, b, a in zip(others, before_o, after_o) if b > 0 >= a]
                    if (done and not slipped) or steps == max_steps:
                        break
                    batch_o = slipped[:15] or rng.sample(others, min(len(others), 7))
                    with torch.enable_grad():
                        lt, _, _ = _forward_all(model, targets, self.lowest_layer, prefixes,
                                                lambda: self._scope(sparse=True))
                        loss = F.kl_div(F.log_softmax(lt, -1), log_bare, log_target=True, reduction="batchmean")
                        if batch_o:
                            lo, to, _ = forward_answers(model, batch_o, self.lowest_layer, prefixes,
                                                        lambda: self._scope(sparse=True))
                            loss = loss + F.cross_entropy(lo, to)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    g = self.values.grad.coalesce()
                    keep_rows = torch.isin(g.indices()[0], rows)  # only the rows the deleted fact reads move
                    self.values.grad = torch.sparse_coo_tensor(g.indices()[:, keep_rows], g.values()[keep_rows],
                                                               g.shape, check_invariants=False)
                    opt.step()
        finally:
            self.values.requires_grad_(False)
            self.values.grad = None
        after_t = evaluate_items(model, targets, self.lowest_layer, prefixes, memory_scope)
        after_o = evaluate_items(model, others, self.lowest_layer, prefixes, memory_scope) if others else torch.empty(0)
        recalled_after = bool(after_t[0] > 0)
        unlike = int(((after_t > 0) != bare_recalled).sum())
        notes = [] if not unlike else [
            f"after {steps} steps {unlike} of the {len(targets)} phrasings of {memory_id!r} answer unlike the model "
            "without memory"]
        if slipped:
            notes.append(f"{len(slipped)} fact(s) sharing rows with it lost recall")
        details = {"recalled_before": bool(before_t[0] > 0), "recalled_after": recalled_after,
                   "recalled_without_memory": bool(bare_recalled[0]), "phrasings": len(targets),
                   "phrasings_recalled_before": int((before_t > 0).sum()),
                   "phrasings_recalled_after": int((after_t > 0).sum()),
                   "agrees_with_no_memory": agree, "margin_before": float(before_t[0]), "margin_after": float(after_t[0]),
                   "retained_facts": len(others), "retained_recall_before": _rate(before_o),
                   "retained_recall_after": _rate(after_o), "rows_retrained": int(rows.numel())}
        return Receipt(self.kind, "delete", ids=[memory_id], steps=steps, elapsed_s=time.perf_counter() - start,
                       notes=notes, details=details)

    @torch.no_grad()
    def _rows_read(self, items: Sequence[Item], prefixes: PrefixCache) -> torch.Tensor:
        """Every pool row the items read (all top-k slots of every head at their tokens, every layer)."""
        out = []
        for group in _by_prefix(items):
            rec: dict = {"idx": {}}
            forward_answers(self.lm.model, group, self.lowest_layer, prefixes, lambda: self._scope(record=rec))
            for b, it in enumerate(group):
                out += [rec["idx"][i][0][b, : it.span_len].reshape(-1) for i in self.layer_ids]
        return torch.unique(torch.cat(out))

    # ------------------------------------------------------------------ the lifecycle (RecordLifecycle)
    def _records(self) -> list[dict[str, Any]]:
        return list(self.records.values())

    def _item(self, rec: dict[str, Any]) -> dict[str, Any]:
        """A fact as an export item: ``text`` is the fact in one line, ``fact`` what :meth:`add` trains again."""
        prompt, answer = str(rec["prompt"]), str(rec["answer"])
        text = f"{prompt} {answer}" if rec.get("chat", True) else prompt + answer
        return {"id": rec["id"], "user_id": rec.get("user_id") or "", "text": " ".join(text.split()),
                "source_id": None, "chunk_index": 0, "created": rec.get("created"), "seq": None,
                "metadata": rec.get("metadata") or {},
                "fact": {"prompt": prompt, "answer": answer, "chat": bool(rec.get("chat", True))}}

    def _import(self, items: list[dict[str, Any]]) -> Receipt:
        """Train the items in at once (facts as they were; plain texts through :func:`parse_facts`), then give
        each its owner, time and metadata back. Ids are kept for facts; a text may make several facts."""
        facts, owner = [], {}
        for item in items:
            fact = item.get("fact")
            if fact is not None:
                made = [Fact(str(fact["prompt"]), str(fact["answer"]), str(item["id"]), bool(fact.get("chat", True)))]
            else:
                made = parse_facts(item["text"])
            facts.extend(made)
            for f in made:
                owner[f.id] = item
        receipt = self.add(facts)
        for fid in receipt.ids:
            item = owner.get(fid)
            if item is not None and fid in self.records:
                self.records[fid].update(user_id=item.get("user_id") or None, metadata=item.get("metadata") or {},
                                         created=item.get("created") or time.time())
        return receipt

    # ------------------------------------------------------------------ recall checks
    def recall(self, facts: Sequence[Fact] | None = None) -> torch.Tensor:
        """Margins (n,) of facts (default: every stored fact) with the memory as configured now (gate on or off).

        A fact is recalled by greedy decoding exactly when its margin is > 0.
        """
        if facts is None:
            facts = [Fact(r["prompt"], r["answer"], r["id"], r["chat"]) for r in self.records.values()]
        items, _ = self._items(facts)
        prefixes = PrefixCache(self.lm.model)
        self._cache(items, prefixes)
        gate = bool(self.config.gate) and self.gate_trained
        return evaluate_items(self.lm.model, items, self.lowest_layer, prefixes, lambda: self._scope(gate=gate))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        used = (self.values.detach() != 0).any(dim=1).nonzero().squeeze(1)
        state = {"pkm_values_index": used.cpu(), "pkm_values_rows": self.values.detach()[used].cpu()}
        state.update({f"pkm_layers.{k}": v for k, v in self.layers.state_dict().items()})
        state.update({f"pkm_gates.{k}": v for k, v in self.gates.state_dict().items()})
        ids = list(self.records)
        sigs = [self.signatures.get(i, torch.empty(0, dtype=torch.long)) for i in ids]
        state["pkm_signature_offsets"] = torch.tensor([0] + [len(s) for s in sigs]).cumsum(0)
        state["pkm_signatures"] = torch.cat(sigs).to(torch.int32) if sigs else torch.empty(0, dtype=torch.int32)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise MemoryFormatError(f"pkm tensors do not match the config: missing {missing[:4]}, unexpected {extra[:4]}")
        idx, rows = state["pkm_values_index"].long(), state["pkm_values_rows"]
        if rows.shape[1:] != self.values.shape[1:] or (idx.numel() and int(idx.max()) >= self.num_slots):
            raise MemoryFormatError(f"pkm value rows {tuple(rows.shape)} do not fit a pool of {tuple(self.values.shape)}")
        with torch.no_grad():
            self.values.zero_()
            self.values[idx.to(self.values.device)] = rows.to(self.values)
        for prefix, module in (("pkm_layers.", self.layers), ("pkm_gates.", self.gates)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self._offsets, self._flat_sigs = state["pkm_signature_offsets"].long(), state["pkm_signatures"].long()

    def extra_state(self) -> dict[str, Any]:
        return {"records": list(self.records.values()), "calibrated": self.calibrated, "gate_trained": self.gate_trained,
                "gate_examples": self.gate_examples}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.records = {r["id"]: r for r in state.get("records", [])}
        self.calibrated = bool(state.get("calibrated", False))
        self.gate_trained = bool(state.get("gate_trained", False))
        examples = state.get("gate_examples") or {}
        self.gate_examples = {k: [str(t) for t in examples.get(k, [])] for k in ("negatives", "questions")}
        offsets, flat = getattr(self, "_offsets", None), getattr(self, "_flat_sigs", None)
        if offsets is not None:
            if len(offsets) != len(self.records) + 1:
                raise MemoryFormatError("pkm signatures do not match the stored facts")
            self.signatures = {fid: flat[offsets[n]: offsets[n + 1]].clone() for n, fid in enumerate(self.records)}
            del self._offsets, self._flat_sigs


def _fact_of(rec: dict[str, Any]) -> Fact:
    """A stored record as the fact it was trained from (entity and relation kept, for its phrasings)."""
    return Fact(rec["prompt"], rec["answer"], rec["id"], rec["chat"], tuple(rec.get("paraphrases") or ()),
                rec.get("sentence") or "", dict(rec.get("meta") or {}))


def _open_tokens(chunk: Sequence[Item], chosen: Sequence[bool]) -> torch.Tensor:
    """(B, width) mask of the gate's open tokens in a batch of the cached path: every fact token but the last of
    the chosen items."""
    keep = torch.zeros(len(chunk), max(it.span_len for it in chunk), dtype=torch.bool)
    for b, (it, yes) in enumerate(zip(chunk, chosen)):
        if yes:
            keep[b, : it.span_len - 1] = True
    return keep


def _by_prefix(items: Sequence[Item]) -> list[list[Item]]:
    groups: dict[tuple[int, ...], list[Item]] = {}
    for it in items:
        groups.setdefault(it.prefix, []).append(it)
    return list(groups.values())


def _forward_all(model, items: Sequence[Item], lowest: int, prefixes: PrefixCache, scope):
    """:func:`forward_answers` over items of several prefixes (chat questions and completions): logits, targets
    and owners (the item's position in ``items``) in the order of ``items``."""
    order = {id(it): n for n, it in enumerate(items)}
    parts = []
    for group in sorted(_by_prefix(items), key=lambda g: order[id(g[0])]):
        logits, targets, owner = forward_answers(model, group, lowest, prefixes, scope)
        index = torch.tensor([order[id(it)] for it in group], device=owner.device)
        parts.append((logits, targets, index[owner]))
    return tuple(torch.cat(x) for x in zip(*parts))


@contextmanager
def _null_scope() -> Iterator[None]:
    yield


def _key(record: dict[str, Any]) -> str:
    return ("chat:" if record.get("chat", True) else "text:") + " ".join(record["prompt"].split())


def _keys_for(facts: int, slots_per_fact: int) -> int:
    n = 1
    while n * n < facts * slots_per_fact:
        n += 1
    return n


def _rate(margins: torch.Tensor) -> float | None:
    return float((margins > 0).float().mean()) if margins.numel() else None


def _token_batches(seqs: Sequence[Sequence[int]], *, rows: int, tokens: int) -> Iterator[list[Sequence[int]]]:
    """``seqs`` in order, in batches of at most ``rows`` sequences and ``tokens`` padded tokens (at least one)."""
    batch: list[Sequence[int]] = []
    for s in seqs:
        if batch and (len(batch) == rows or (len(batch) + 1) * max(len(s), *map(len, batch)) > tokens):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch
