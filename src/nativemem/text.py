"""Text checks and sentence-aware chunking.

``check_text`` is the one gate every user text passes: bytes must be UTF-8, text must not be empty,
whitespace-only, binary-looking or larger than a limit. Each failure is an :class:`InputError` with
a message that says which.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import InputError

__all__ = ["check_text", "split_sentences", "chunk_text", "MAX_TEXT_CHARS"]

MAX_TEXT_CHARS = 50_000_000  # one add/ask call; larger inputs should be streamed file by file

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])|\n\s*\n"
                           r"|(?<=[。！？])[」』”’）]*\s*")  # CJK sentence ends need no space after them
_CHARS_PER_TOKEN = 16  # generous upper bound on the characters one token covers (bounds a cut's search window)


def check_text(text: str | bytes, *, what: str = "text", max_chars: int = MAX_TEXT_CHARS) -> str:
    """Return ``text`` as str if it is usable, else raise InputError saying why.

    Args:
        text: str, or bytes that must decode as UTF-8.
        what: how to call the text in messages ("question", "document 3", ...).
        max_chars: upper bound on length.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what} is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{what} is empty" if not text else f"{what} contains only whitespace")
    if "\x00" in text or len(_CONTROL.findall(text[:10_000])) > max(8, len(text[:10_000]) // 20):
        raise InputError(f"{what} looks like binary data (control characters), not text")
    if len(text) > max_chars:
        raise InputError(f"{what} is too large: {len(text):,} characters (limit {max_chars:,})")
    return text


def split_sentences(text: str) -> list[str]:
    """Split on sentence ends and blank lines; keeps every character of the text except the split spaces."""
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    return [p for p in parts if p]


def chunk_text(text: str, max_tokens: int, count_tokens: Callable[[str], int], *,
               token_ends: Callable[[str], list[int] | None] | None = None) -> list[str]:
    """Greedy sentence-aware chunks of at most ``max_tokens`` tokens each.

    Sentences are packed until the next would overflow; a single sentence longer than the budget is
    cut on word boundaries (and, for a word longer than the budget, on characters). ``token_ends``
    (the character offset where each token of a text ends, e.g. :meth:`LanguageModel.token_ends`) lets
    a long run without spaces be cut from one tokenisation, with one count per piece to check it.
    """
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks: list[str] = []
    current: list[str] = []
    for sentence in split_sentences(text):
        candidate = " ".join([*current, sentence])
        if count_tokens(candidate) <= max_tokens:
            current.append(sentence)
            continue
        if current:
            chunks.append(" ".join(current))
            current = []
        if count_tokens(sentence) <= max_tokens:
            current = [sentence]
        else:
            chunks.extend(_split_long(sentence, max_tokens, count_tokens, token_ends))
    if current:
        chunks.append(" ".join(current))
    return chunks


def _split_long(sentence: str, max_tokens: int, count_tokens: Callable[[str], int], token_ends=None) -> list[str]:
    out: list[str] = []
    current = ""
    for word in sentence.split():
        candidate = f"{current} {word}".strip()
        if count_tokens(candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            out.append(current)
        ends = token_ends(word) if token_ends is not None else None
        # a "word" longer than the budget: cut on characters
        pieces = _cut_at(word, max_tokens, count_tokens, ends) if ends else _cut_run(word, max_tokens, count_tokens)
        out.extend(pieces[:-1])
        current = pieces[-1]
    if current:
        out.append(current)
    return out


def _cut_at(word: str, max_tokens: int, count_tokens: Callable[[str], int], ends: list[int]) -> list[str]:
    """Cut a run at the end of every ``max_tokens``-th token of its own tokenisation (``ends``: where each token
    ends), checking each piece with one count; a piece that counts over the budget on its own (tokens merge
    differently at a cut) gives back its last tokens one by one."""
    from bisect import bisect_right

    pieces, start, t, n = [], 0, 0, len(ends)
    while start < len(word):
        k = min(t + max_tokens, n) - 1
        end = len(word) if t + max_tokens >= n else ends[k]
        while k > t and count_tokens(word[start:end]) > max_tokens:
            k -= 1
            end = ends[k]
        end = max(end, start + 1)
        pieces.append(word[start:end])
        start, t = end, bisect_right(ends, end)
    return pieces


def _cut_run(word: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Cut a run without spaces (a long "word", or unspaced CJK text) into pieces within the budget.

    Each cut searches for the longest prefix within ``max_tokens``: it starts from the previous piece's
    characters per token, gallops while the prefix still fits and then bisects, never looking beyond
    ``_CHARS_PER_TOKEN * max_tokens`` characters. The whole run so costs counting work linear in its length
    instead of re-counting the rest of the run at every cut.
    """
    pieces = []
    per_token = 4.0  # characters per token, updated from every cut
    while word:
        limit = min(len(word), _CHARS_PER_TOKEN * max_tokens)
        lo, hi = 0, min(limit, max(1, int(per_token * max_tokens * 1.1)))
        while True:  # gallop: lo fits (0 trivially), find an hi that does not, or the limit
            if count_tokens(word[:hi]) <= max_tokens:
                lo = hi
                if hi == limit:
                    break
                hi = min(limit, 2 * hi)
            else:
                hi -= 1
                break
        while lo < hi:  # bisect: word[:lo] fits, word[:hi + 1] does not
            mid = (lo + hi + 1) // 2
            if count_tokens(word[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        lo = max(lo, 1)  # one character always goes, even one over the budget
        pieces.append(word[:lo])
        per_token = max(0.25, lo / max(1, count_tokens(word[:lo])))
        word = word[lo:]
    return pieces
