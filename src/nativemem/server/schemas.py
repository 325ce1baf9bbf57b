"""Request bodies of the server (pydantic) and the limits they enforce, as named constants.

The chat schema is OpenAI's ``/v1/chat/completions`` subset that a local model can honour: greedy decoding, or
sampling with ``temperature``, ``top_p`` and ``seed``, and ``stop`` strings; parameters it cannot honour
(``tools``, ``logprobs``, ``response_format`` other than text, penalties, ``logit_bias``, ``n`` > 1) get a 400
naming them, and fields that change nothing (``user``, ...) are ignored. nativemem's own options travel as extra
fields (``extra_body`` in the openai client): ``memory`` (inject the caller's memory, default true) and ``top_k``
(most chunks injected).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatMessage", "ChatRequest", "AddRequest", "SearchRequest", "ConsolidateRequest", "ResetRequest",
           "UpdateRequest",
           "MAX_MESSAGES",
           "MAX_MESSAGE_CHARS",
           "MAX_NEW_TOKENS", "DEFAULT_MAX_TOKENS", "MAX_TOP_K", "MAX_TEXTS_PER_ADD", "MAX_TEXT_CHARS",
           "MAX_SEARCH_K", "MAX_LIST_LIMIT", "MAX_METADATA_CHARS"]

MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 200_000
MAX_NEW_TOKENS = 4096
DEFAULT_MAX_TOKENS = 128
MAX_TOP_K = 32
MAX_TEXTS_PER_ADD = 256
MAX_TEXT_CHARS = 1_000_000
MAX_SEARCH_K = 100
MAX_LIST_LIMIT = 1000
MAX_METADATA_CHARS = 16_384
MAX_STOP = 4


class _Strict(BaseModel):
    # strict: "3" or true is not a number, 1 is not a boolean (a client bug is reported, not guessed at)
    model_config = ConfigDict(extra="ignore", str_max_length=MAX_TEXT_CHARS, strict=True)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] = Field(max_length=MAX_MESSAGE_CHARS)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(_Strict):
    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    # sampling (temperature 0 or absent: greedy)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    # OpenAI parameters this server cannot honour: refused by name (never silently ignored)
    tools: list[Any] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    # nativemem's extra fields
    memory: bool = True
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    memory_write: bool = False  # write the finished exchange into the caller's memory (conversation memory)

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must contain at least one user message")
        return messages

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        items = [stop] if isinstance(stop, str) else list(stop or [])
        if len(items) > MAX_STOP or any(not s for s in items):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stop

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def unsupported(self) -> str | None:
        """The first parameter given that this server cannot honour, or None."""
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class AddRequest(_Strict):
    """``text`` or ``texts`` (not both); ``metadata`` is stored with every chunk."""

    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    texts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS_PER_ADD)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def all_texts(self) -> list[str]:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' and 'texts'")
        return [self.text] if self.text is not None else list(self.texts)


class ConsolidateRequest(_Strict):
    into: Literal["side_ffn", "pkm"]
    background: bool = False  # true: 202 with a job (GET /v1/jobs/{id}) instead of waiting for the receipt


class UpdateRequest(_Strict):
    """``PUT /v1/memories/{id}``: a new text (encoded again; one chunk at most) and/or new metadata."""

    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    metadata: dict[str, Any] | None = None


class ResetRequest(_Strict):
    """``DELETE /v1/memories``: every memory of the caller goes; ``confirm`` must be true."""

    confirm: bool = False


class SearchRequest(_Strict):
    query: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    k: int = Field(default=4, ge=1, le=MAX_SEARCH_K)
