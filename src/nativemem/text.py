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
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])|\n\s*\n")


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


def chunk_text(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Greedy sentence-aware chunks of at most ``max_tokens`` tokens each.

    Sentences are packed until the next would overflow; a single sentence longer than the budget is
    cut on word boundaries (and, for a word longer than the budget, on characters).
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
            chunks.extend(_split_long(sentence, max_tokens, count_tokens))
    if current:
        chunks.append(" ".join(current))
    return chunks


def _split_long(sentence: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    out: list[str] = []
    current = ""
    for word in sentence.split():
        candidate = f"{current} {word}".strip()
        if count_tokens(candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            out.append(current)
        while count_tokens(word) > max_tokens:  # a "word" longer than the budget: cut on characters
            cut = max(1, len(word) * max_tokens // max(1, count_tokens(word)))
            while cut > 1 and count_tokens(word[:cut]) > max_tokens:
                cut -= 1
            out.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        out.append(current)
    return out
