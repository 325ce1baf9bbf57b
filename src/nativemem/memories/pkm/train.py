"""Writing facts into the value pool cheaply: cached hidden states, a short forward path, the epoch loop.

How this works. The backbone is frozen and the memory sits at layers >= L (the lowest memory layer), so:

1. **Below L nothing changes.** The residual stream entering layer L is computed once per fact
   (:func:`capture_residual`, stopping the forward at layer L) and cached.
2. **The shared chat prefix does not change either** when the memory is not trained there (the system
   prompt is the same for every fact): its keys and values at every layer are computed once
   (:class:`PrefixCache`) and every batch attends to them as a KV cache.
3. Each training step then runs only layers L.. on the fact's own tokens (:func:`forward_answers`: the
   layers below L are swapped for identities and the cached residual goes in as ``inputs_embeds``), and
   applies the LM head to the answer positions only (the loss is on the answer tokens).

The cached path gives the same logits and gradients as the full forward with the memory applied from the
first fact token on (``tests/unit/test_pkm_train.py``).

:func:`train_items` is the loop: epochs over the facts that are not yet recalled with a margin (every
answer token's logit beats the runner-up by ``margin``), batches of one fact per sequence, a row-sparse
Adam on the pool, and a check of the facts left out (they come back when they slip). A non-finite loss or
gradient stops training before the step is applied, so the pool keeps its last good state.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...hooks import decoder_layers, hooks
from ...prompting import build_messages
from ...turns import model_step
from .facts import Fact

__all__ = ["Item", "encode_fact", "chat_prefix", "capture_residual", "skip_layers", "frozen", "PrefixCache",
           "forward_answers", "fact_margins", "train_items", "recalled_enough", "evaluate_items", "TrainResult",
           "prefix_batches", "CastWeights", "short_attention"]


@dataclass(eq=False)
class Item:
    """One fact ready for training.

    Attributes:
        index: position of the item in its list.
        ids: all token ids (prompt then answer).
        answer_start: index in ``ids`` of the first answer token.
        prefix_len: leading tokens that are shared and never see the memory (0 = none).
        hidden: (len(ids) - prefix_len, D) residual entering the lowest memory layer, set by
            :func:`cache_items`.
    """

    index: int
    ids: list[int]
    answer_start: int
    prefix_len: int = 0
    hidden: torch.Tensor | None = None
    fact: int = -1  # which fact of the caller's list this phrasing trains
    kind: str = "own prompt"  # the phrasing's kind (augment.KINDS), "own prompt" for the fact's own

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.ids[: self.prefix_len])

    @property
    def span_len(self) -> int:
        return len(self.ids) - self.prefix_len

    @property
    def targets(self) -> list[int]:
        return self.ids[self.answer_start:]


def chat_prefix(lm, system: str | None) -> list[int]:
    """Token ids every chat prompt starts with (system prompt and user header)."""
    return lm.chat_head_ids(system)


def encode_fact(lm, fact: Fact, *, system: str | None, prefix: Sequence[int], train_prefix: bool) -> Item:
    """Token ids of a fact and where its answer starts.

    Chat facts: the chat prompt (``lm.chat_ids``), then the answer's tokens and the end-of-turn token.
    Completion facts: BOS (if any) and the prompt, then the tokens of " " + answer.
    """
    tok = lm.tokenizer
    if fact.chat:
        prompt = lm.chat_ids(build_messages(fact.prompt, system=system))[0].tolist()
        answer = tok(fact.answer, add_special_tokens=False)["input_ids"] + lm.eos_token_ids[:1]
    else:
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompt = bos + tok(fact.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
        prefix = bos
    shared = 0
    if not train_prefix:
        while shared < min(len(prefix), len(prompt) - 1) and prompt[shared] == prefix[shared]:
            shared += 1
    return Item(-1, prompt + answer, len(prompt), shared)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@torch.no_grad()
def capture_residual(model: nn.Module, ids: torch.Tensor, layer: int, past=None) -> torch.Tensor:
    """Residual stream entering decoder layer ``layer``: ids (B, T) -> (B, T, D) (the forward stops there).

    ``past``: a KV cache of tokens before ``ids`` (then only the new tokens' residuals are computed).
    """
    grabbed: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        grabbed["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    with model_step(), hooks(model, [("residual_pre", layer, grab)]):
        try:
            model.base_model(input_ids=ids, past_key_values=past, use_cache=past is not None)
        except _Stop:
            pass
    return grabbed["h"]


def cache_items(model: nn.Module, items: Sequence[Item], layer: int, *, pad_id: int, dtype: torch.dtype,
                prefixes: PrefixCache | None = None, batch_size: int = 32) -> None:
    """Set ``item.hidden`` (the residual entering ``layer`` after the prefix) for every item.

    With ``prefixes`` the shared prefix is a KV cache and only the items' own tokens are computed.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: (items[i].prefix, len(items[i].ids)))
    start = 0
    while start < len(order):
        prefix = items[order[start]].prefix if prefixes is not None else ()
        chunk = []
        while start < len(order) and len(chunk) < batch_size and (
                prefixes is None or items[order[start]].prefix == prefix):
            chunk.append(items[order[start]])
            start += 1
        skip = len(prefix)  # tokens the cache stands for
        width = max(len(it.ids) - skip for it in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
        for b, it in enumerate(chunk):  # right padding: causal attention never looks at the pads
            ids[b, : len(it.ids) - skip] = torch.tensor(it.ids[skip:], device=device)
        past = prefixes.get(prefix, len(chunk)) if prefix else None
        h = capture_residual(model, ids, layer, past)
        for b, it in enumerate(chunk):
            it.hidden = h[b, it.prefix_len - skip: len(it.ids) - skip].to(dtype).clone()


class _Identity(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def skip_layers(model: nn.Module, below: int) -> Iterator[None]:
    """Replace decoder layers [0, below) by identities for the duration of the block (restored in finally)."""
    _, layers = decoder_layers(model)
    saved = [layers[i] for i in range(below)]
    try:
        for i in range(below):
            layers[i] = _Identity()
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every backbone parameter (restored in finally): no weight gradients."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class PrefixCache:
    """Keys and values of shared prefixes at every layer, computed once (no memory), expanded per batch."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def get(self, prefix: tuple[int, ...], batch: int):
        """A fresh DynamicCache holding ``prefix`` for ``batch`` sequences, or None for an empty prefix."""
        from transformers import DynamicCache

        if not prefix:
            return None
        if prefix not in self._kv:  # in the model's own dtype, whatever autocast the caller runs under
            device = next(self.model.parameters()).device
            with torch.no_grad(), model_step(), torch.autocast(device.type, enabled=False):
                out = self.model.base_model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            self._kv[prefix] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._kv[prefix]]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)


@dataclass
class CastWeights:
    """Copies in the autocast dtype of the matrices the cached path multiplies by, made once per training call:
    under autocast a frozen float32 weight is cast again at every forward (84M elements a step on SmolLM2, 8 % of
    a training step). ``body``: frozen linear weights of the decoder layers from the lowest memory layer on, named
    as in ``model.base_model`` (trained ones, such as LoRA's, run as they are); ``head``: the output head's weight
    and bias (None when it is not a frozen linear layer)."""

    body: dict[str, torch.Tensor]
    head: tuple[torch.Tensor, torch.Tensor | None] | None

    @classmethod
    def of(cls, model: nn.Module, lowest: int, dtype: torch.dtype) -> CastWeights:
        _, layers = decoder_layers(model)
        upper = {id(m) for layer in list(layers)[lowest:] for m in layer.modules()}
        body = {f"{name}.{pname}": p.detach().to(dtype)
                for name, mod in model.base_model.named_modules() if isinstance(mod, nn.Linear) and id(mod) in upper
                for pname, p in mod.named_parameters(recurse=False) if not p.requires_grad}
        out = model.get_output_embeddings()
        head = None
        if isinstance(out, nn.Linear) and not any(p.requires_grad for p in out.parameters()):
            head = (out.weight.detach().to(dtype), None if out.bias is None else out.bias.detach().to(dtype))
        return cls(body, head)


@contextmanager
def short_attention(model: nn.Module) -> Iterator[None]:
    """The plain attention kernel for the cached path on CPU (restored in finally): its sequences are a few dozen
    tokens, where PyTorch's CPU SDPA kernel backpropagates slowly (a SmolLM2 training step of 16 facts: 1.14 s
    with SDPA, 0.98 s without, one core). Other devices keep the model's own kernel."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if next(model.parameters()).device.type != "cpu" or before in (None, "eager"):
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def _lm_head(model: nn.Module, hidden: torch.Tensor, weights: CastWeights | None = None) -> torch.Tensor:
    if weights is not None and weights.head is not None:
        logits = F.linear(hidden, *weights.head).float()
    else:
        logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def forward_answers(model: nn.Module, items: Sequence[Item], lowest: int, prefixes: PrefixCache,
                    memory_scope: Callable[[], object], weights: CastWeights | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the answer positions of a batch through the cached path.

    All items must share one prefix. Gradients flow into whatever ``memory_scope()`` registers. ``weights``:
    cast copies of the weights to run with (under the matching autocast).

    Returns:
        logits (n, V) float32, targets (n,), owner (n,) index of the item in ``items``.
    """
    device = next(model.parameters()).device
    width = max(it.span_len for it in items)
    d = items[0].hidden.shape[-1]
    hidden = torch.zeros(len(items), width, d, dtype=model.dtype, device=device)
    rows, cols, targets, owner = [], [], [], []
    for b, it in enumerate(items):
        hidden[b, : it.span_len] = it.hidden.to(model.dtype)
        first = it.answer_start - 1 - it.prefix_len  # span position whose logits predict the first answer token
        n = len(it.ids) - it.answer_start
        rows += [b] * n
        cols += list(range(first, first + n))
        targets += it.targets
        owner += [b] * n
    past = prefixes.get(items[0].prefix, len(items))
    inputs = {"inputs_embeds": hidden, "past_key_values": past, "use_cache": past is not None}
    with model_step(), skip_layers(model, lowest), short_attention(model), memory_scope():
        if weights is not None:
            out = torch.func.functional_call(model.base_model, weights.body, args=(), kwargs=inputs)
        else:
            out = model.base_model(**inputs)
    sel = out.last_hidden_state[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (n, D)
    return (_lm_head(model, sel, weights), torch.tensor(targets, device=device), torch.tensor(owner, device=device))


def fact_margins(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per item, the smallest (target logit - best other logit) over its answer tokens: (n,).

    A fact is recalled by greedy decoding exactly when its margin is > 0.
    """
    logits = logits.detach()
    correct = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    out = torch.full((n,), float("inf"), device=logits.device)
    return out.scatter_reduce(0, owner, correct - other, reduce="amin")


def _batches(items: Sequence[Item], batch_size: int, rng: random.Random) -> list[list[Item]]:
    """Shuffled batches of items with one prefix each, lengths grouped to limit padding."""
    by_prefix: dict[tuple[int, ...], list[Item]] = {}
    for it in items:
        by_prefix.setdefault(it.prefix, []).append(it)
    batches: list[list[Item]] = []
    for group in by_prefix.values():
        group = list(group)
        rng.shuffle(group)
        window = batch_size * 8
        for start in range(0, len(group), window):
            chunk = sorted(group[start:start + window], key=lambda it: it.span_len)
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class TrainResult:
    """What :func:`train_items` did."""

    steps: int = 0
    epochs: int = 0
    exposures: float = 0.0  # fact-steps per fact
    final_loss: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    epoch_active: list[int] = field(default_factory=list)  # facts trained in each epoch
    epoch_missed: list[int] = field(default_factory=list)  # after each epoch, required items not recalled
    epoch_share: list[float] = field(default_factory=list)  # after each epoch, the share the stop rule estimates
    margins: torch.Tensor | None = None  # (n,) after the final check
    stopped: str = ""  # "recalled" | "max_epochs" | "non-finite ..."
    polished: int = 0  # facts trained again in float32 after bf16 training
    train_s: float = 0.0
    eval_s: float = 0.0
    signatures: list[torch.Tensor] = field(default_factory=list)  # per item, rows read (when the caller measures them)

    @property
    def recall(self) -> float:
        return float((self.margins > 0).float().mean()) if self.margins is not None and self.margins.numel() else 0.0


def prefix_batches(items: Sequence[Item], batch_size: int) -> list[list[int]]:
    """Positions of ``items`` in batches of at most ``batch_size`` that share one prefix (what
    :func:`forward_answers` takes), lengths grouped to limit padding."""
    order = sorted(range(len(items)), key=lambda i: (items[i].prefix, items[i].span_len))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and items[out[-1][0]].prefix == items[i].prefix:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def evaluate_items(model, items: Sequence[Item], lowest: int, prefixes: PrefixCache, memory_scope,
                   batch_size: int = 16, on_batch=None, weights: CastWeights | None = None) -> torch.Tensor:
    """Margins (n,) of every item with the current memory (no gradients). Batches of 16: 8 % faster a phrasing
    than 32 on SmolLM2 on two CPU cores (bf16 cast weights, measured alone)."""
    out = torch.empty(len(items))
    for idx in prefix_batches(items, batch_size):
        chunk = [items[i] for i in idx]
        logits, targets, owner = forward_answers(model, chunk, lowest, prefixes, memory_scope, weights)
        m = fact_margins(logits, targets, owner, len(chunk)).cpu()
        out[torch.tensor(idx)] = m
        if on_batch is not None:
            on_batch(chunk)
    return out


def train_items(model, items: Sequence[Item], lowest: int, prefixes: PrefixCache, *, memory_scope,
                optimizers: Sequence[torch.optim.Optimizer], params: Sequence[nn.Parameter], batch_size: int,
                max_epochs: int, margin: float, max_grad_norm: float | None = None, seed: int = 0,
                autocast: torch.dtype | None = None, recheck_every: int = 3, progress=None,
                loss_hook=None, share: float = 1.0, required: torch.Tensor | None = None, slack: int = 0,
                final_check: Callable[[Sequence[Item]], torch.Tensor] | None = None) -> TrainResult:
    """Train until every item is recalled (or ``max_epochs``); see the module docstring.

    Each epoch trains the items whose last measured margin is <= ``margin``. Items left out are checked
    again (no gradients) every ``recheck_every`` epochs and whenever every item looks recalled; training
    stops when that check finds every item recalled. With ``share`` < 1 each epoch checks a sample of the
    items left out instead (:class:`_SampleCheck`), and stops once the required items and the share are
    recalled, the unchecked items discounted by the share of the sample that slipped; once an epoch trains few
    items (no more than the sample's floor) they are measured again after its steps, so the rule reads margins
    after training, not before each item's step. The final margins are measured by ``final_check`` (default:
    without autocast).

    Args:
        memory_scope: returns the context manager that registers the memory hooks (gradients on).
        optimizers: stepped after every batch.
        params: every trained parameter (checked for finite gradients).
        autocast: dtype of the backbone's matmuls during training (e.g. bfloat16 on CPUs with bf16 units).
        progress: called with (epoch, active facts, mean loss) after every epoch.
        loss_hook: test hook, called with the loss of every step (may return a replacement).
        share / required: stop once every ``required`` item (a bool mask; None = none) and at least this
            share of all items are recalled (1.0: every item).
        slack: with ``share`` < 1, stop with up to this many required items missed (for a caller that trains them
            in a last round: near the share, checks keep finding a few slipped, and waiting for none can take long).
        final_check: measures the final margins of all items (default: :func:`evaluate_items` through
            ``memory_scope``); a caller that needs another pass over every item anyway can fold it in here.
    """
    result = TrainResult()
    rng = random.Random(seed)
    n = len(items)
    margins = torch.full((n,), float("-inf"))
    pos = {id(it): i for i, it in enumerate(items)}
    exposures = 0
    start = time.perf_counter()
    eval_s = 0.0
    device_type = next(model.parameters()).device.type
    cast = (lambda: torch.autocast(device_type, dtype=autocast)) if autocast is not None else _no_cast
    sampler = _SampleCheck(items, required, recheck_every, rng, margins=margins, sure=margin + 2.0)
    weights = CastWeights.of(model, lowest, autocast) if autocast is not None else None
    for epoch in range(max_epochs):
        active = [it for i, it in enumerate(items) if margins[i] <= margin]
        if not active:
            result.stopped = "recalled"
            break
        result.epochs = epoch + 1
        result.epoch_active.append(len(active))
        losses = []
        for batch in _batches(active, batch_size, rng):
            with model_step():  # forward, backward and update: one turn on a shared model
                with torch.enable_grad(), cast():
                    logits, targets, owner = forward_answers(model, batch, lowest, prefixes, memory_scope, weights)
                    loss = F.cross_entropy(logits, targets)
                if loss_hook is not None:
                    replaced = loss_hook(loss)
                    loss = loss if replaced is None else replaced
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    result.stopped = f"non-finite loss at step {result.steps + 1}; kept the last good state"
                    break
                loss.backward()
                if not all(_finite_grad(p) for p in params):
                    result.stopped = f"non-finite gradient at step {result.steps + 1}; kept the last good state"
                    break
                if max_grad_norm is not None:
                    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
                    if dense:
                        torch.nn.utils.clip_grad_norm_(dense, max_grad_norm)
                for opt in optimizers:
                    opt.step()
            m = fact_margins(logits, targets, owner, len(batch)).cpu()
            for b, it in enumerate(batch):
                margins[pos[id(it)]] = m[b]
            exposures += len(batch)
            result.steps += 1
            losses.append(float(loss.detach()))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if result.stopped:
            break
        result.epoch_losses.append(sum(losses) / max(1, len(losses)))
        result.final_loss = losses[-1] if losses else result.final_loss
        # items left out this epoch may have slipped: check them now and then, and before stopping
        trained = {id(it) for it in active}
        rest = [it for it in items if id(it) not in trained]
        check, unchecked = _to_check(sampler, rest, share, margins, (epoch + 1) % recheck_every == 0, len(active))
        # once an epoch trains few items, measure them again after its steps: the margins the loop keeps are
        # those before each item's step, and the stop rule on them waits for items already recalled
        settled = active if share < 1.0 and len(active) <= sampler.floor else []
        slipped = None
        if check or settled:
            t0 = time.perf_counter()
            with cast():
                slipped = _check_left_out(model, check, unchecked, settled, margins, pos, required, lowest, prefixes,
                                          memory_scope, weights)
            eval_s += time.perf_counter() - t0
        if progress is not None:
            progress(epoch + 1, len(active), result.epoch_losses[-1])
        missed, estimate = _stop_state(margins, required, slipped, pos)
        result.epoch_missed.append(missed)
        result.epoch_share.append(estimate)
        if missed <= (slack if share < 1.0 else 0) and estimate >= share - 1e-9:
            result.stopped = "recalled"
            break
    else:
        result.stopped = "max_epochs"
    result.train_s = time.perf_counter() - start - eval_s
    t0 = time.perf_counter()
    result.margins = (final_check(items) if final_check is not None
                      else evaluate_items(model, items, lowest, prefixes, memory_scope))
    result.eval_s = eval_s + time.perf_counter() - t0
    result.exposures = exposures / max(1, n)
    if result.final_loss is not None and not math.isfinite(result.final_loss):
        result.final_loss = None
    return result


def _to_check(sampler: _SampleCheck, rest: list[Item], share: float, margins: torch.Tensor, due: bool,
              trained: int) -> tuple[list[Item], list[Item]]:
    """The items left out of an epoch to measure again, and those not measured: with a share below 1 a sample
    (:class:`_SampleCheck`; the stop rule discounts what it finds), else every one on ``due`` epochs and whenever
    every item looks recalled."""
    if share < 1.0:
        return sampler.take(rest, trained=trained)
    return (list(rest), []) if rest and (due or recalled_enough(margins)) else ([], [])


def _check_left_out(model, check: list[Item], unchecked: list[Item], settled: list[Item], margins: torch.Tensor,
                    pos: dict[int, int], required: torch.Tensor | None, lowest: int, prefixes: PrefixCache,
                    memory_scope, weights: CastWeights | None):
    """Measure ``check`` (items left out) and ``settled`` (items just trained) again, margins updated in place;
    returns (share of the checked items that were recalled and slipped, among those not required, ``unchecked``)
    for the stop rule, or None when nothing is unchecked."""
    where = torch.tensor([pos[id(it)] for it in check + settled], dtype=torch.long)
    before = margins[where]
    margins[where] = evaluate_items(model, check + settled, lowest, prefixes, memory_scope, weights=weights)
    if not unchecked:
        return None
    left = where[: len(check)]
    return _slip_rate(before[: len(check)], margins[left], None if required is None else required[left]), unchecked


def _slip_rate(before: torch.Tensor, after: torch.Tensor, required: torch.Tensor | None) -> float:
    """Of the items recalled before a check (required ones aside: they are all checked), the share no longer
    recalled after it."""
    held = before > 0
    if required is not None:
        held &= ~required
    lost = held & (after <= 0)
    return float(lost.sum()) / float(held.sum()) if held.any() else 0.0


class _SampleCheck:
    """Which left-out items to check each epoch when a share below 1 is enough.

    Every required item left out whose last margin is below ``sure``, a rotating part (a shuffled queue, refilled
    when empty) of the other required items (``1/every`` of them), and a uniform random sample of the rest:
    ``1/every`` of them, but no more than the items trained this epoch (at least ``floor``). Late epochs train a
    few hundred phrasings while thousands are left out; checking a third of those every epoch cost several times
    the training of those epochs at 1,000 facts. Unchecked items are discounted by the share of the sample that
    slipped, so the sample must be like them: drawn from a rotating queue instead, a checked phrasing was last
    measured a round ago and the unchecked ones half a round ago on average, and its slip rate ran high (300
    facts, 8 late epochs measured in full: it projected 1.18 times the slips found among the unchecked, 0.23 to
    2.74 times in single epochs; a uniform sample of the same size 0.95 times, 0.55 to 1.77). The final check
    measures all.
    """

    def __init__(self, items: Sequence[Item], required: torch.Tensor | None, every: int, rng: random.Random, *,
                 margins: torch.Tensor | None = None, sure: float = math.inf, floor: int = 256):
        self.items, self.every, self.rng, self.sure, self.floor = items, every, rng, sure, floor
        self.margins = margins if margins is not None else torch.full((len(items),), -math.inf)
        self.pos = {id(it): i for i, it in enumerate(items)}
        self.required = {id(it) for i, it in enumerate(items) if required is not None and bool(required[i])}
        self.queue: list[Item] = []

    def take(self, rest: Sequence[Item], trained: int | None = None) -> tuple[list[Item], list[Item]]:
        """(items to check now, left-out items not checked now); ``trained``: items trained this epoch (None: no
        cap on the sample)."""
        must = [it for it in rest if id(it) in self.required and float(self.margins[self.pos[id(it)]]) < self.sure]
        held = [it for it in rest if id(it) in self.required and float(self.margins[self.pos[id(it)]]) >= self.sure]
        others = [it for it in rest if id(it) not in self.required]
        want = math.ceil(len(others) / self.every)
        if trained is not None:
            want = min(want, max(trained, self.floor))
        chosen = self._rotate(held, math.ceil(len(held) / self.every))
        chosen += self.rng.sample(others, min(want, len(others)))
        picked = {id(it) for it in chosen}
        return must + chosen, [it for it in held + others if id(it) not in picked]

    def _rotate(self, left: Sequence[Item], want: int) -> list[Item]:
        """``want`` of ``left`` from the front of the queue of the required items."""
        ids = {id(it) for it in left}
        chosen: dict[int, Item] = {}
        for _ in range(2):  # at most one refill of the queue per epoch
            if not self.queue:
                self.queue += [it for it in self.items if id(it) in self.required]
                self.rng.shuffle(self.queue)
            while self.queue and len(chosen) < want:
                it = self.queue.pop()
                if id(it) in ids:
                    chosen[id(it)] = it
            if len(chosen) >= want:
                break
        return list(chosen.values())


def _stop_state(margins: torch.Tensor, required: torch.Tensor | None, slipped,
                pos: dict[int, int]) -> tuple[int, float]:
    """What the stop rule looks at: (required items not recalled, share of all items recalled), the positive margins
    of the items not checked discounted by the share of the checked sample that slipped (``slipped`` = (that share,
    the items not checked), or None when every item left out was checked)."""
    ok = margins > 0
    missed = int((~ok[required]).sum()) if required is not None else 0
    recalled = float(ok.sum())
    if slipped is not None:
        rate, unchecked = slipped
        recalled -= rate * float(ok[torch.tensor([pos[id(it)] for it in unchecked], dtype=torch.long)].sum())
    return missed, recalled / max(1, margins.numel())


def recalled_enough(margins: torch.Tensor, share: float = 1.0, required: torch.Tensor | None = None) -> bool:
    """Whether every ``required`` item and at least ``share`` of all items have a positive margin."""
    ok = margins > 0
    if required is not None and not bool(ok[required].all()):
        return False
    return bool(ok.all()) if share >= 1.0 else float(ok.float().mean()) >= share


@contextmanager
def _no_cast() -> Iterator[None]:
    yield


def _finite_grad(p: nn.Parameter) -> bool:
    """Whether ``p``'s gradient is finite. A sparse gradient is coalesced in place, so the optimiser's own coalesce
    finds it done (each cost ~15 ms of a ~630 ms step, measured at 60 facts); the test is a sum (0.5 ms against
    20 ms for ``isfinite().all()`` on ~16,000 rows), with the element-wise test only when the sum is not finite
    (an overflow of finite values)."""
    g = p.grad
    if g is None:
        return True
    if g.is_sparse:
        p.grad = g = g.coalesce()
        g = g.values()
    return bool(torch.isfinite(g.sum())) or bool(torch.isfinite(g).all())
