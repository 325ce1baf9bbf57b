"""Shared prompt layout and answer post-processing."""

from __future__ import annotations

from nativemem.prompting import DEFAULT_SYSTEM, build_messages, postprocess_answer


def test_messages_without_context():
    msgs = build_messages("Who?")
    assert msgs[0] == {"role": "system", "content": DEFAULT_SYSTEM}
    assert msgs[1]["content"] == "Question: Who?"


def test_messages_number_passages_before_question():
    body = build_messages("Who?", ["first  passage\ntext", "second"])[1]["content"]
    assert body.index("[1] first passage text") < body.index("[2] second") < body.index("Question: Who?")


def test_postprocess_answer():
    assert postprocess_answer("Answer: Paris.\nBecause it is the capital.") == "Paris"
    assert postprocess_answer('\n\n  "Jane Doe"  ') == "Jane Doe"
    assert postprocess_answer("The answer is 42") == "42"
    assert postprocess_answer("A-10 Warthog") == "A-10 Warthog"
    assert postprocess_answer("**Paris.**") == "Paris"
    assert postprocess_answer("   ") == ""
    assert postprocess_answer("The answer to this question is: colonial rule.") == "colonial rule"
    assert postprocess_answer("The answer to this question is:\n\nAnswer: Times Square\nmore") == "Times Square"
    assert postprocess_answer("Answer is 42") == "42"
    assert postprocess_answer("Answering machines") == "Answering machines"
    assert postprocess_answer("A: B") == "B"


def test_stop_strings_end_generation_and_their_criterion_is_built_once():
    """Stop strings end the answer (cut from the text); the vocabulary scan behind them runs once per set of
    strings, not on every call (it costs seconds on a large vocabulary)."""
    from testing import tiny_lm

    from nativemem.model import Sampling

    lm = tiny_lm()
    ids = lm.chat_ids("Say something.")
    free = lm.generate(ids, max_new_tokens=12)
    assert len(free.text) > 2
    stop = free.text[1:3]
    built = set()
    for _ in range(3):
        cut = lm.generate(ids, max_new_tokens=12, sampling=Sampling(stop=(stop,)))
        assert stop not in cut.text and free.text.startswith(cut.text) and cut.stopped
        built.add(id(lm._decoding(Sampling(stop=(stop,)))["stopping_criteria"][0]))
    assert len(built) == 1
