"""pkm facts: the seeded generator, every accepted input form, JSONL files and bad input."""

import json

import pytest

from nativemem.errors import DataError, InputError
from nativemem.memories.pkm import RELATIONS, Fact, generate_facts, load_facts, parse_facts, save_facts


def test_generator_is_seeded_and_deterministic():
    a, b, c = generate_facts(40, seed=1), generate_facts(40, seed=1), generate_facts(40, seed=2)
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.prompt for f in a] != [f.prompt for f in c]
    assert generate_facts(10, seed=1) == a[:10]  # a prefix of a larger set


def test_generated_facts_are_well_formed():
    facts = generate_facts(203, seed=0)
    assert len(facts) == 203 and len({f.id for f in facts}) == 203
    assert len({f.key for f in facts}) == 203  # no two facts share a prompt
    people = {f.meta["person"] for f in facts}
    assert len(people) == 51  # 4 relations per invented person
    for f in facts:
        assert f.chat and f.answer.strip() and f.answer in f.sentence
        assert f.meta["entity"] in f.prompt and f.meta["relation"] in RELATIONS
        assert len(f.paraphrases) == 4 and f.prompt not in f.paraphrases
        assert all(f.meta["entity"] in p for p in f.paraphrases)
    years = [int(f.answer) for f in facts if f.meta["relation"] == "birth_year"]
    assert all(1700 <= y <= 1999 for y in years)
    cities = [f.answer for f in facts if f.meta["relation"] == "birth_city"]
    assert len(set(cities)) == len(cities)  # invented names never repeat


def test_generator_bad_input():
    with pytest.raises(InputError):
        generate_facts(0)
    with pytest.raises(InputError, match="unknown relations"):
        generate_facts(3, relations=("shoe_size",))


def test_every_input_form():
    facts = parse_facts([
        {"prompt": "What is X?", "answer": "Y", "id": "x1", "paraphrases": ["Tell me X."]},
        {"question": "Q?", "answer": 7},
        {"entity": "Zed Quorn", "relation": "birth_city", "value": "Bramholm"},
        {"entity": "Zed Quorn", "attribute": "shoe size", "answer": "44"},
        ("Who?", "Me"),
        ("Ada Lin", "employer", "Vexa Labs"),
        "Why?\tBecause",
        '{"prompt": "JSON?", "answer": "yes"}',
        "Paris is the capital of France.",
        Fact("Raw prompt", "answer", "f9"),
    ])
    assert [f.prompt for f in facts] == [
        "What is X?", "Q?", "In which city was Zed Quorn born?", "What is the shoe size of Zed Quorn?", "Who?",
        "Which company does Ada Lin work for?", "Why?", "JSON?", "Paris is the capital of", "Raw prompt"]
    assert [f.answer for f in facts] == ["Y", "7", "Bramholm", "44", "Me", "Vexa Labs", "Because", "yes", "France.",
                                         "answer"]
    assert facts[0].id == "x1" and facts[0].paraphrases == ("Tell me X.",)
    assert facts[2].paraphrases and facts[2].sentence == "Zed Quorn was born in the city of Bramholm."
    assert not facts[8].chat and all(f.chat for f in facts[:8])
    assert len({f.id for f in facts}) == len(facts)


def test_a_multiline_string_is_split_into_lines():
    text = '{"prompt": "A?", "answer": "a"}\n\nB?\tb\nC is the letter after B.\n'
    facts = parse_facts(text)
    assert [(f.prompt, f.answer, f.chat) for f in facts] == [("A?", "a", True), ("B?", "b", True),
                                                               ("C is the letter after", "B.", False)]


def test_ids_are_stable_and_follow_the_prompt():
    a, b = parse_facts([("What  is X?", "Y")])[0], parse_facts([("What is X?", "Z")])[0]
    assert a.id == b.id and a.key == b.key  # same prompt: same fact (a later answer replaces it)


@pytest.mark.parametrize("bad", [
    [{"prompt": "Q?", "answer": ""}], [{"prompt": "Q?", "answer": "   "}], [("Q?", "")], ["Q?\t "],
    [{"entity": "E", "relation": "r", "value": ""}], [{"prompt": "Q?"}], [{"foo": 1}], [3.5], [("a",)],
    [], "", "   ", b"\xff\xfe", ["oneword"], ['{"prompt": "x", "answer": }'],
])
def test_bad_input_is_an_input_error(bad):
    with pytest.raises(InputError):
        parse_facts(bad)


def test_load_and_save_facts_round_trip(tmp_path):
    facts = generate_facts(9, seed=3)
    path = save_facts(facts, tmp_path / "facts.jsonl")
    rows = load_facts(path)
    assert len(rows) == 9 and rows[0]["entity"] == facts[0].meta["entity"]
    assert parse_facts(rows) == facts
    tsv = tmp_path / "facts.tsv"
    tsv.write_text("Q1?\tA1\n\nQ2?\tA2\n")
    assert [(f.prompt, f.answer) for f in parse_facts(load_facts(tsv))] == [("Q1?", "A1"), ("Q2?", "A2")]


def test_load_facts_errors_name_the_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_facts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q?", "answer": "A"}) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        load_facts(bad)
    empty_answer = tmp_path / "empty.jsonl"
    empty_answer.write_text(json.dumps({"prompt": "Q?", "answer": ""}) + "\n")
    with pytest.raises(DataError, match="line 1.*empty"):
        load_facts(empty_answer)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no facts"):
        load_facts(tmp_path / "blank.jsonl")
    (tmp_path / "prose.txt").write_text("just a sentence\n")
    with pytest.raises(DataError, match="line 1"):
        load_facts(tmp_path / "prose.txt")


def test_augmentation_never_makes_a_held_out_phrasing_and_starts_with_the_fact_itself():
    from nativemem.memories.pkm.augment import phrasings

    for fact in generate_facts(8, seed=3):
        spec = RELATIONS[fact.meta["relation"]]
        held_out = {q.format(e=fact.meta["entity"]) for q in spec["heldout"]} | {fact.meta.get("reverse", [""])[0]}
        assert set(fact.paraphrases) <= held_out
        for n in (1, 2, 4, 9):
            aug = phrasings(fact, n)
            assert aug.items[0].prompt == fact.prompt and aug.items[0].answer == fact.answer
            forward = [p for p in aug.items if p.kind != "reverse questions"]
            assert len(forward) == min(n, 1 + len(spec["train"]) - 1 + len(spec["sentences"]))
            assert not {p.prompt for p in aug.items} & held_out
            assert len({(p.prompt, p.chat) for p in aug.items}) == len(aug.items)
            completions = [p for p in forward if not p.chat]
            assert all(f"{p.prompt} {p.answer}" in {t.format(e=fact.meta["entity"], v=fact.answer).rstrip(".")
                                                     for t in spec["sentences"]} for p in completions)
            reverse = [p for p in aug.items if p.kind == "reverse questions"]
            assert reverse == ([] if n == 1 or "reverse" not in spec else
                               [type(reverse[0])(spec["reverse"][0].format(v=fact.answer), fact.meta["entity"],
                                                 True, "reverse questions")])
        assert phrasings(fact, 12).skipped == 12 - (len(spec["train"]) + len(spec["sentences"]))  # too few templates
        assert phrasings(fact, 3).skipped == 0


def test_question_facts_get_surface_variants_and_their_sentence_and_completions_stay_as_they_are():
    from nativemem.memories.pkm.augment import phrasings

    fact = parse_facts([{"prompt": "What is my locker code?", "answer": "4711",
                         "sentence": "My locker code is 4711."}])[0]
    aug = phrasings(fact, 3)
    assert [p.prompt for p in aug.items] == ["What is my locker code?", "Question: What is my locker code?",
                                             "My locker code is"]
    assert [p.chat for p in aug.items] == [True, True, False] and {p.answer for p in aug.items} == {"4711"}
    sentence = parse_facts(["Paris is the capital of France."])[0]
    assert [(p.prompt, p.answer, p.chat) for p in phrasings(sentence, 4).items] == [
        ("Paris is the capital of", "France.", False)]


@pytest.mark.parametrize("text, entity, relation, value", [
    ("Marie Curie was born in Warsaw.", "Marie Curie", "birth_city", "Warsaw"),
    ("Marie Curie was born in 1867.", "Marie Curie", "birth_year", "1867"),
    ("Ada Lind was born in the city of Port Elm.", "Ada Lind", "birth_city", "Port Elm"),
    ("Ada Lind works for Nordic Robotics.", "Ada Lind", "employer", "Nordic Robotics"),
    ("The home town of Ada Lind is Oslo.", "Ada Lind", "home_town", "Oslo"),
    ("Bob's favourite colour is teal.", "Bob", "favourite_colour", "teal"),
])
def test_sentences_stating_an_attribute_become_facts(text, entity, relation, value):
    from nativemem.memories.pkm.augment import fact_of_sentence

    fact = fact_of_sentence(text)
    assert (fact.meta["entity"], fact.meta["relation"], fact.answer) == (entity, relation, value)
    assert fact.chat and entity in fact.prompt and fact.paraphrases


@pytest.mark.parametrize("text", ["It rains a lot.", "Marie Curie was born in Warsaw in 1867.",
                                  "Paris is the capital of France.", "we met at noon"])
def test_other_sentences_stay_sentences(text):
    from nativemem.memories.pkm.augment import fact_of_sentence

    assert fact_of_sentence(text) is None
