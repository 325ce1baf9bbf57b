"""Shared fixtures. Tests import helpers from tests/testing.py (tiny models built in-process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import testing`

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NATIVEMEM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"evaluation data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def real_lm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    import nativemem as nm

    return nm.load_model()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the session (skipped where none is installed, unless NATIVEMEM_REQUIRE_REDIS=1,
    as CI sets: there a missing server fails)."""
    from nativemem.testing.redis import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except FileNotFoundError as e:
        if os.environ.get("NATIVEMEM_REQUIRE_REDIS") == "1":
            raise
        pytest.skip(str(e))
    yield server
    server.kill()


@pytest.fixture
def tiny():
    from testing import tiny_lm

    return tiny_lm()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny matmuls are far slower with 2 OpenMP threads on a shared 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
