"""Decoding several generations in one forward per step (static batching per step).

Each generation is prefilled on its own (its prompt after its own memory prefix: a KV prefix stays in its own
row), then joins a :class:`DecodeBatch`: the rows' caches are left-padded to one length, an attention mask
hides the pads, and each row keeps its own positions, so every row attends to exactly what it would alone.
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


class DecodeBatch:
    """Rows decoding together: one forward per :meth:`step` for all of them (see the module docstring)."""

    def __init__(self, lm):
        self.lm = lm
        self.rows: list[Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, L, D), left-padded
        self._mask: torch.Tensor | None = None  # (B, L): 1 where a row has a real token

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: Sequence[Row]) -> None:
        """Add prefilled rows (their caches are padded to the batch's length, or the batch to theirs)."""
        for row in rows:
            if row.done:
                continue
            kv, n = row.cache, row.length
            row.cache = None
            mask = torch.ones(1, n, dtype=torch.long, device=self.lm.device)
            if not self.rows:
                self._kv, self._mask = list(kv), mask
            else:
                width = max(self._mask.shape[1], n)
                self._kv = [(torch.cat([_left_pad(bk, width), _left_pad(k, width)]),
                             torch.cat([_left_pad(bv, width), _left_pad(v, width)]))
                            for (bk, bv), (k, v) in zip(self._kv, kv)]
                self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
            self.rows.append(row)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for every row; returns the rows that ended (removed from the batch)."""
        from transformers import DynamicCache

        if not self.rows:
            return []
        device = self.lm.device
        tokens = torch.tensor([[r.next_token] for r in self.rows], device=device)
        positions = torch.tensor([[r.length] for r in self.rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=self._mask.dtype, device=device)], dim=1)
        cache = DynamicCache(ddp_cache_data=self._kv, config=self.lm.model.config)
        out = self.lm.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._mask = mask
        logits = out.logits[:, -1]
        for b, row in enumerate(self.rows):
            row.take(self.lm, logits[b])
        return self._drop_done()

    def _drop_done(self) -> list[Row]:
        done = [r for r in self.rows if r.done]
        if not done:
            return []
        keep = [b for b, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self._kv, self._mask = [], None
            return done
        index = torch.tensor(keep, device=self.lm.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # columns that are padding for every row left go
        self._mask = mask[:, first:]
        self._kv = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                    for k, v in self._kv]
        return done


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (dim 2 of a (B, H, L, D) cache, dim 1 of a (B, L) mask)."""
    dim = 2 if t.dim() == 4 else 1
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
