"""LoCoMo's official answer scoring (snap-research/locomo ``task_eval/evaluation.py``).

Rules, per question category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial):

- Normalisation: commas removed, lower case, punctuation removed, the words *a, an, the, and*
  removed, whitespace collapsed; every token is then Porter-stemmed.
- Categories 2, 3, 4: token F1 between the stemmed prediction and the stemmed gold answer; for
  category 3 only the gold text before the first ``;`` counts.
- Category 1: gold and prediction are split on ``,``; the score is the mean, over gold parts, of the
  best F1 against any prediction part.
- Category 5: 1 when the prediction contains "no information available" or "not mentioned"
  (case-insensitive), else 0. The question offers the two options "(a) … (b) …" and a bare letter
  answer is mapped to its option first (:func:`resolve_option`).

Stemming is NLTK's ``PorterStemmer`` in its default ``NLTK_EXTENSIONS`` mode, as in the official code.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

__all__ = ["porter_stem", "normalize_answer", "f1_score", "multi_answer_f1", "locomo_score", "resolve_option",
           "NOT_MENTIONED", "CATEGORIES"]

CATEGORIES = {1: "multi_hop", 2: "temporal", 3: "open_domain", 4: "single_hop", 5: "adversarial"}
NOT_MENTIONED = "Not mentioned in the conversation"


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer  # imported on first use: nltk takes about a second to import

    return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def porter_stem(word: str) -> str:
    """NLTK's Porter stem of one word (lower-cased)."""
    return _stemmer().stem(word)


_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")


def normalize_answer(text: str) -> str:
    """LoCoMo normalisation: no commas, lower case, no punctuation, no a/an/the/and, single spaces."""
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the stemmed, normalised prediction against one gold answer."""
    pred = [porter_stem(w) for w in normalize_answer(prediction).split()]
    ref = [porter_stem(w) for w in normalize_answer(gold).split()]
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def multi_answer_f1(prediction: str, gold: str) -> float:
    """Category 1: mean over comma-separated gold parts of the best F1 against any prediction part."""
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(f1_score(p, g) for p in preds) for g in golds) / len(golds)


def resolve_option(prediction: str, options: dict[str, str]) -> str:
    """Map a bare option letter ("a", "(b)") to the option's text, as the official evaluation does."""
    p = prediction.strip().lower()
    if len(p) == 1:
        return options["a"] if "a" in p else options["b"]
    if len(p) == 3:
        return options["a"] if "(a)" in p else options["b"]
    return prediction


def locomo_score(prediction: str, gold: str, category: int) -> float:
    """The official per-question score (see the module docstring)."""
    if category == 5:
        low = prediction.lower()
        return float("no information available" in low or "not mentioned" in low)
    gold = str(gold)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        return float(multi_answer_f1(prediction, gold))
    if category in (2, 3, 4):
        return f1_score(prediction, gold)
    raise ValueError(f"unknown LoCoMo category {category!r}")
