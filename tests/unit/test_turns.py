"""Long model work takes turns: every step of a consolidation (probes, pkm and side_ffn training) runs inside
the caller's turn, and between two steps the model is the bare model (no hook, no replaced layer left on it)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from testing import tiny_lm

import nativemem as nm
from nativemem.consolidate import consolidate
from nativemem.turns import model_step, taking_turns

TEXTS = ["The Velmora Institute was founded by Ada Quell in Tollen. The Amber Finch nests on Tollen Island.",
         "Mira keeps her copper lantern in the boathouse by the northern pier. Otto repairs violins in Harlow."]


def test_model_step_takes_the_turn_once_and_does_nothing_outside():
    entered = []

    @contextmanager
    def turn():
        entered.append(True)
        yield

    with model_step():  # outside taking_turns: nothing
        pass
    with taking_turns(turn):
        with model_step():
            with model_step():  # nested: part of the outer step
                pass
        with model_step():
            pass
    with model_step():
        pass
    assert len(entered) == 2


def test_a_turn_that_raises_abandons_the_work():
    class Stopped(Exception):
        pass

    @contextmanager
    def turn():
        raise Stopped
        yield

    with pytest.raises(Stopped), taking_turns(turn):
        with model_step():
            pytest.fail("the step ran without its turn")


@pytest.mark.parametrize("kind", ["pkm", "side_ffn"])
def test_between_two_steps_of_a_consolidation_the_model_is_the_bare_model(tmp_path, kind):
    lm = tiny_lm()
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41]])
    with torch.no_grad():
        bare = lm.model(input_ids=ids).logits.clone()
    act = nm.open_memory(tmp_path / "act", lm, kind="activation")
    act.add(TEXTS, user_id="alice")
    target = nm.open_memory(tmp_path / kind, lm, kind=kind)
    steps, inside, worst = [], [False], [0.0]

    @contextmanager
    def turn():
        assert not inside[0], "a step began inside another"
        # what another request sees when it gets the model between two steps (in its own thread: no autocast)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            got = lm.model(input_ids=ids).logits
        worst[0] = max(worst[0], float((got - bare).abs().max()))
        steps.append(1)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    with taking_turns(turn):
        receipt = consolidate(act, target, user_id="alice")
    assert not receipt.did_nothing and receipt.steps > 0
    assert worst[0] == 0.0, f"another request between two steps saw a changed model (max |dlogit| {worst[0]})"
    assert len(steps) > receipt.steps, "training steps ran outside a turn"  # probes and training, each a turn
    act.close()
