"""Helpers for the activation-memory tests (kept out of tests/testing.py, which other kinds share).

Qdrant Edge fsyncs on every flush; on a busy shared disk one memory costs ~1 s to create. Tests that do
not test durability put their memory folders on tmpfs (/dev/shm) when the machine has one. The crash and
lock tests use pytest's tmp_path on the real disk.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

FIT_TEXTS = [
    "The river flooded the valley in spring. Farmers moved their cattle to the hills.",
    "A violin has four strings. It is played with a bow made of horsehair.",
    "The library opens at nine. Students study there until late at night.",
    "Volcanoes form where plates meet. Lava cools into new rock over centuries.",
    "The bakery sells bread and cakes. Its owner wakes up at four every morning.",
    "Chess is played on a board of sixty-four squares. Each player starts with sixteen pieces.",
    "The train to the coast leaves hourly. The journey takes about two hours.",
    "Honey bees live in colonies. A queen lays thousands of eggs each day.",
    "The museum shows old maps. Some were drawn by sailors five centuries ago.",
    "Copper conducts electricity well. It is used in most household wiring.",
    "The festival lasts three days. Musicians play on five stages in the park.",
    "Owls hunt at night. Their soft feathers let them fly almost silently.",
]


@pytest.fixture
def fast_dir(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="nativemem-test-", dir=shm))
    try:
        yield d
    finally:
        import gc

        gc.collect()  # close stores of memories the test left behind before their folder goes
        shutil.rmtree(d, ignore_errors=True)


def assert_spliced_injection_equals_text(lm, pinned, prompt, text, tol: float) -> None:
    """Injecting ``pinned`` before ``prompt`` gives the token sequence ``text`` and, for the prompt part, the
    logits that ``text`` given whole gives."""
    import torch

    with pinned.active(lm=lm) as inj:
        kwargs = inj.generate_kwargs(prompt)
    assert torch.equal(kwargs["input_ids"], text)
    n = inj.prefix_length
    with torch.inference_mode():
        got = lm.model(input_ids=text[:, n:], past_key_values=kwargs["past_key_values"]).logits
    torch.testing.assert_close(got, lm.logits(text)[:, n:], rtol=tol, atol=tol)
