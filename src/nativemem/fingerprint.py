"""Model fingerprints: every artifact nativemem writes knows which model it belongs to.

A fingerprint names the model (id and revision or file hash), hashes its config and tokenizer, and
records dtype, hidden size and number of layers. Opening a memory with a different model raises
:class:`~nativemem.errors.FingerprintMismatchError` naming the first field that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from .errors import FingerprintMismatchError

__all__ = ["Fingerprint", "config_hash", "tokenizer_hash"]

# config keys that change with how a model was loaded or saved, not with what the model is
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache",
     "architectures", "_attn_implementation_autoset", "output_attentions", "output_hidden_states"}
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(config) -> str:
    """Hash of a transformers config's model-defining fields (load-time fields excluded)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha(json.dumps(d, sort_keys=True, default=str).encode())[:16]


def tokenizer_hash(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary/merges and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the serialised fast tokenizer: vocab, merges, normaliser, added tokens
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return _sha((body + "\x00" + str(template)).encode())[:16]


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a loaded model. All fields but ``library_version`` must match to reuse a memory."""

    name: str
    revision: str
    config_hash: str
    tokenizer_hash: str
    dtype: str
    hidden_size: int
    num_layers: int
    library_version: str = ""

    # checked in this order, so the message names the most telling difference first
    CHECKED = ("name", "num_layers", "hidden_size", "config_hash", "tokenizer_hash", "revision", "dtype")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def short(self) -> str:
        """Stable short id, e.g. for collection names."""
        key = json.dumps({k: getattr(self, k) for k in self.CHECKED}, sort_keys=True)
        return _sha(key.encode())[:12]

    def mismatch(self, other: Fingerprint, *, ignore: tuple[str, ...] = ()) -> str | None:
        """Name of the first checked field that differs, or None."""
        for name in self.CHECKED:
            if name not in ignore and getattr(self, name) != getattr(other, name):
                return name
        return None

    def check(self, loaded: Fingerprint, *, what: str = "memory", ignore: tuple[str, ...] = ()) -> None:
        """Raise FingerprintMismatchError if ``loaded`` is not the model this artifact was built for."""
        field = self.mismatch(loaded, ignore=ignore)
        if field is not None:
            raise FingerprintMismatchError(field, getattr(self, field), getattr(loaded, field), what=what)
