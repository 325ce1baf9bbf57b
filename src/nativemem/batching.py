"""Decoding several generations in one forward per step (static batching per step).

Each generation is prefilled on its own (its prompt after its own memory prefix: a KV prefix stays in its own
row), then joins a :class:`DecodeBatch`: the rows' caches are written into shared buffers, each row's tokens
ending at the same column (shorter rows padded on the left), an attention mask hides the pads, and each row
keeps its own positions, so every row attends to exactly what it would alone. A step writes one new column in
place; nothing is concatenated (see :class:`DecodeBatch`).
One :meth:`DecodeBatch.step` runs one forward for every row and chooses each row's next token by its own
:class:`~nativemem.model.Sampling` (greedy at temperature 0; seeded rows draw from their own generator, so a
seed gives the same text whatever else is in the batch). Rows leave when they end (end of sequence, a stop
string, their token cap, or an error raised by their ``on_token``) and new rows join between steps.

Results match generating alone up to floating-point rounding: a batched matrix product may round differently
from a single row's, which can change a token only where two candidates tie to the last bits (as in any
batched server). Models whose cache has sliding-window layers are not batched (:func:`batchable`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ContextOverflowError, InputError
from .model import GREEDY, Generation, Sampling

__all__ = ["Row", "DecodeBatch", "prefill", "batchable"]


def batchable(lm) -> bool:
    """Whether ``lm``'s cache is plain full attention in every layer (what :class:`DecodeBatch` pads and joins)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=lm.model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass(eq=False)
class Row:
    """One generation in a batch: its cache (batch of one until it joins), tokens, and how it ends."""

    sampling: Sampling
    max_new_tokens: int
    prompt_len: int  # tokens in the row's context before the first new token (memory prefix included)
    prefix_tokens: int  # of which the memory's cached prefix
    start: float
    on_token: Callable[[list[int]], None] | None = None
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, H, L, D) until it joins
    next_token: int = -1  # the token the next step feeds
    new: list[int] = field(default_factory=list)
    first: float | None = None
    done: bool = False
    ended: bool = False  # end of sequence or a stop string
    error: BaseException | None = None
    generator: torch.Generator | None = None
    eos: frozenset[int] = frozenset()
    scores: list[torch.Tensor] | None = None  # with prefill(keep_scores=True): the logits of every new token

    @property
    def length(self) -> int:
        """Tokens in the row's cache."""
        return self.prompt_len + len(self.new) - 1

    def take(self, lm, logits: torch.Tensor) -> None:
        """Choose the next token from ``logits`` (V,), hand it to ``on_token``, and see whether the row ends."""
        token = _choose(logits, self.sampling, self.generator)
        if self.scores is not None:
            self.scores.append(logits.detach().float().cpu())
        if self.first is None:
            self.first = time.perf_counter()
        self.new.append(token)
        self.next_token = token
        try:
            if self.on_token is not None:
                self.on_token([token])
        except BaseException as e:  # noqa: BLE001 - the row's caller gets it
            self.error, self.done = e, True
            return
        if token in self.eos:
            self.ended = self.done = True
        elif self.sampling.stop and self.sampling.cut(lm.tokenizer.decode(self.new, skip_special_tokens=True))[1]:
            self.ended = self.done = True
        elif len(self.new) >= self.max_new_tokens:
            self.done = True

    def result(self, lm) -> Generation:
        end = time.perf_counter()
        new = list(self.new)
        while new and new[-1] in self.eos:
            new.pop()
        text, hit = self.sampling.cut(lm.tokenizer.decode(new, skip_special_tokens=True))
        return Generation(text=text.strip(), ttft_s=(self.first or end) - self.start, total_s=end - self.start,
                          prompt_tokens=self.prompt_len - self.prefix_tokens, new_tokens=len(new),
                          prefix_tokens=self.prefix_tokens, token_ids=new, stopped=self.ended or hit)


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(float(sampling.temperature))(None, logits.float()[None])
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(float(sampling.top_p))(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=generator))


@torch.no_grad()
def prefill(lm, input_ids: torch.LongTensor, *, injection=None, max_new_tokens: int, sampling: Sampling = GREEDY,
            on_token=None, start: float | None = None, keep_scores: bool = False) -> Row:
    """Run a prompt (1, T) after ``injection``'s KV prefix (if any) and choose its first token. ``keep_scores``:
    the row keeps the logits each of its tokens was chosen from (``Row.scores``).

    Raises:
        ContextOverflowError: prompt (plus any memory prefix) and max_new_tokens exceed the window.
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    start = time.perf_counter() if start is None else start
    if lm.turn_stops:
        sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *lm.turn_stops))
    input_ids = input_ids.to(lm.device)
    kwargs = {} if injection is None else injection.generate_kwargs(input_ids)
    full_ids = kwargs.pop("input_ids", input_ids)
    cache = kwargs.pop("past_key_values", None)
    cached = 0 if cache is None else cache.get_seq_length()
    total = full_ids.shape[1] + max_new_tokens
    if total > lm.max_context:
        raise ContextOverflowError(total, lm.max_context, what="prompt plus max_new_tokens")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.model.config)
    out = lm.model(input_ids=full_ids[:, cached:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=lm.device).manual_seed(sampling.seed)
    row = Row(sampling=sampling, max_new_tokens=max_new_tokens, prompt_len=int(full_ids.shape[1]),
              prefix_tokens=0 if injection is None else injection.prefix_length, start=start, on_token=on_token,
              cache=[(layer.keys, layer.values) for layer in out.past_key_values.layers], generator=generator,
              eos=frozenset(lm.eos_token_ids), scores=[] if keep_scores else None)
    row.take(lm, out.logits[0, -1])
    return row


class _Columns:
    """One layer's cache of a batch, in place: (slots, H, columns, D) buffers that rows are written into and
    new tokens appended to without copying the rest (a cache that grew by concatenation copied every row of
    every layer at every step; at 32 rows of 150 tokens that was 40 % of a step on a CPU).

    Every row's tokens end at the same column (``end``); a row of ``m`` tokens occupies ``[end - m, end)``, the
    columns to its left are masked. Active rows fill slots ``0 .. n-1``; the model sees views of these slots and
    of the columns from the longest row's first to ``end``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


@functools.cache
def _layer_class():
    """The cache layer the model sees during one step: views of a :class:`_Columns`, the new token written at
    column ``end`` in place (a ``DynamicLayer``, as transformers expects, that never concatenates)."""
    from transformers.cache_utils import DynamicLayer

    class ColumnsLayer(DynamicLayer):
        def __init__(self, cols: _Columns, n: int, start: int, end: int):
            self.cols, self.n, self.start, self.end = cols, n, start, end
            self.keys, self.values = cols.k[:n, :, start:end], cols.v[:n, :, start:end]
            self.dtype, self.device, self.is_initialized = cols.k.dtype, cols.k.device, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            t = key_states.shape[-2]
            self.cols.k[: self.n, :, self.end: self.end + t] = key_states
            self.cols.v[: self.n, :, self.end: self.end + t] = value_states
            self.end += t
            self.keys = self.cols.k[: self.n, :, self.start: self.end]
            self.values = self.cols.v[: self.n, :, self.start: self.end]
            return self.keys, self.values

    return ColumnsLayer


class DecodeBatch:
    """Rows decoding together: one forward per :meth:`step` for all of them (see the module docstring).

    The cache lives in preallocated buffers (:class:`_Columns`): a step writes one column, a row that leaves is
    replaced by the last row (one row copied), a row that joins is written into the next free slot; the buffers
    are reallocated only when they run out of slots or columns (doubling), so copies are rare."""

    def __init__(self, lm):
        self.lm = lm
        self.rows: list[Row] = []  # row i lives in slot i
        self._cols: list[_Columns] = []
        self._mask: torch.Tensor | None = None  # (slots, columns) long: 1 where a row has a real token
        self._end = 0  # the column the next token goes to

    def __len__(self) -> int:
        return len(self.rows)

    def _shape(self) -> tuple[int, int]:
        return (self._mask.shape[0], self._mask.shape[1]) if self._mask is not None else (0, 0)

    def _start(self) -> int:
        return self._end - max(r.length for r in self.rows)

    def _realloc(self, slots: int, columns: int, shift: int) -> None:
        """New buffers of ``slots`` x ``columns``, the live columns moved by ``shift`` (may be negative)."""
        n, start = len(self.rows), self._start() if self.rows else self._end
        device = self.lm.device
        mask = torch.zeros(slots, columns, dtype=torch.long, device=device)
        if n:
            mask[:n, start + shift: self._end + shift] = self._mask[:n, start: self._end]
        for c in self._cols:
            B, H, _, D = c.k.shape
            k = torch.zeros(slots, H, columns, D, dtype=c.k.dtype, device=device)
            v = torch.zeros_like(k)
            if n:
                k[:n, :, start + shift: self._end + shift] = c.k[:n, :, start: self._end]
                v[:n, :, start + shift: self._end + shift] = c.v[:n, :, start: self._end]
            c.k, c.v = k, v
        self._mask, self._end = mask, self._end + shift

    def _room(self, length: int, *, slot: bool) -> None:
        """Make room for a new row of ``length`` tokens (with ``slot``) and for the next column."""
        slots, columns = self._shape()
        n = len(self.rows)
        start = min(self._start(), self._end - length) if self.rows else self._end - length
        short = slot and n >= slots
        if not short and start >= 0 and self._end < columns:
            return
        # a new layout: the live columns moved to the left edge, at least as much room again on the right
        want = max(columns, 2 * (self._end - start + 1), 64)
        self._realloc(max(slots, 1) * (2 if short else 1), want, -start)

    def join(self, rows: Sequence[Row]) -> None:
        """Add prefilled rows (written into the batch's buffers; see the class docstring)."""
        for row in rows:
            if row.done:
                continue
            kv, m = row.cache, row.length
            row.cache = None
            if not self._cols:
                self._cols = [_Columns(k.new_zeros(0, *k.shape[1:2], 0, k.shape[3]),
                                       v.new_zeros(0, *v.shape[1:2], 0, v.shape[3])) for k, v in kv]
            self._room(m, slot=True)
            slot = len(self.rows)
            self._mask[slot].zero_()
            self._mask[slot, self._end - m: self._end] = 1
            for c, (k, v) in zip(self._cols, kv):
                c.k[slot, :, self._end - m: self._end] = k[0]
                c.v[slot, :, self._end - m: self._end] = v[0]
            self.rows.append(row)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for every row; returns the rows that ended (removed from the batch)."""
        from transformers import DynamicCache

        if not self.rows:
            return []
        device = self.lm.device
        n, start = len(self.rows), self._start()
        if self._end >= self._shape()[1]:
            self._room(0, slot=False)
            start = self._start()
        tokens = torch.tensor([[r.next_token] for r in self.rows], device=device)
        positions = torch.tensor([[r.length] for r in self.rows], device=device)
        self._mask[:n, self._end] = 1
        cache = DynamicCache(config=self.lm.model.config)
        layer = _layer_class()
        cache.layers = [layer(c, n, start, self._end) for c in self._cols]
        out = self.lm.model(input_ids=tokens, attention_mask=self._mask[:n, start: self._end + 1].contiguous(),
                            position_ids=positions, past_key_values=cache, use_cache=True)
        self._end += 1
        logits = out.logits[:, -1]
        for b, row in enumerate(self.rows):
            row.take(self.lm, logits[b])
        return self._drop_done()

    def _drop_done(self) -> list[Row]:
        """Remove ended rows: the last row moves into each freed slot (one row copied, not the batch)."""
        done = [r for r in self.rows if r.done]
        for row in done:
            slot, last = self.rows.index(row), len(self.rows) - 1
            if slot != last:
                self._mask[slot] = self._mask[last]
                for c in self._cols:
                    c.k[slot] = c.k[last]
                    c.v[slot] = c.v[last]
                self.rows[slot] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self._cols, self._mask, self._end = [], None, 0
        return done
