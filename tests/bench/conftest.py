"""Fixtures for the benchmark-harness tests: a tiny SQuAD file written per test, a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_fixtures import SQUAD


@pytest.fixture
def squad_file(tmp_path: Path) -> Path:
    """A tiny SQuAD-format file."""
    path = tmp_path / "squad-tiny.json"
    path.write_text(json.dumps(SQUAD), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny random Llama from tests/testing.py (512-token window)."""
    from testing import tiny_lm

    return tiny_lm()
