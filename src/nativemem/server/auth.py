"""API keys of the server: a JSON file ``{"KEY": "USER_ID", ...}`` mapping each key to the user it acts as.

The file is named by ``--api-keys FILE`` or ``$NATIVEMEM_API_KEYS_FILE``. Keys are held only as sha256
digests after loading, compared by digest lookup, and never logged or echoed in an error message (a bad
file is described by line and field, not by content).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError

__all__ = ["KeyRing", "load_api_keys", "API_KEYS_ENV", "MAX_KEY_CHARS", "MAX_USER_ID_CHARS"]

API_KEYS_ENV = "NATIVEMEM_API_KEYS_FILE"
MAX_KEY_CHARS = 512
MAX_USER_ID_CHARS = 256
MAX_KEYS_FILE_BYTES = 16 << 20


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyRing:
    """Key -> user id, stored by key digest.

    Args:
        keys: ``{key: user_id}``; keys and user ids must be non-empty printable strings.
    """

    def __init__(self, keys: dict[str, str]):
        self._users: dict[str, str] = {}
        for i, (key, user) in enumerate(keys.items()):
            where = f"entry {i + 1}"
            if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS or not key.isprintable() \
                    or key != key.strip() or not key.isascii():
                raise InputError(f"API keys: the key of {where} must be a printable ASCII string of 1 to "
                                 f"{MAX_KEY_CHARS} characters without surrounding spaces (an HTTP header carries it)")
            if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_ID_CHARS \
                    or not user.isprintable() or user != user.strip():
                raise InputError(f"API keys: the user id of {where} must be a non-empty printable string of at most "
                                 f"{MAX_USER_ID_CHARS} characters without surrounding spaces")
            self._users[_digest(key)] = user
        if not self._users:
            raise InputError("API keys: the file maps no key to a user; add {\"KEY\": \"USER_ID\"} entries")

    def __len__(self) -> int:
        return len(self._users)

    def user_for(self, key: str | None) -> str | None:
        """The user id of ``key``, or None for a missing or unknown key."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        return self._users.get(_digest(key))

    def users(self) -> set[str]:
        return set(self._users.values())


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for i, (k, v) in enumerate(pairs):
        if k in seen:
            raise _DuplicateKey(i + 1)  # the position, never the key itself
        seen[k] = v
    return seen


def load_api_keys(path: str | os.PathLike | None = None) -> KeyRing | None:
    """Read the key file named by ``path`` or ``$NATIVEMEM_API_KEYS_FILE``; None when neither is set.

    Raises:
        InputError: the file is missing, too large, not UTF-8 JSON, or not an object of strings.
    """
    if path is None:
        path = os.environ.get(API_KEYS_ENV) or None
        if path is None:
            return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"API keys file {path} does not exist")
    if path.stat().st_size > MAX_KEYS_FILE_BYTES:
        raise InputError(f"API keys file {path} is larger than {MAX_KEYS_FILE_BYTES >> 20} MiB")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise InputError(f"API keys file {path} is not UTF-8 (bad byte at offset {e.start})") from None
    except ValueError as e:  # the message names a line and column, never the content
        raise InputError(f"API keys file {path} is not valid JSON: line {getattr(e, 'lineno', '?')}, column "
                         f"{getattr(e, 'colno', '?')}") from None
    except RecursionError:
        raise InputError(f"API keys file {path} is nested too deeply") from None
    except _DuplicateKey as e:
        raise InputError(f"API keys file {path} lists entry {e.args[0]} twice (a key can belong to one user only)") \
            from None
    if not isinstance(data, dict):
        raise InputError(f"API keys file {path} must hold one JSON object {{\"KEY\": \"USER_ID\", ...}}, "
                         f"not a {type(data).__name__}")
    return KeyRing(data)
