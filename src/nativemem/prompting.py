"""The one prompt layout and answer post-processing of the library, its server, demos and benchmarks.

``LanguageModel.chat``, the server, the demos and every benchmark arm build their chat messages with
:func:`build_messages`, so they differ only in *which* passages they put in the prompt (none, retrieved,
the whole source, or none because a memory injects them as KV)::

    system: DEFAULT_SYSTEM
    user:   Context:
            [1] <passage 1>
            [2] <passage 2>

            Question: <question>

With no passages the ``Context`` block is left out. The model's chat template is applied by
``lm.chat_ids`` and decoding is greedy with a ``max_new_tokens`` cap.

:func:`postprocess_answer` turns the raw generation into the short answer that is scored (first
non-empty line, common "Answer:" style prefixes and wrapping quotes removed); the raw text is kept in
``items.jsonl`` of a benchmark run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["DEFAULT_SYSTEM", "build_messages", "user_content", "format_passages", "postprocess_answer"]

DEFAULT_SYSTEM = (
    "You answer questions. Reply with the answer only: a short phrase of a few words, "
    "no full sentence and no explanation. Use the context passages if they are given."
)

_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|short\s+)?answer(?:\s+to\s+(?:this|the|your)\s+question)?\s+is\b\s*:?"
    r"|(?:final\s+answer|short\s+answer|answer|a)\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’*"


def format_passages(passages: Sequence[str]) -> str:
    """Number passages as ``[1] ...``, one per paragraph.

    Args:
        passages: Passage texts, in prompt order.

    Returns:
        The ``Context`` block body.
    """
    return "\n".join(f"[{i}] {' '.join(p.split())}" for i, p in enumerate(passages, start=1))


def user_content(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn: ``Context:`` with the numbered passages (if any), then ``Question: <question>``."""
    body = f"Question: {question.strip()}"
    if passages:
        body = f"Context:\n{format_passages(passages)}\n\n{body}"
    return body


def build_messages(question: str, passages: Sequence[str] = (), *,
                   system: str | None = DEFAULT_SYSTEM) -> list[dict[str, str]]:
    """Chat messages for one question.

    Args:
        question: The question.
        passages: Context passages (empty for the closed-book prompt).
        system: The system prompt (None: no system turn, the chat template's own default applies).

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]`` (the system turn only when ``system`` is set).
    """
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": user_content(question, passages)}]


def postprocess_answer(raw: str) -> str:
    """Shorten a raw generation to the answer that is scored.

    Keeps the first line that is not empty once a leading "Answer:" / "The answer is" (or similar)
    prefix, wrapping quotes/asterisks and a trailing full stop are removed.

    Args:
        raw: Decoded new tokens.

    Returns:
        The cleaned answer ("" if the generation was blank).
    """
    for line in raw.splitlines():
        previous = None
        while previous != line:
            previous = line
            line = _PREFIX.sub("", line.strip(), count=1)
            line = line.strip().strip(_QUOTES).strip()
        if line:  # a line that was only "Answer:" leaves nothing: the answer is on a later line
            return line[:-1].rstrip() if line.endswith(".") else line
    return ""
