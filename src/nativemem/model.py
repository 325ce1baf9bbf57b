"""LanguageModel: a loaded causal LM, its tokenizer and fingerprint, and memory-aware generation.

Generation is greedy by default and always runs inside the memory's ``active()`` scope when a memory
is given, so hooks exist only for the duration of one call. A memory may also hand back an
:class:`~nativemem.memories.base.Injection` (a KV prefix that stands for tokens placed before the
prompt); ``generate`` then feeds only the prompt and lets the cache stand for the prefix.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from .errors import ContextOverflowError, InputError
from .fingerprint import Fingerprint, config_hash, tokenizer_hash
from .hooks import hooks, output_hidden
from .prompting import DEFAULT_SYSTEM, build_messages
from .text import check_text

__all__ = ["LanguageModel", "Generation", "Sampling", "Kept", "DEFAULT_SYSTEM"]


@dataclass
class Kept:
    """What a generation leaves for a memory to reuse (``generate(keep=...)``): its KV cache, the ids the cache
    stands for, where the user's message and the answer sit in them, and one layer's output where it ran.

    Positions index ``ids``: the prompt as the model saw it (a memory's KV prefix included) and every new token.
    """

    ids: list[int]
    cache: Any  # a transformers Cache over ids[:run_end]
    run_end: int  # the positions before it are in the cache (the last new token never ran)
    user: tuple[int, int]  # the last user message's text (template tokens excluded)
    answer: tuple[int, int]  # the answer's tokens (an end-of-sequence token excluded)
    layer: int | None  # the layer whose output ``states`` holds
    states: torch.Tensor | None  # (run_end - first, D): output of ``layer`` at positions first..run_end-1
    first: int  # the first position this call ran (a cached memory prefix before it did not run)
    prefix: int = 0  # tokens the memory's KV prefix stood for (its spliced head included)


@dataclass
class Generation:
    """One generated answer and what it cost."""

    text: str
    ttft_s: float  # time from the call to the first new token
    total_s: float
    prompt_tokens: int  # tokens prefilled in this call (a reused KV prefix is not counted)
    new_tokens: int
    prefix_tokens: int = 0  # tokens supplied by a memory's KV prefix (a spliced prompt head included)
    token_ids: list[int] = field(default_factory=list, repr=False)
    stopped: bool = False  # ended at a stop string (or the end-of-sequence token) rather than the token cap
    kept: Kept | None = field(default=None, repr=False)  # with generate(keep=...): the KV it computed, for reuse


@dataclass(frozen=True)
class Sampling:
    """How new tokens are chosen. ``temperature`` 0 is greedy (the default, bit-identical to no sampling); above 0,
    tokens are sampled with nucleus ``top_p``, reproducibly when ``seed`` is given. Generation ends at any of the
    ``stop`` strings, which are not part of the returned text."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise InputError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise InputError("stop strings must be non-empty strings")

    def generate_kwargs(self) -> dict:
        """``generate`` keyword arguments of the decoding (stop strings are :class:`LanguageModel`'s to apply)."""
        out: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.temperature > 0:
            out.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p), top_k=None)
        return out

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop string, and whether one was found."""
        ends = [i for i in (text.find(x) for x in self.stop) if i >= 0]
        return (text[: min(ends)], True) if ends else (text, False)


GREEDY = Sampling()


class _FirstTokenTimer(BaseStreamer):
    """Records when generate() emits its first new token (the first put() carries the prompt)."""

    def __init__(self, start: float, on_token=None):
        self.start, self.first, self._seen_prompt, self.on_token = start, None, False, on_token

    def put(self, value):
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if self.first is None:
            self.first = time.perf_counter()
        if self.on_token is not None:
            self.on_token(value.reshape(-1).tolist())

    def end(self):
        pass


class LanguageModel:
    """A causal LM with its tokenizer and fingerprint.

    Args:
        model: a transformers causal LM (eval mode is set here).
        tokenizer: its tokenizer; a chat template is used when it has one.
        fingerprint: computed from model and tokenizer when not given (in-process models).
        name: model name for a computed fingerprint.
    """

    def __init__(self, model, tokenizer, *, fingerprint: Fingerprint | None = None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if fingerprint is None:
            fingerprint = Fingerprint(
                name=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
                revision="weights:" + _weights_digest(model), config_hash=config_hash(model.config),
                tokenizer_hash=tokenizer_hash(tokenizer), dtype=str(model.dtype).removeprefix("torch."),
                hidden_size=int(model.config.hidden_size), num_layers=int(model.config.num_hidden_layers))
        self.fingerprint = fingerprint
        # True for the ``random:NAME`` models of nativemem.load_model: real shape, random weights, so only
        # timings and sizes mean anything (benchmark results record it)
        self.random_weights = False
        self._stop_criteria: dict[tuple[str, ...], Any] = {}  # stop strings -> their transformers criterion

    # ---------------------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        return self.fingerprint.name

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_context(self) -> int:
        """The model's context window in tokens."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def turn_stops(self) -> tuple[str, ...]:
        """Stop strings that end the assistant's turn: a model without a chat template is prompted with plain
        ``role: content`` lines (:meth:`chat_ids`), and a base model goes on to invent the next ``user:`` line."""
        return () if getattr(self.tokenizer, "chat_template", None) else ("\nuser:", "\nsystem:")

    # ---------------------------------------------------------------------------- tokens
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_ends(self, text: str) -> list[int] | None:
        """The character offset where each token of ``text`` ends (None for a tokenizer without offsets)."""
        try:
            return [int(e) for _, e in self.tokenizer(text, add_special_tokens=False,
                                                       return_offsets_mapping=True)["offset_mapping"]]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            return None

    def encode(self, text: str) -> torch.LongTensor:
        """Token ids of ``text`` without special tokens: (1, T)."""
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], device=self.device)

    def chat_ids(self, messages: list[dict[str, str]] | str, *, system: str | None = None) -> torch.LongTensor:
        """Chat-formatted prompt ids with the generation prompt added: (1, T)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:  # base models: plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return torch.tensor([list(ids)], device=self.device)

    def chat_head_ids(self, system: str | None) -> list[int]:
        """Ids every chat prompt with this system prompt starts with, up to where the user's text begins."""
        messages = [{"role": "user", "content": "Alpha question?"}]
        return self.chat_ids(messages, system=system)[0].tolist()[: self.user_span(messages, system=system)[0]]

    def user_span(self, messages: list[dict[str, str]], *, system: str | None = None) -> tuple[int, int]:
        """Where the last (user) message's text sits in ``chat_ids(messages, system=system)``: (start, end).

        Found by comparing with the same prompt whose last message differs in its first and its last character:
        the common start and end are the template's.
        """
        if not messages or messages[-1].get("role") != "user":
            raise InputError("user_span needs messages ending with a user message")
        text = str(messages[-1]["content"])
        other = next(c for c in ("Alpha question?", "Zulu query!", "Xylo item;")
                     if c[0].lower() != text[:1].lower() and c[-1] != text[-1:])
        a = self.chat_ids(messages, system=system)[0].tolist()
        b = self.chat_ids([*messages[:-1], {"role": "user", "content": other}], system=system)[0].tolist()
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        m = 0
        while m < min(len(a), len(b)) - n and a[-1 - m] == b[-1 - m]:
            m += 1
        return n, len(a) - m

    # ---------------------------------------------------------------------------- forward
    @torch.inference_mode()
    def logits(self, input_ids: torch.LongTensor, *, memory=None, user_id: str | None = None,
               query: str | None = None) -> torch.Tensor:
        """Logits (B, T, V) of one forward pass, inside the memory's scope when given (``query``: the text the memory
        retrieves with; without one, a searchable memory uses the user's most recent chunks)."""
        if memory is None:
            return self.model(input_ids=input_ids.to(self.device)).logits
        with memory.active(lm=self, user_id=user_id, query=query) as inj:
            return self.model(input_ids=input_ids.to(self.device), **inj.forward_kwargs(input_ids)).logits

    @torch.inference_mode()
    def nll(self, text: str, *, memory=None, user_id: str | None = None) -> torch.Tensor:
        """Per-token negative log-likelihood of ``text`` (T-1,), float32; BOS prepended when the model has one."""
        check_text(text)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        if len(ids) > self.max_context:
            raise ContextOverflowError(len(ids), self.max_context, what="text")
        x = torch.tensor([ids], device=self.device)
        logits = self.logits(x, memory=memory, user_id=user_id).float()
        return torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none").cpu()

    # ---------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, input_ids: torch.LongTensor, *, max_new_tokens: int = 64, memory=None,
                 user_id: str | None = None, query: str | None = None, on_token=None,
                 sampling: Sampling = GREEDY, keep: tuple[int, int] | None = None,
                 keep_layer: int | None = None) -> Generation:
        """Generation from prompt ids (1, T): greedy unless ``sampling`` says otherwise (:class:`Sampling`).

        Args:
            input_ids: the chat-formatted prompt, (1, T).
            max_new_tokens: cap on new tokens.
            memory: a Memory; its ``active()`` scope wraps the whole call.
            user_id: whose memories may be used.
            query: text the memory retrieves with (defaults to the decoded prompt).
            on_token: called with each new token id list as it is produced (streaming).
            keep: where the last user message's text sits in ``input_ids`` (:meth:`user_span`): the generation
                then keeps its KV cache and the memory's retrieval-layer states in ``Generation.kept``, so that
                the memory can write the exchange without running it again (``remember(generation=...)``).
            keep_layer: the layer whose states are kept (default: ``memory.retrieval_layer`` where it has one).

        Raises:
            ContextOverflowError: prompt (plus any memory prefix) and max_new_tokens exceed the window.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = input_ids.to(self.device)
        start = time.perf_counter()
        layer = None if keep is None else keep_layer if keep_layer is not None else getattr(memory, "retrieval_layer",
                                                                                                None)
        if memory is None:
            return self._generate(input_ids, max_new_tokens, start, None, on_token, sampling, keep, layer)
        if query is None:
            query = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        with memory.active(lm=self, user_id=user_id, query=query) as inj:
            return self._generate(input_ids, max_new_tokens, start, inj, on_token, sampling, keep, layer)

    def _generate(self, input_ids, max_new_tokens, start, inj, on_token, sampling: Sampling = GREEDY,
                  keep: tuple[int, int] | None = None, layer: int | None = None) -> Generation:
        if self.turn_stops:
            sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *self.turn_stops))
        cached = 0 if inj is None else inj.prefix_length
        kwargs = {} if inj is None else inj.generate_kwargs(input_ids)
        full_ids = kwargs.pop("input_ids", input_ids)
        total = full_ids.shape[1] + max_new_tokens
        if total > self.max_context:
            raise ContextOverflowError(total, self.max_context, what="prompt plus max_new_tokens")
        timer = _FirstTokenTimer(start, on_token)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the process-wide generator: a seeded call is reproducible
        states: list[torch.Tensor] = []
        with ExitStack() as stack:
            if keep is not None:
                kwargs["return_dict_in_generate"] = True
                if layer is not None:
                    def grab(module, args, kw, output):
                        states.append(output_hidden(output)[0].detach())

                    stack.enter_context(hooks(self.model, [("residual_post", layer, grab)]))
            out = self.model.generate(
                input_ids=full_ids, attention_mask=torch.ones_like(full_ids), max_new_tokens=max_new_tokens,
                streamer=timer, eos_token_id=self.eos_token_ids,
                pad_token_id=self.eos_token_ids[0] if self.eos_token_ids else None,
                **self._decoding(sampling), **kwargs)
        end = time.perf_counter()
        sequences = out.sequences if keep is not None else out
        new = sequences[0, full_ids.shape[1]:].tolist()
        ended = bool(new) and new[-1] in self.eos_token_ids
        while new and new[-1] in self.eos_token_ids:
            new.pop()
        text, hit = sampling.cut(self.tokenizer.decode(new, skip_special_tokens=True))
        kept = None
        if keep is not None and not hit:  # an answer cut at a stop string has tokens its text lacks
            shift = full_ids.shape[1] - input_ids.shape[1]  # the memory prefix, less a spliced prompt head
            ids = sequences[0].tolist()
            run_end = len(ids) - 1
            ran = torch.cat(states) if states else None
            kept = Kept(ids=ids, cache=out.past_key_values, run_end=run_end, user=(keep[0] + shift, keep[1] + shift),
                        answer=(full_ids.shape[1], full_ids.shape[1] + len(new)), layer=layer, states=ran,
                        first=run_end - (ran.shape[0] if ran is not None else 0), prefix=cached)
        return Generation(
            text=text.strip(), ttft_s=(timer.first or end) - start, total_s=end - start,
            prompt_tokens=int(full_ids.shape[1]) - cached, new_tokens=len(new),
            prefix_tokens=cached, token_ids=new, stopped=ended or hit, kept=kept)

    def _decoding(self, sampling: Sampling) -> dict:
        """``generate`` keyword arguments of ``sampling``, its stop strings as a criterion built once per set of
        strings: transformers builds one by scanning the whole vocabulary (about 4 s for Gemma 3's 262k tokens
        on a CPU), which would otherwise be paid by every call before its first token."""
        out = sampling.generate_kwargs()
        if sampling.stop:
            from transformers import StopStringCriteria, StoppingCriteriaList

            cache = self._stop_criteria
            if sampling.stop not in cache:
                if len(cache) >= 32:  # the oldest set goes (a server sees whatever stop strings clients send)
                    cache.pop(next(iter(cache)))
                cache[sampling.stop] = StopStringCriteria(self.tokenizer, list(sampling.stop))
            out["stopping_criteria"] = StoppingCriteriaList([cache[sampling.stop]])
        return out

    def chat(self, question: str, *, memory=None, user_id: str | None = None, context: list[str] | None = None,
             system: str | None = DEFAULT_SYSTEM, max_new_tokens: int = 64) -> str:
        """Answer one question in the library's prompt layout (:mod:`nativemem.prompting`), optionally with
        context passages pasted in or with a memory (which retrieves with the question)."""
        check_text(question, what="question")
        passages = [check_text(c, what="context passage") for c in context or ()]
        ids = self.chat_ids(build_messages(question, passages, system=system))
        return self.generate(ids, max_new_tokens=max_new_tokens, memory=memory, user_id=user_id,
                             query=question).text

    # ---------------------------------------------------------------------------- misc
    def find_modules(self, pattern: str) -> list[str]:
        """Names of modules matching a glob pattern (debugging aid)."""
        return [n for n, _ in self.model.named_modules() if fnmatch.fnmatch(n, pattern)]

    def __repr__(self) -> str:
        fp = self.fingerprint
        return f"LanguageModel({fp.name!r}, layers={fp.num_layers}, hidden={fp.hidden_size}, dtype={fp.dtype})"


def _weights_digest(model) -> str:
    """Digest of the weights of an in-process model (sampled for large models)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().reshape(-1)
        if t.numel() > 4096:
            t = t[:: max(1, t.numel() // 4096)]
        h.update(name.encode())
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
