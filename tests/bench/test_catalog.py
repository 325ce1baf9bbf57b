"""The benchmark catalog: every task is listed, says what it scores, and runs through one call."""

from __future__ import annotations

import inspect

import pytest

from nativemem.bench import list_tasks
from nativemem.bench.catalog import SCORES, TASKS, check_task, run_task, task_arms, task_entry
from nativemem.errors import InputError, UnknownNameError


def test_every_registered_task_is_in_the_catalog_with_a_known_score():
    assert set(list_tasks()) <= set(TASKS)  # a QA task registered but not listed could not be run by name
    for name, entry in TASKS.items():
        assert entry.scores in SCORES, name
        if entry.driver is None:
            assert name in list_tasks()
            continue
        params = inspect.signature(entry.function()).parameters
        assert "out" in params, name
        default = params["arms"].default if "arms" in params else ()
        assert set(default) <= set(entry.arms), (name, default, entry.arms)  # the defaults are arms it knows


def test_unknown_names_and_options_are_refused_before_a_model_is_loaded():
    with pytest.raises(UnknownNameError, match="facts"):
        task_entry("fatcs")
    with pytest.raises(InputError, match="unknown facts arms"):
        check_task("facts", ["activation"], {})
    with pytest.raises(InputError, match="unknown mmlu options"):
        check_task("mmlu", [], {"no_such_option": 1})
    with pytest.raises(InputError, match="--limit does not apply to facts"):
        check_task("facts", [], {}, limit=3)
    with pytest.raises(InputError, match="takes no --arms"):
        check_task("write", ["none"], {})
    with pytest.raises(UnknownNameError):
        check_task("squad", ["no_such_arm"], {})
    assert "rag_bm25" in task_arms("squad") and "activation" in task_arms("needle")


def test_arms_that_learn_facts_are_offered_and_accepted_only_where_there_are_facts():
    assert {"pkm", "pkm_gated"} <= set(task_arms("facts"))
    assert not {"pkm", "pkm_gated"} & set(task_arms("squad")) and {"side_ffn", "lora"} <= set(task_arms("squad"))
    with pytest.raises(InputError, match="learns facts"):
        check_task("squad", ["none", "pkm_gated"], {})


def test_a_driven_task_and_a_qa_task_run_through_run_task(tmp_path, tiny_model):
    res = run_task("conversation", tiny_model, out=tmp_path / "conv", limit=2, max_new_tokens=2)
    assert set(res["arms"]) >= {"none"} and (tmp_path / "conv" / "results.json").exists()
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(" ".join(f"Sentence {i} of the essay is about gardens." for i in range(60)))
    res = run_task("needle", tiny_model, arms=["rag_bm25"], out=tmp_path / "needle", data=hay, max_new_tokens=2,
                   lengths=[100], depths=[0, 1])
    assert res["n"] == 2 and set(res["arms"]) == {"rag_bm25"}
