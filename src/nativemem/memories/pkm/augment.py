"""Knowledge augmentation: the phrasings a fact is trained under, made offline from templates.

A memory trained on one phrasing per fact stores that string: asked in other words it answers nothing
(pkm recalled 1.00 of 1,000 facts in their training phrasing and 0.03 of held-out paraphrases). Trained on
several phrasings of each fact, it has to store what they share. Allen-Zhu and Li ("Physics of Language
Models 3.1") found that diversity of the training phrasing, not the number of epochs, is what lets a model
extract a fact by question. What :func:`phrasings` makes, with no model and no network:

- **entity / relation / value facts**: the relation's trainable question templates
  (:data:`~.facts.RELATIONS` ``train``; a relation it does not know gets generic ones built from its
  name), interleaved with declarative sentences trained as completions ("Ada Lind was born in the city of"
  -> "Oslo"), and, where the value names one entity (a birth city, an employer), a reverse question
  ("Who was born in Oslo?" -> "Ada Lind"). The relation's ``heldout`` templates are never produced: they
  are what paraphrase recall is measured on.
- **question / answer facts**: surface variants of the question (a "Question:" label, a request for a short
  answer, a polite preamble) and the fact's declarative ``sentence`` when it ends with the answer. These do
  not reword the question; facts with a relation generalise further.
- **plain sentences** that match a declarative pattern ("X was born in Y.", "X works for Y.", "The R of X
  is Y.", "X's R is Y.") become entity / relation / value facts (:func:`fact_of_sentence`); others are
  trained as the sentence itself.

The model's own paraphrases are not used (they would need generation at add time, and a 135M model's
paraphrases are often wrong); the receipt says which kinds were made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .facts import Fact, _relation_fact, relation_templates

__all__ = ["Phrasing", "Augmented", "phrasings", "fact_of_sentence", "KINDS"]

KINDS = ("question templates", "declarative sentences", "reverse questions", "surface variants")
_SURFACE = ("Question: {q}", "{q} Answer briefly.", "Please answer this: {q}", "I have a question. {q}",
            "{q} Reply with the answer only.")


@dataclass(frozen=True)
class Phrasing:
    """One training example of a fact: a prompt and the answer it must produce (``chat``: as a user message)."""

    prompt: str
    answer: str
    chat: bool = True
    kind: str = "own prompt"


@dataclass
class Augmented:
    """The phrasings of one fact (its own prompt first) and the templates that did not apply."""

    items: list[Phrasing] = field(default_factory=list)
    skipped: int = 0  # templates that did not apply (no such template, or a phrasing already made)


def _completion(template: str, entity: str, value: str) -> Phrasing | None:
    """A declarative template as a completion: everything before the value -> the value (None if the value
    does not end the sentence)."""
    head, sep, tail = template.partition("{v}")
    if not sep or tail.strip(" .") or not head.strip():
        return None
    return Phrasing(head.format(e=entity).rstrip(), value, False, "declarative sentences")


def phrasings(fact: Fact, n: int) -> Augmented:
    """At most ``n`` phrasings of ``fact`` asked forward (its own prompt first), then a reverse question when
    ``n`` > 1 and the relation has one (see the module docstring). Completion facts are trained as they are."""
    own = Phrasing(fact.prompt, fact.answer, fact.chat)
    if n <= 1 or not fact.chat:
        return Augmented([own])
    pool, reverse, skipped = _candidates(fact)
    forward, seen = [own], {(own.prompt, own.chat)}
    for p in pool:
        if len(forward) >= n:
            break
        if (p.prompt, p.chat) in seen:
            skipped += 1
            continue
        seen.add((p.prompt, p.chat))
        forward.append(p)
    return Augmented(forward + reverse, skipped + n - len(forward))


def _candidates(fact: Fact) -> tuple[list[Phrasing], list[Phrasing], int]:
    """Forward phrasings in the order they are taken, reverse ones, and templates that did not apply."""
    entity, relation = fact.meta.get("entity"), fact.meta.get("relation")
    if entity and relation:
        spec = relation_templates(relation)
        questions = [Phrasing(q.format(e=entity), fact.answer, True, "question templates") for q in spec["train"][1:]]
        sentences = [_completion(t, entity, fact.answer) for t in spec["sentences"]]
        reverse = [Phrasing(spec["reverse"][0].format(v=fact.answer), entity, True, "reverse questions")] \
            if spec.get("reverse") else []
        said = [Phrasing(*fact.meta["said"], False, "declarative sentences")] if fact.meta.get("said") else []
        return (said + _interleave(questions, [s for s in sentences if s is not None]), reverse,
                sum(s is None for s in sentences))
    pool = [Phrasing(t.format(q=fact.prompt), fact.answer, True, "surface variants") for t in _SURFACE]
    said = fact.sentence.strip().rstrip(" .")
    if said.endswith(fact.answer) and said[: -len(fact.answer)].strip():
        pool.insert(1, Phrasing(said[: -len(fact.answer)].rstrip(), fact.answer, False, "declarative sentences"))
    return pool, [], 0


def _interleave(questions: list[Phrasing], sentences: list[Phrasing]) -> list[Phrasing]:
    """Questions and sentences mixed, a sentence after every second question (the first after one), so that a
    small ``n`` gets both kinds."""
    out: list[Phrasing] = []
    qs, ss = list(questions), list(sentences)
    take = 1
    while qs or ss:
        out += qs[:take]
        del qs[:take]
        if ss:
            out.append(ss.pop(0))
        take = 2
    return out


# ---------------------------------------------------------------------- sentences -> facts
_NAME = r"(?P<e>[A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,4})"
_VALUE = r"(?P<v>[^.;,]+?)"
_PATTERNS: list[tuple[re.Pattern, str | None]] = [
    (re.compile(rf"^{_NAME} was born in the city of {_VALUE}\.?$"), "birth_city"),
    (re.compile(rf"^{_NAME} was born in (?P<v>1\d{{3}}|20\d{{2}})\.?$"), "birth_year"),
    (re.compile(rf"^{_NAME} was born in (?P<v>[A-Z][\w'-]*(?: [A-Z][\w'-]*){{0,3}})\.?$"), "birth_city"),
    (re.compile(rf"^{_NAME} (?:works for|is employed by) {_VALUE}\.?$"), "employer"),
    (re.compile(rf"^The (?P<r>[a-z][a-z ]{{1,30}}?) of {_NAME} is {_VALUE}\.?$"), None),
    (re.compile(rf"^{_NAME}'s (?P<r>[a-z][a-z ]{{1,30}}?) is {_VALUE}\.?$"), None),
]


def fact_of_sentence(text: str) -> Fact | None:
    """An entity / relation / value fact if ``text`` is one declarative sentence of a known shape, else None."""
    s = " ".join(text.split())
    for pattern, relation in _PATTERNS:
        m = pattern.match(s)
        if m is None:
            continue
        rel = relation or m.group("r").strip().replace(" ", "_")
        return _relation_fact(m.group("e").strip(), rel, m.group("v").strip())
    return None
