"""Facts: what the pkm memory stores, how user input becomes facts, and a seeded synthetic generator.

A :class:`Fact` is a prompt and its answer. Accepted inputs (:func:`parse_facts`):

- ``{"prompt": q, "answer": a}`` (``"question"`` works too), optional ``"id"``, ``"paraphrases"`` (other
  phrasings, used for evaluation only) and ``"sentence"`` (a declarative form, used by RAG baselines);
- ``{"entity": e, "relation": r, "value": v}`` (``"attribute"``/``"answer"`` work too): rendered by the
  relation's templates (:data:`RELATIONS`; an unknown relation gets "What is the {relation} of {entity}?");
- ``(prompt, answer)`` or ``(entity, relation, value)`` tuples; :class:`Fact` objects;
- strings: a JSON object (one JSONL line), ``"prompt<TAB>answer"``, or a plain sentence. A plain sentence
  becomes a **completion fact** (no chat format): the prompt is every word but the last, the answer is
  the last word, e.g. "Paris is the capital of" -> "France.". A string with several lines is split into
  lines first (what ``nativemem add facts.jsonl`` passes).

Chat facts (``chat=True``) are trained and asked as a user message with the answer as the assistant's
reply; completion facts are raw text.

:func:`generate_facts` makes facts the model cannot know: invented people with a birth city, a birth
year, an employer and a colour code; each relation has question phrasings that augmentation may train and
held-out ones that no training uses (:data:`RELATIONS`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from ...text import check_text

__all__ = ["Fact", "RELATIONS", "parse_facts", "load_facts", "save_facts", "generate_facts", "fact_id",
           "relation_templates"]


@dataclass(frozen=True)
class Fact:
    """One stored fact.

    Attributes:
        prompt: the question (chat facts) or the text the answer completes (completion facts).
        answer: the exact answer; greedy decoding of the prompt must reproduce it.
        id: stable id (derived from the prompt unless given).
        chat: True for a chat question, False for a raw-text completion.
        paraphrases: other phrasings of the prompt, for evaluation only (never trained).
        sentence: a declarative form of the fact (what a RAG baseline indexes).
        meta: anything else (entity, relation, ...).
    """

    prompt: str
    answer: str
    id: str = ""
    chat: bool = True
    paraphrases: tuple[str, ...] = ()
    sentence: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """What identifies the fact for duplicate detection: its prompt (whitespace-normalised)."""
        return ("chat:" if self.chat else "text:") + " ".join(self.prompt.split())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        return d


def fact_id(prompt: str, chat: bool = True) -> str:
    """Stable id of a fact from its prompt."""
    key = ("chat:" if chat else "text:") + " ".join(prompt.split())
    return "pkm-" + hashlib.sha1(key.encode()).hexdigest()[:12]


# Per relation ({e} the entity, {v} the value): ``train``, the question phrasings augmentation trains (the first
# is the fact's own prompt); ``heldout``, phrasings no training ever uses (evaluation only: they are the fact's
# ``paraphrases``); ``sentences``, declarative forms ending with the value (the first is the fact's sentence;
# augmentation trains them as completions); ``reverse``, where the value names one entity, questions asked the
# other way round (first: trained by augmentation; second: held out).
RELATIONS: dict[str, dict[str, Any]] = {
    "birth_city": {
        "train": ("In which city was {e} born?", "Where was {e} born?", "What is the birthplace of {e}?",
                  "Which city is the birthplace of {e}?", "Tell me where {e} was born.", "{e} was born where?"),
        "heldout": ("Name the city where {e} was born.", "{e} was born in which city?",
                    "What city did {e} come into the world in?", "Where is {e} originally from, by birth?"),
        "sentences": ("{e} was born in the city of {v}.", "The birthplace of {e} is {v}.", "{e} was born in {v}."),
        "reverse": ("Who was born in {v}?", "Which person has {v} as their birthplace?"),
    },
    "birth_year": {
        "train": ("In which year was {e} born?", "When was {e} born?", "What is the birth year of {e}?",
                  "Which year was {e} born in?", "Tell me the year {e} was born.", "{e} was born when?"),
        "heldout": ("Give the year of {e}'s birth.", "{e} was born in what year?", "What year did {e} come into "
                    "the world?", "In what year is {e}'s birthday recorded?"),
        "sentences": ("{e} was born in {v}.", "The birth year of {e} is {v}.", "{e} was born in the year {v}."),
    },
    "employer": {
        "train": ("Which company does {e} work for?", "Who is {e}'s employer?", "Where does {e} work?",
                  "What company employs {e}?", "Tell me who employs {e}.", "{e} works for which company?"),
        "heldout": ("Name the employer of {e}.", "{e} is employed by which company?", "For which firm does {e} "
                    "work?", "Which business is {e} on the payroll of?"),
        "sentences": ("{e} works for {v}.", "The employer of {e} is {v}.", "{e} is employed by {v}."),
        "reverse": ("Who works for {v}?", "Which person is employed by {v}?"),
    },
    "colour_code": {
        "train": ("What is the colour code of {e}?", "Which colour code was assigned to {e}?",
                  "What colour code does {e} have?", "Which colour code belongs to {e}?",
                  "Tell me the colour code of {e}.", "{e}'s colour code is what?"),
        "heldout": ("Give the colour code of {e}.", "Tell me {e}'s colour code.", "{e} has which colour code?",
                    "What code of colour is {e} assigned?"),
        "sentences": ("The colour code of {e} is {v}.", "{e} has the colour code {v}.",
                      "{e}'s colour code is {v}."),
    },
}


def _generic_relation(relation: str) -> dict[str, Any]:
    """Templates of a relation :data:`RELATIONS` does not know (its name in words: "home town")."""
    r = relation.replace("_", " ").strip()
    return {"train": (f"What is the {r} of {{e}}?", f"What is {{e}}'s {r}?", f"Tell me the {r} of {{e}}.",
                      f"Which {r} does {{e}} have?", f"{{e}}'s {r} is what?", f"Do you know the {r} of {{e}}?"),
            "heldout": (f"Name the {r} of {{e}}.", f"What would {{e}} give as their {r}?"),
            "sentences": (f"The {r} of {{e}} is {{v}}.", f"{{e}}'s {r} is {{v}}.")}


def relation_templates(relation: str) -> dict[str, Any]:
    return RELATIONS.get(relation) or _generic_relation(relation)


def _relation_fact(entity: str, relation: str, value: str, fid: str | None = None) -> Fact:
    spec = relation_templates(relation)
    prompt = spec["train"][0].format(e=entity)
    meta: dict[str, Any] = {"entity": entity, "relation": relation}
    if spec.get("reverse"):
        meta["reverse"] = [spec["reverse"][1].format(v=value), entity]  # held out: evaluation only
    return Fact(prompt, value, fid or fact_id(prompt), True, tuple(q.format(e=entity) for q in spec["heldout"]),
                spec["sentences"][0].format(e=entity, v=value), meta)


def _qa_fact(prompt: str, answer: str, fid: str | None = None, paraphrases: Sequence[str] = (),
             sentence: str = "", chat: bool = True, meta: dict | None = None) -> Fact:
    prompt = " ".join(prompt.split())
    return Fact(prompt, answer.strip(), fid or fact_id(prompt, chat), chat,
                tuple(" ".join(p.split()) for p in paraphrases), sentence or f"{prompt} {answer.strip()}", meta or {})


def _sentence_fact(text: str) -> Fact:
    words = text.split()
    if len(words) < 2:
        raise InputError(f"a plain-sentence fact needs at least two words (prompt and answer), got {text!r}")
    prompt, answer = " ".join(words[:-1]), words[-1]
    return Fact(prompt, answer, fact_id(prompt, chat=False), False, (), " ".join(words))


def _from_dict(d: dict[str, Any], where: str) -> Fact:
    def text(key: str) -> str:
        value = d.get(key)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        return str(value)

    fid = str(d["id"]) if d.get("id") not in (None, "") else None
    answer_key = next((k for k in ("answer", "value") if k in d), None)
    if answer_key is not None and not text(answer_key).strip():
        raise InputError(f"{where}: the answer is empty")
    if "entity" in d:
        relation = next((k for k in ("relation", "attribute") if k in d), None)
        if relation is None or answer_key is None:
            raise InputError(f"{where}: an entity fact needs 'relation' (or 'attribute') and 'value' (or 'answer')")
        return _relation_fact(text("entity").strip(), text(relation).strip(), text(answer_key).strip(), fid)
    prompt_key = next((k for k in ("prompt", "question") if k in d), None)
    if prompt_key is not None:
        if answer_key is None:
            raise InputError(f"{where}: the fact has no 'answer'")
        check_text(text(prompt_key), what=f"{where} prompt")
        paraphrases = d.get("paraphrases") or ()
        if isinstance(paraphrases, str) or not all(isinstance(p, str) and p.strip() for p in paraphrases):
            raise InputError(f"{where}: 'paraphrases' must be a list of non-empty strings")
        meta = {k: v for k, v in d.items() if k not in ("id", "prompt", "question", "answer", "value", "paraphrases",
                                                          "sentence", "chat")}
        return _qa_fact(text(prompt_key), text(answer_key), fid, paraphrases, str(d.get("sentence") or ""),
                        bool(d.get("chat", True)), meta)
    if "text" in d:
        return _sentence_fact(check_text(text("text"), what=where))
    raise InputError(f"{where}: a fact needs 'prompt' and 'answer', or 'entity', 'relation' and 'value', or 'text'")


def _from_string(s: str, where: str) -> list[Fact]:
    lines = [ln for ln in s.splitlines() if ln.strip()]
    if len(lines) > 1:
        return [f for i, ln in enumerate(lines) for f in _from_string(ln, f"{where} line {i + 1}")]
    s = s.strip()
    if s.startswith("{"):
        try:
            d = json.loads(s)
        except ValueError as e:
            raise InputError(f"{where}: starts with '{{' but is not a JSON object ({e})") from None
        return [_from_dict(d, where)]
    if "\t" in s:
        prompt, _, answer = s.partition("\t")
        if not answer.strip():
            raise InputError(f"{where}: the answer (after the tab) is empty")
        check_text(prompt, what=f"{where} prompt")
        return [_qa_fact(prompt, answer)]
    return [_sentence_fact(s)]


def parse_facts(items: Any) -> list[Fact]:
    """Turn any accepted input (see the module docstring) into facts, in order.

    Raises:
        InputError: empty input, an empty answer, a malformed item (the message says which item).
    """
    if isinstance(items, (str, bytes, bytearray, dict, Fact)) or (isinstance(items, tuple) and items
                                                                 and all(isinstance(v, str) for v in items)):
        items = [items]
    items = list(items) if isinstance(items, Iterable) else [items]
    if not items:
        raise InputError("no facts given")
    facts: list[Fact] = []
    for i, item in enumerate(items):
        where = f"fact {i}" if len(items) > 1 else "fact"
        if isinstance(item, Fact):
            if not item.answer.strip():
                raise InputError(f"{where}: the answer is empty")
            facts.append(item)
        elif isinstance(item, (str, bytes, bytearray)):
            facts.extend(_from_string(check_text(item, what=where), where))
        elif isinstance(item, dict):
            facts.append(_from_dict(item, where))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3) and all(isinstance(v, str) for v in item):
            if not item[-1].strip():
                raise InputError(f"{where}: the answer is empty")
            if len(item) == 2:
                check_text(item[0], what=f"{where} prompt")
                facts.append(_qa_fact(item[0], item[1]))
            else:
                facts.append(_relation_fact(item[0].strip(), item[1].strip(), item[2].strip()))
        else:
            raise InputError(f"{where}: expected a dict, a (prompt, answer) or (entity, relation, value) tuple, "
                             f"or a string, got {type(item).__name__}")
    return facts


def load_facts(path: str | Path) -> list[dict[str, Any]]:
    """Read a facts file: JSONL (one fact object per line) or TSV (``prompt<TAB>answer`` per line).

    Returns:
        One dict per fact, ready for ``PKMMemory.add``.

    Raises:
        DataError: the file is missing, empty, or a line is malformed (the message names the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                d = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
        elif "\t" in line:
            prompt, _, answer = line.partition("\t")
            d = {"prompt": prompt, "answer": answer}
        else:
            raise DataError(f"{path}: line {n} is neither a JSON object nor 'prompt<TAB>answer'")
        try:
            parse_facts([d])
        except InputError as e:
            raise DataError(f"{path}: line {n}: {e}") from None
        out.append(d)
    if not out:
        raise DataError(f"{path}: no facts in the file")
    return out


def save_facts(facts: Sequence[Fact], path: str | Path) -> Path:
    """Write facts as JSONL (one object per line, readable by :func:`load_facts`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for fact in facts:
            d = fact.to_dict()
            d.update(d.pop("meta"))
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------- synthetic facts
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v",
           "w", "z", "gr", "st", "tr", "sh", "k", "l", "m", "r")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
_CODAS = ("", "", "", "", "n", "l", "r", "s", "m", "x", "nd", "rk")
_CITY_ENDS = ("holm", "ford", "vale", "burg", "mouth", "stad", "wick", "haven", "thorpe", "mere", "gard", "port")
_COMPANY_ENDS = ("Dynamics", "Labs", "Works", "Holdings", "Systems", "Foundry", "Analytics", "Logistics",
                 "Industries", "Collective", "Robotics", "Textiles")
_COLOURS = ("amber", "cobalt", "crimson", "jade", "ochre", "teal", "violet", "umber", "indigo", "saffron", "slate",
            "coral", "olive", "ivory", "scarlet", "azure")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(*syllables))).capitalize()


def generate_facts(num_facts: int, seed: int = 0, relations: Sequence[str] = tuple(RELATIONS)) -> list[Fact]:
    """``num_facts`` synthetic facts about invented people (seeded, deterministic).

    People get all relations in turn (person 0: birth city, birth year, employer, colour code; person 1:
    ...), so several facts share an entity. Names, cities, companies and colour codes are made of random
    syllables and never repeat within one call. Each fact's ``paraphrases`` are the relation's held-out
    question phrasings (never trained, augmented or not; for paraphrase recall), its ``sentence`` a declarative
    form, and ``meta["reverse"]`` a held-out reverse question where the value names one person.

    Raises:
        InputError: num_facts < 1 or an unknown relation.
    """
    if isinstance(num_facts, bool) or not isinstance(num_facts, int) or num_facts < 1:
        raise InputError(f"num_facts must be a positive integer, got {num_facts!r}")
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown or not relations:
        raise InputError(f"unknown relations {unknown}; known: {', '.join(RELATIONS)}")
    rng = random.Random(f"nativemem-facts-{seed}")
    used: set[str] = set()

    def fresh(make) -> str:
        for _ in range(1000):
            value = make()
            if value.lower() not in used:
                used.add(value.lower())
                return value
        raise RuntimeError("could not draw a fresh name")  # pragma: no cover (needs ~10^6 facts)

    values = {
        "birth_city": lambda: fresh(lambda: _word(rng, (1, 2)) + rng.choice(_CITY_ENDS)),
        "birth_year": lambda: str(rng.randint(1700, 1999)),
        "employer": lambda: fresh(lambda: f"{_word(rng, (2, 2))} {rng.choice(_COMPANY_ENDS)}"),
        "colour_code": lambda: f"{rng.choice(_COLOURS)}-{rng.randint(100, 999)}",
    }
    facts: list[Fact] = []
    person = 0
    while len(facts) < num_facts:
        name = fresh(lambda: f"{_word(rng, (2, 2))} {_word(rng, (2, 3))}")
        for relation in relations:
            if len(facts) == num_facts:
                break
            fact = _relation_fact(name, relation, values[relation]())
            facts.append(Fact(fact.prompt, fact.answer, f"fact-{seed}-{len(facts):05d}", True, fact.paraphrases,
                              fact.sentence, {**fact.meta, "person": person}))
        person += 1
    return facts

