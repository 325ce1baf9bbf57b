"""SideFFNMemory: Locas-GLU parametric memory (memorize + test-time training, fusable).

What ``add(text)`` does (our choice):

1. **memorize** when the memory has no neurons yet, or on every add when ``grow=True``: one forward
   pass without gradients over the first ``memorize_tokens`` tokens of the text; per layer the mean
   |act(gate)·up| of every backbone neuron; the gate and up rows of the chosen ``width`` neurons are
   cloned and L2-normalised; values start at zero (the memory is then an exact no-op).
2. **test-time training** over the whole text, window by window, scoring each window before training
   on it (:mod:`.ttt`). ``add`` adapts the window to short texts (a text shorter than one window is one
   window), so every add takes at least one step; :meth:`SideFFNMemory.train_stream` is the strict API
   where a text shorter than the window is an error.

The memory is shared by all users (``user_id`` is recorded, not used to scope reads). ``delete(id)``
removes the neurons an add appended; training that add did on older neurons is not undone (the
receipt says so).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import FingerprintMismatchError, InputError, MemoryFormatError
from ...hooks import hooks, output_hidden, replace_output_hidden
from ...text import check_text
from ...turns import model_step
from ..base import Injection, Memory, Receipt, RecordLifecycle
from .config import INIT_STRATEGIES, SideFFNConfig
from .fuse import fuse_model, unfuse_model
from .layer import GLUSite, SideFFNLayer, down_column_norm, glu_sites
from .ttt import StreamOptions, StreamResult, stream

__all__ = ["SideFFNMemory", "token_stream", "stream_options"]


def token_stream(lm, text: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Token ids (T,) of a text, BOS first when the tokenizer has one; ids are passed through."""
    if isinstance(text, (str, bytes)):
        text = check_text(text)
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = lm.tokenizer.bos_token_id
        ids = [bos, *ids] if bos is not None else ids
        return torch.tensor(ids, dtype=torch.long, device=lm.device)
    return torch.as_tensor(text, dtype=torch.long, device=lm.device).reshape(-1)


def stream_options(config: SideFFNConfig, *, n_targets: int | None = None, max_context: int | None = None,
                   **overrides) -> StreamOptions:
    """Streaming options from a config (``overrides`` that are not None win).

    With ``n_targets`` the window shrinks to the text (a short text is one window) and the context to
    what still fits ``max_context``: what ``add`` does.
    """
    opts = StreamOptions(window=config.window, context=config.context, steps=config.steps_per_window, lr=config.lr,
                         loss=config.loss, mix_weight=config.mix_weight, temperature=config.temperature,
                         teacher_context=config.teacher_context, max_grad_norm=config.max_grad_norm)
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(opts, key):
                raise InputError(f"unknown training option {key!r}")
            setattr(opts, key, value)
    if n_targets is not None:
        opts.window = min(opts.window, max(1, n_targets))
        opts.context = min(opts.context, max_context - opts.window)
    return opts


class SideFFNMemory(RecordLifecycle, Memory):
    """A side GLU FFN beside every chosen frozen MLP (see the module docstring)."""

    kind = "side_ffn"
    config_cls = SideFFNConfig
    param_prefix = "side_ffn_"
    supports_fuse = True

    def __init__(self, lm, config: SideFFNConfig | None = None, *, path=None):
        super().__init__(lm, config, path=path)
        cfg: SideFFNConfig = self.config
        self.sites: list[GLUSite] = glu_sites(lm.model, cfg.layers)
        m = self.sites[0].intermediate_size
        if cfg.width > m:
            raise InputError(f"width {cfg.width} is larger than the MLP's intermediate size {m}")
        self.ffn = nn.ModuleDict({
            str(s.layer): SideFFNLayer(s.hidden_size, s.act, down_column_norm(s) / cfg.width, device=lm.device)
            for s in self.sites})
        self.records: list[dict[str, Any]] = []  # one per add: id, user_id, tokens, steps, neurons [start, end)
        self.memorize_count = 0
        self._next_id = 0
        self._fused: list[Any] = []  # stack of in-place fuses (undo records)

    # ------------------------------------------------------------------ introspection
    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sites]

    @property
    def num_neurons(self) -> int:
        """Memory neurons per layer (equal in every memory layer)."""
        return self.ffn[str(self.sites[0].layer)].num_neurons

    @property
    def num_parameters(self) -> int:
        """Trainable memory parameters: 3 · layers · hidden · neurons."""
        return sum(p.numel() for p in self.ffn.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.ffn.parameters())

    def stats(self) -> dict[str, Any]:
        base = sum(p.numel() for p in self.lm.model.parameters()) - (self.num_parameters if self._fused else 0)
        return {**super().stats(), "items": len(self.records), "layers": len(self.sites),
                "neurons_per_layer": self.num_neurons, "parameters": self.num_parameters,
                "parameters_pct": 100.0 * self.num_parameters / base if base else 0.0,
                "tokens_trained": sum(r["tokens"] for r in self.records),
                "steps": sum(r["steps"] for r in self.records), "fused": bool(self._fused)}

    # ------------------------------------------------------------------ reading
    @contextmanager
    def _activate(self, *, user_id: str | None, query: str | None) -> Iterator[Injection]:
        if self._fused or self.num_neurons == 0:  # fused: the neurons are in the weights already
            yield Injection()
            return

        def make(ffn: SideFFNLayer) -> Callable:
            def add_memory(module, args, kwargs, output):
                x = args[0] if args else next(iter(kwargs.values()))
                return replace_output_hidden(output, output_hidden(output) + ffn(x))
            return add_memory

        with hooks(self.lm.model, [("mlp", s.layer, make(self.ffn[str(s.layer)])) for s in self.sites]):
            yield Injection()

    # learner protocol used by the streaming loop
    def student(self):
        return self.active(lm=self.lm)

    def teacher(self):
        return contextlib.nullcontext()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ffn.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.ffn.state_dict().items():
                v.copy_(snapshot[k])

    # ------------------------------------------------------------------ memorize
    def _ids(self, text: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
        return token_stream(self.lm, text)

    def activation_scores(self, text: str | torch.Tensor | Sequence[int], max_tokens: int | None = None
                          ) -> dict[int, torch.Tensor]:
        """Mean |act(gate)·up| per backbone neuron and layer over the text's tokens (one no-grad pass)."""
        ids = self._ids(text)[: max_tokens or self.config.memorize_tokens]
        ids = ids[: self.lm.max_context]
        sums: dict[int, torch.Tensor] = {}

        def make(layer: int) -> Callable:
            def grab(module, args, kwargs, output):
                x = args[0] if args else next(iter(kwargs.values()))  # (1, T, m): the input of down_proj
                sums[layer] = x.detach().float().abs().mean(dim=(0, 1))
            return grab

        with torch.inference_mode(), hooks(self.lm.model, [("down_proj", s.layer, make(s.layer)) for s in self.sites]):
            self.lm.model(input_ids=ids.unsqueeze(0), use_cache=False)
        return sums

    def memorize(self, text: str | torch.Tensor | Sequence[int], *, width: int | None = None,
                 init: str | None = None) -> Receipt:
        """Append ``width`` cloned neurons per layer, chosen from ``text`` by ``init`` (values zero).

        A memory that has neurons already grows. With the index strategies, neurons cloned before are
        not cloned again.

        Raises:
            InputError: width < 1 or larger than the neurons still available, unknown init.
        """
        start_time = time.perf_counter()
        width = self.config.width if width is None else width
        init = init or self.config.init
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"width must be a positive integer, got {width!r}")
        if init not in INIT_STRATEGIES:
            raise InputError(f"unknown init {init!r}; use one of {', '.join(INIT_STRATEGIES)}")
        m = self.sites[0].intermediate_size
        if width > m:
            raise InputError(f"width {width} is larger than the MLP's intermediate size {m}")
        gen = torch.Generator().manual_seed(self.config.seed + 1000 * self.memorize_count)
        scores = self.activation_scores(text) if init in ("highest", "lowest") else {}
        tokens = int(min(self._ids(text).numel(), self.config.memorize_tokens)) if scores else 0
        for site in self.sites:
            ffn = self.ffn[str(site.layer)]
            d = site.hidden_size
            if init == "random":
                gate = torch.randn(width, d, generator=gen)
                up = torch.randn(width, d, generator=gen)
                source = torch.full((width,), -1, dtype=torch.long)
            else:
                used = ffn.source[ffn.source >= 0].cpu()
                free = torch.ones(m, dtype=torch.bool)
                free[used] = False
                if int(free.sum()) < width:
                    raise InputError(f"width {width} is larger than the {int(free.sum())} neurons of layer "
                                     f"{site.layer} not cloned yet")
                candidates = free.nonzero().squeeze(1)
                if init == "random_index":
                    source = candidates[torch.randperm(candidates.numel(), generator=gen)[:width]]
                else:
                    s = scores[site.layer].cpu()[candidates]
                    order = torch.argsort(s, descending=init == "highest", stable=True)
                    source = candidates[order[:width]]
                gate = site.gate.weight.detach()[source.to(site.gate.weight.device)].float().cpu()
                up = site.up.weight.detach()[source.to(site.up.weight.device)].float().cpu()
            gate = gate / gate.norm(dim=1, keepdim=True).clamp_min(1e-12)
            up = up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ffn.append(gate, up, torch.zeros(width, d), source)
        self.memorize_count += 1
        return Receipt(self.kind, "memorize", tokens=tokens, layers=self.layers,
                       bytes_written=3 * width * self.sites[0].hidden_size * len(self.sites) * 4,
                       elapsed_s=time.perf_counter() - start_time,
                       details={"neurons_added": width, "init": init, "neurons_per_layer": self.num_neurons})

    # ------------------------------------------------------------------ training and scoring
    def _options(self, **overrides) -> StreamOptions:
        return stream_options(self.config, **overrides)

    def train_stream(self, text: str | torch.Tensor | Sequence[int], *, train: bool = True, progress=None,
                     loss_hook=None, **options) -> StreamResult:
        """Stream ``text`` window by window: score each window with the current memory, then train on it.

        Args:
            text: a text, or token ids (BOS first if the model uses one).
            train: False only scores (no steps).
            progress: called with (window record, number of windows) after each window.
            loss_hook: test hook, see :func:`.ttt.stream`.
            **options: window, context, steps, lr, loss, mix_weight, temperature, teacher_context,
                max_grad_norm, context_grad (None keeps the config's value).

        Raises:
            InputError: the text is shorter than one window, bad options, or no neurons to train.
        """
        self._check_trainable() if train else self._check_not_fused()
        opts = self._options(train=train, **options)
        ids = self._ids(text)
        if ids.numel() - 1 < opts.window:
            raise InputError(f"the text has {ids.numel() - 1} scorable tokens, shorter than one window of "
                             f"{opts.window} tokens (use a smaller window, or add() which adapts it)")
        return stream(self.lm.model, ids, self, opts, max_context=self.lm.max_context, progress=progress,
                      loss_hook=loss_hook)

    @torch.no_grad()
    def nll(self, text: str | torch.Tensor | Sequence[int], *, window: int | None = None,
            context: int | None = None) -> torch.Tensor:
        """Per-token NLL (float32, one per token after the first) of ``text`` with the memory, no training.

        Long texts are scored window by window with ``context`` preceding tokens, like the stream.
        """
        ids = self._ids(text)
        opts = stream_options(self.config, n_targets=ids.numel() - 1, max_context=self.lm.max_context, train=False,
                              window=window, context=context)
        return stream(self.lm.model, ids, self, opts, max_context=self.lm.max_context).token_nll

    # ------------------------------------------------------------------ the contract
    def record(self, result, *, first_neuron: int = 0, user_id: str | None = None,
               metadata: dict[str, Any] | None = None, text: str | None = None) -> str:
        """Log a training run (a :func:`stream` result over this memory) as an item; returns its id.

        ``add`` calls it; so should code that streams a text into the memory itself (e.g. the pg19 bench),
        so that the saved memory's ``stats()`` count the tokens and steps it was trained on. The item owns
        the neurons from ``first_neuron`` on (what ``delete`` removes); ``text`` (what was trained) is kept for
        export.
        """
        used = {r["id"] for r in self.records}
        item_id = f"{self.kind}-{self._next_id}"
        while item_id in used:  # an imported item may hold the next number
            self._next_id += 1
            item_id = f"{self.kind}-{self._next_id}"
        self._next_id += 1
        self.records.append({"id": item_id, "user_id": user_id, "metadata": metadata or {},
                             "tokens": result.tokens, "steps": result.steps,
                             "neurons": [first_neuron, self.num_neurons], "ppl_before_training": result.ppl,
                             "created": time.time(), **({"text": text} if text is not None else {})})
        return item_id

    # ------------------------------------------------------------------ the lifecycle (RecordLifecycle)
    def _records(self) -> list[dict[str, Any]]:
        return list(self.records)

    def _item(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"id": rec["id"], "user_id": rec.get("user_id") or "", "text": rec.get("text") or "",
                "source_id": None, "chunk_index": 0, "created": rec.get("created"), "seq": None,
                "metadata": rec.get("metadata") or {}, "tokens": rec.get("tokens")}

    def _import(self, items: list[dict[str, Any]]) -> Receipt:
        """Train each item's text in, in order, under its id, owner, time and metadata."""
        for n, item in enumerate(items):  # all checked before anything is trained
            if self._ids(check_text(item["text"], what=f"item {n}")).numel() < 2:
                raise InputError(f"item {n} ({item['id']!r}) has a single token: nothing to train on")
        receipt = Receipt(self.kind, "import")
        for item in items:
            one = self.add(item["text"], user_id=item.get("user_id") or None, metadata=item.get("metadata") or {})
            rec = self.records[-1]
            rec.update(id=str(item["id"]), created=item.get("created") or rec["created"])
            receipt.ids.append(rec["id"])
            receipt.tokens += one.tokens
            receipt.steps += one.steps
            receipt.notes += one.notes
        return receipt

    def add(self, texts: str | Sequence[str], *, user_id: str | None = None,
            metadata: dict[str, Any] | None = None, progress=None, **options) -> Receipt:
        """Memorize (first add, or every add with ``grow``) and train on each text; see the module docstring.

        ``options`` override the config's training options for this call (window, lr, steps, ...).
        """
        self._check_trainable()
        items = self._texts(texts)
        start_time = time.perf_counter()
        receipt = Receipt(self.kind, "add", layers=self.layers)
        losses = []
        for text in items:
            ids = self._ids(text)
            if ids.numel() < 2:
                raise InputError("the text has a single token: nothing to train on")
            first = self.num_neurons
            if first == 0 or self.config.grow:
                with model_step():
                    self.memorize(ids)
            opts = stream_options(self.config, n_targets=ids.numel() - 1, max_context=self.lm.max_context, **options)
            result = stream(self.lm.model, ids, self, opts, max_context=self.lm.max_context, progress=progress)
            item_id = self.record(result, first_neuron=first, user_id=user_id, metadata=metadata, text=text)
            receipt.ids.append(item_id)
            receipt.tokens += result.tokens
            receipt.steps += result.steps
            receipt.bytes_written += 3 * (self.num_neurons - first) * self.sites[0].hidden_size * len(self.sites) * 4
            if result.final_loss is not None:
                losses.append(result.final_loss)
            if result.stopped:
                receipt.notes.append(f"{item_id}: training stopped early: {result.stop_reason}")
            receipt.details.setdefault("items", []).append(
                {"id": item_id, "windows": len(result.windows), "total_windows": result.total_windows,
                 "window": opts.window, "ppl_scored_before_training": result.ppl, "stopped": result.stopped})
        receipt.final_loss = losses[-1] if losses else None
        receipt.details.update(neurons_per_layer=self.num_neurons, parameters=self.num_parameters)
        receipt.elapsed_s = time.perf_counter() - start_time
        return receipt

    def delete(self, memory_id: str) -> Receipt:
        """Remove the neurons that add ``memory_id`` appended (its training of older neurons stays)."""
        self._check_not_fused()
        rec = next((r for r in self.records if r["id"] == memory_id), None)
        if rec is None:
            return Receipt(self.kind, "delete", notes=[f"no item {memory_id!r}"])
        start, end = rec["neurons"]
        for ffn in self.ffn.values():
            ffn.remove(start, end)
        self.records.remove(rec)
        for r in self.records:  # later adds' neuron ranges shift down
            if r["neurons"][0] >= end:
                r["neurons"] = [r["neurons"][0] - (end - start), r["neurons"][1] - (end - start)]
        notes = [f"removed {end - start} neurons per layer"]
        if self.records:
            notes.append("training this add did on neurons of other adds is not undone")
        return Receipt(self.kind, "delete", ids=[memory_id], layers=self.layers, notes=notes)

    # ------------------------------------------------------------------ fuse
    def fuse(self, *, inplace: bool = False, into=None, safe: bool = True) -> nn.Module:
        """A stock transformers model with the memory neurons appended to every MLP.

        Args:
            inplace: widen ``lm.model`` itself (undo with :meth:`unfuse`); else a widened deep copy is
                returned and ``lm.model`` is untouched.
            into: a LanguageModel to fuse into instead of ``self.lm`` (must be the same model).
            safe: refuse to fuse non-finite weights.

        Raises:
            FingerprintMismatchError: ``into`` (or a model the memory was not built for) differs.
            InputError: the memory is empty.
        """
        target_lm = self.lm if into is None else into
        self.fingerprint.check(target_lm.fingerprint)
        if self.num_neurons == 0:
            raise InputError("the memory has no neurons: nothing to fuse (add or memorize first)")
        self._check_tau(target_lm.model)
        if inplace:
            if target_lm is not self.lm:
                raise InputError("inplace fusing works on the memory's own model only")
            self._check_not_fused()
            self._fused.append(fuse_model(self.lm.model, self._layer_weights(), safe=safe))
            return self.lm.model
        model = copy.deepcopy(target_lm.model)
        fuse_model(model, self._layer_weights(), safe=safe)
        return model

    def unfuse(self) -> nn.Module:
        """Undo an in-place :meth:`fuse` exactly (the original modules are put back)."""
        if not self._fused:
            raise InputError("the model is not fused with this memory")
        unfuse_model(self.lm.model, self._fused.pop())
        return self.lm.model

    def _layer_weights(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per memory layer: (gate rows, up rows, down columns · τ) after clipping, float32."""
        out = {}
        with torch.no_grad():
            for s in self.sites:
                ffn = self.ffn[str(s.layer)]
                gate, up, value = ffn.clipped()
                out[s.layer] = (gate.detach(), up.detach(), (value * ffn.tau).detach())
        return out

    def _check_tau(self, model: nn.Module) -> None:
        for site in glu_sites(model, tuple(self.layers)):
            tau = down_column_norm(site) / self.config.width
            if abs(tau - self.ffn[str(site.layer)].tau) > 1e-6 * max(1.0, abs(tau)):
                raise FingerprintMismatchError("down_proj column norms (tau)", self.ffn[str(site.layer)].tau, tau,
                                               what=f"side_ffn memory (layer {site.layer})")

    def _check_not_fused(self) -> None:
        if self._fused:
            raise InputError("the memory is fused into the model in place: unfuse() it first")

    def _check_trainable(self) -> None:
        self._check_not_fused()
        if not self.enabled:
            raise InputError("the memory is disabled: enable it before training it")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.sites:
            ffn = self.ffn[str(s.layer)]
            for name in ("gate", "up", "value", "source"):
                out[f"side_ffn_layer{s.layer}_{name}"] = getattr(ffn, name).detach()
            out[f"side_ffn_layer{s.layer}_tau"] = torch.tensor(ffn.tau, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise MemoryFormatError(f"side_ffn tensors do not match the config: missing {missing[:3]}, "
                                    f"unexpected {extra[:3]}")
        widths = {state[f"side_ffn_layer{s.layer}_gate"].shape[0] for s in self.sites}
        if len(widths) != 1:
            raise MemoryFormatError(f"side_ffn layers hold different numbers of neurons: {sorted(widths)}")
        for s in self.sites:
            ffn = self.ffn[str(s.layer)]
            p = f"side_ffn_layer{s.layer}_"
            shapes = {state[p + n].shape[1] for n in ("gate", "up", "value")}
            if shapes != {s.hidden_size}:
                raise MemoryFormatError(f"side_ffn layer {s.layer} has hidden size {shapes}, the model {s.hidden_size}")
            tau = float(state[p + "tau"])
            if abs(tau - ffn.tau) > 1e-6 * max(1.0, abs(tau)):
                raise FingerprintMismatchError("down_proj column norms (tau)", tau, ffn.tau,
                                               what=f"side_ffn memory (layer {s.layer})")
            ffn.gate = nn.Parameter(state[p + "gate"].float().to(self.lm.device))
            ffn.up = nn.Parameter(state[p + "up"].float().to(self.lm.device))
            ffn.value = nn.Parameter(state[p + "value"].float().to(self.lm.device))
            ffn.source = state[p + "source"].long().to(self.lm.device)

    def extra_state(self) -> dict[str, Any]:
        return {"records": self.records, "memorize_count": self.memorize_count, "next_id": self._next_id}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))
        self.memorize_count = int(state.get("memorize_count", 0))
        self._next_id = int(state.get("next_id", len(self.records)))
