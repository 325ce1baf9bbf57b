"""LoCoMo's official answer scoring (snap-research/locomo ``task_eval/evaluation.py``), re-implemented.

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

The official code uses NLTK's ``PorterStemmer`` (default ``NLTK_EXTENSIONS`` mode). NLTK is not a
dependency here, so :func:`porter_stem` implements the Porter (1980) algorithm with NLTK's
extensions (short words kept, irregular forms, ``ies``/``ied`` on 4-letter words, ``y`` → ``i`` only
after a consonant, the ``bli``/``logi``/``fulli``/``lessli`` step-2 rules); rare words may stem
differently from NLTK.
"""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["porter_stem", "normalize_answer", "f1_score", "multi_answer_f1", "locomo_score", "resolve_option",
           "NOT_MENTIONED", "CATEGORIES"]

CATEGORIES = {1: "multi_hop", 2: "temporal", 3: "open_domain", 4: "single_hop", 5: "adversarial"}
NOT_MENTIONED = "Not mentioned in the conversation"

_VOWELS = frozenset("aeiou")
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
              "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
              "exceed": "exceed", "succeed": "succeed"}


def _is_cons(w: str, i: int) -> bool:
    if w[i] in _VOWELS:
        return False
    if w[i] == "y":
        return i == 0 or not _is_cons(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]."""
    forms = "".join("c" if _is_cons(stem, i) else "v" for i in range(len(stem)))
    return len(re.findall(r"v+c+", forms))


def _has_vowel(stem: str) -> bool:
    return any(not _is_cons(stem, i) for i in range(len(stem)))


def _double_cons(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _is_cons(w, len(w) - 1)


def _cvc(w: str) -> bool:
    """Ends consonant-vowel-consonant, the last not w, x or y (or is a 2-letter vowel-consonant word)."""
    if len(w) >= 3:
        return (_is_cons(w, len(w) - 3) and not _is_cons(w, len(w) - 2) and _is_cons(w, len(w) - 1)
                and w[-1] not in "wxy")
    return len(w) == 2 and not _is_cons(w, 0) and _is_cons(w, 1)


def _replace(w: str, rules, condition) -> str:
    """Apply the rule with the longest matching suffix (if its condition holds on the stem)."""
    for suffix, repl in rules:
        if w.endswith(suffix):
            stem = w[: len(w) - len(suffix)]
            return stem + repl if condition(stem) else w
    return w


_STEP2 = sorted([("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
                 ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
                 ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
                 ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
                 ("fulli", "ful"), ("lessli", "less"), ("logi", "log")], key=lambda r: -len(r[0]))
_STEP3 = sorted([("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
                 ("ness", "")], key=lambda r: -len(r[0]))
_STEP4 = sorted(["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
                 "ism", "ate", "iti", "ous", "ive", "ize"], key=len, reverse=True)


def porter_stem(word: str) -> str:
    """Porter stem of one lower-case word (NLTK extensions mode; see the module docstring)."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 2:
        return w
    # step 1a
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies"):
        w = w[:-1] if len(w) == 4 else w[:-2]
    elif w.endswith("ss"):
        pass
    elif w.endswith("s"):
        w = w[:-1]
    # step 1b
    if w.endswith("ied"):
        w = w[:-1] if len(w) == 4 else w[:-2]
    elif w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
                w = w[: -len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _double_cons(w) and w[-1] not in "lsz":
                    w = w[:-1]
                elif _measure(w) == 1 and _cvc(w):
                    w += "e"
                break
    # step 1c: y -> i after a consonant (not the first letter)
    if w.endswith("y") and len(w) > 2 and _is_cons(w, len(w) - 2):
        w = w[:-1] + "i"
    # step 2
    if w.endswith("alli") and _measure(w[:-4]) > 0:  # NLTK: alli -> al, then step 2 again
        w = w[:-2]
        w = _replace(w, _STEP2, lambda s: _measure(s) > 0)
    else:
        w = _replace(w, _STEP2, lambda s: _measure(s) > 0)
    # step 3
    w = _replace(w, _STEP3, lambda s: _measure(s) > 0)
    # step 4
    for suffix in _STEP4:
        if w.endswith(suffix):
            stem = w[: len(w) - len(suffix)]
            if _measure(stem) > 1 and (suffix != "ion" or stem.endswith(("s", "t"))):
                w = stem
            break
    # step 5
    if w.endswith("e"):
        stem = w[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _cvc(stem)):
            w = stem
    if w.endswith("ll") and _measure(w[:-1]) > 1:
        w = w[:-1]
    return w


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
