"""Fixtures of the server tests: a tiny random model saved to a folder, and live in-process servers.

The in-process server is real uvicorn on 127.0.0.1 (a thread of the test process); clients talk real HTTP
to it. Tests that must kill the server use ``nativemem serve`` as a subprocess with the saved model folder.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from testing import save_tiny_lm

import nativemem as nm
from nativemem.server import KeyRing, ServerSettings, ServerThread, create_app

MAX_BODY = 64 * 1024


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random llama + tokenizer saved with save_pretrained (loadable by `--model FOLDER`)."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class Served:
    url: str
    keys: dict[str, str]  # user -> key
    lm: object
    memory: object
    app: object

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


def _fast_dir() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="nativemem-server-test-", dir=shm if shm.is_dir() else None))


def start_server(model_dir: Path, users, *, settings: ServerSettings | None = None, dtype=None):
    """A context manager yielding a Served (its own memory folder, removed afterwards)."""
    from contextlib import contextmanager

    @contextmanager
    def run():
        folder = _fast_dir()
        lm = nm.load_model(model_dir, dtype=dtype)
        mem = nm.open_memory(folder / "m", lm, kind="activation", gate_threshold=0.0)  # every top_k hit
        keys = {u: f"test-key-{u}-0123456789" for u in users}
        app = create_app(keys=KeyRing({k: u for u, k in keys.items()}),
                         settings=settings or ServerSettings(max_body_bytes=MAX_BODY), lm=lm, memory=mem)
        try:
            with ServerThread(app) as server:
                yield Served(server.url, keys, lm, mem, app)
        finally:
            mem.close()
            del mem
            gc.collect()
            shutil.rmtree(folder, ignore_errors=True)

    return run()


@pytest.fixture(scope="module")
def served(model_dir):
    with start_server(model_dir, ["alice", "bob", "carol"]) as s:
        yield s
