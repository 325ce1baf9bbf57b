"""Task loaders, seeded selection, pools, data errors and the task/arm registries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_fixtures import TRIVIAQA_FILE

from nativemem.bench import get_arm, get_task, list_arms, list_tasks
from nativemem.bench.tasks import DATA_ENV, data_root
from nativemem.bench.tasks.squad import SquadTask
from nativemem.bench.tasks.triviaqa import TriviaQATask, split_paragraphs
from nativemem.errors import DataError, InputError, UnknownNameError


def test_registries_list_builtins():
    assert {"squad", "triviaqa"} <= set(list_tasks())
    assert {"none", "rag_bm25", "rag_dense", "long_context"} <= set(list_arms())


def test_unknown_names_suggest_closest():
    with pytest.raises(UnknownNameError, match="rag_bm25"):
        get_arm("rag_bm52")
    with pytest.raises(UnknownNameError, match="squad"):
        get_task("sqaud")


def test_squad_loads_items_and_chunks(squad_file):
    data = SquadTask(squad_file).data
    assert [i.id for i in data.items] == ["a1", "a2", "b1", "b2", "d1", "d2"]
    assert data.skipped == 1  # the unanswerable question
    a1 = data.items[0]
    assert a1.answers == ("1850", "in 1850")  # deduplicated, in order
    assert a1.gold_chunk_ids == ("0:0",)
    assert a1.source_chunk_ids == ("0:0", "0:1")
    assert a1.meta["title"] == "Alpha Town"
    assert set(data.chunks) == {"0:0", "0:1", "1:0", "1:1", "2:0", "2:1"}


def test_seeded_limit_order_is_stable_and_seed_dependent(squad_file):
    task = SquadTask(squad_file)
    first = [i.id for i in task.select(4, seed=0)]
    assert first == [i.id for i in SquadTask(squad_file).select(4, seed=0)]
    orders = {tuple(i.id for i in task.select(None, seed=s)) for s in range(6)}
    assert len(orders) > 1
    assert [i.id for i in task.select(None, seed=0)][:4] == first  # limit = prefix of the seeded order
    with pytest.raises(InputError):
        task.select(0, seed=0)


def test_pool_has_every_paragraph_of_selected_articles(squad_file):
    task = SquadTask(squad_file)
    items = task.select(2, seed=5)
    pool_ids = {c.id for c in task.pool_for(items)}
    articles = {i.gold_chunk_ids[0].split(":")[0] for i in items}
    expected = {cid for cid in task.data.chunks if cid.split(":")[0] in articles}
    assert pool_ids == expected
    assert all(gold in pool_ids for i in items for gold in i.gold_chunk_ids)


def test_long_context_source_is_whole_article_in_order(squad_file):
    task = SquadTask(squad_file)
    item = next(i for i in task.data.items if i.id == "d2")
    assert [c.text for c in task.source_of(item)] == [
        "The Delta Bridge is made of red steel.",
        "It opened to traffic in May 1999.",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "top level"),
        ('{"version": "1.1"}', "'data'"),
        ('{"data": [{"title": "x", "paragraphs": [{"qas": []}]}]}', "data\\[0\\].paragraphs\\[0\\].*'context'"),
        ('{"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": []}]}]}]}',
         "'question'"),
    ],
)
def test_malformed_squad_raises_data_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        SquadTask(path).data
    assert str(path) in str(info.value)


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        SquadTask(tmp_path / "nope.json").data


def test_data_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert SquadTask().path == tmp_path / "squad" / "squad-v1.1-dev.json"


def test_unknown_task_option_is_an_error(squad_file):
    with pytest.raises(InputError, match="bogus"):
        SquadTask(squad_file, bogus=1)


def test_triviaqa_fixture_loads():
    task = TriviaQATask(TRIVIAQA_FILE)
    data = task.data
    assert [i.id for i in data.items] == ["tq_0001", "tq_0002"]
    assert data.skipped == 1  # the question without an Answer
    first = data.items[0]
    assert first.answers[0] == "Glimmerwick" and "glimmer wick" in first.answers
    assert first.gold_chunk_ids == ()
    assert "The Pellucid Sea" in data.items[1].answers
    sources = task.source_of(first)
    assert {c.doc_id for c in sources} == {"wikipedia/Zorbian_Empire.txt", "web/17/17_0001.txt"}
    assert any("Glimmerwick" in c.text for c in sources)
    pool = task.pool_for(data.items)
    ids = [c.id for c in pool]
    assert len(ids) == len(set(ids))  # the shared Zorbian page is in the pool once
    assert {c.doc_id for c in pool} == {"wikipedia/Zorbian_Empire.txt", "web/17/17_0001.txt",
                                         "wikipedia/Quorvant_River.txt"}


def test_triviaqa_missing_evidence_names_file(tmp_path):
    raw = json.loads(TRIVIAQA_FILE.read_text())
    raw["Data"][0]["EntityPages"][0]["Filename"] = "Missing_Page.txt"
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(raw))
    task = TriviaQATask(path, evidence_dir=TRIVIAQA_FILE.parent.parent / "evidence")
    with pytest.raises(DataError, match="Missing_Page.txt"):
        task.pool_for(task.select(None, seed=0))


def test_triviaqa_malformed(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"Version": 1.0}')
    with pytest.raises(DataError, match="'Data'"):
        TriviaQATask(path).data


def test_split_paragraphs_bounds_chunk_size():
    text = "one two\n\nthree four five\n" + " ".join(["w"] * 25)
    chunks = split_paragraphs(text, max_words=10)
    assert chunks[0] == "one two three four five"
    assert all(len(c.split()) <= 10 for c in chunks)
    assert sum(len(c.split()) for c in chunks) == 30


def test_real_squad_file_loads(data_dir: Path):
    task = SquadTask(data_dir / "squad" / "squad-v1.1-dev.json")
    items = task.select(3, seed=0)
    assert len(items) == 3 and all(i.answers for i in items)
    assert len(task.pool_for(items)) >= 3
