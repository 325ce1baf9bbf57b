"""Calibrated relevance of a search hit: the probability that a retrieved chunk helps answer the query.

The raw score of a hybrid search is a rank-fusion value (0.033, 0.016, ...) that says how a chunk ranks,
not whether it is relevant: a query the memory cannot answer still gets a top hit. The relevance score puts
each of the top-``k`` hits on a 0-1 scale from features the search already has, all from the model's own
states and the memory's own index (no outside embedder):

- ``dense``: the mean over query tokens of the best cosine with a chunk token (MaxSim / query tokens), at
  the retrieval layer, after the memory's token transform; the pooled cosine for the ``pooled``/``hybrid``
  variants;
- ``bm25``: log(1 + BM25) of the chunk for the query (the index's own sparse vectors and IDF);
- ``dense_gap``, ``bm25_gap``: the same minus the top hit's (how far below the best candidate it is);
- ``rank``: the hit's place in the fused ranking (0 = first).

A logistic regression (scikit-learn) maps them to a probability. :func:`fit_relevance` fits it on
(question, passage) pairs: a seeded 70 % of the pairs have their passages written into a scratch memory with
the same transforms; their questions are asked against it (a hit is positive when it is the question's own
passage) and so are the questions of the other 30 % and any unanswerable questions given (every hit
negative). Five-fold cross-validation over questions gives the held-out calibration error (ECE, 10 equal-width
bins) and AUC stored in the report. Only coefficients are stored (JSON in the memory config), so scoring is a
dot product and a sigmoid: no scikit-learn import on the read path.

:data:`GENERIC_QA` holds the built-in generic questions (about :data:`~.fitset.GENERIC_FIT_TEXTS`) and
:data:`GENERIC_UNANSWERABLE` general questions that no stored note answers; a memory whose relevance was
never fitted is fitted on them the first time a score is needed (with a :class:`RelevanceWarning`).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import InputError
from .fitset import GENERIC_FIT_TEXTS

__all__ = ["Calibrator", "RelevanceWarning", "features", "fit_relevance", "expected_calibration_error",
           "choose_threshold", "strict_threshold", "GENERIC_QA", "GENERIC_UNANSWERABLE", "FEATURES"]

FEATURES = ("dense", "bm25", "dense_gap", "bm25_gap", "rank")
MIN_PAIRS = 8
POOL_SHARE = 0.7


class RelevanceWarning(UserWarning):
    """The relevance score of a memory is not fitted to the user's data (it uses the built-in generic set)."""


class Calibrator:
    """Standardised features -> logistic probability (coefficients fitted by :func:`fit_relevance`)."""

    def __init__(self, state: dict[str, Any]):
        missing = {"variant", "mean", "scale", "coef", "intercept"} - set(state)
        if missing:
            raise InputError(f"relevance state lacks {', '.join(sorted(missing))}")
        self.state = state
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.scale = np.asarray(state["scale"], dtype=np.float64)
        self.coef = np.asarray(state["coef"], dtype=np.float64)
        self.intercept = float(state["intercept"])

    @property
    def variant(self) -> str:
        return str(self.state["variant"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (n,) of feature rows (n, len(FEATURES))."""
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def features(dense: Sequence[float], bm25: Sequence[float]) -> np.ndarray:
    """Feature rows (k, len(FEATURES)) of one query's hits, in rank order."""
    d = np.asarray(dense, dtype=np.float64)
    b = np.log1p(np.maximum(np.asarray(bm25, dtype=np.float64), 0.0))
    if d.size == 0:
        return np.zeros((0, len(FEATURES)))
    return np.stack([d, b, d - d.max(), b - b.max(), np.arange(d.size, dtype=np.float64)], axis=1)


def choose_threshold(scores: Sequence[Sequence[float]], gold: Sequence[int | None]) -> tuple[float, float]:
    """Threshold on per-hit scores that maximises mean(P(gold hit passes | answerable), P(nothing passes |
    unanswerable)); ``scores[i]`` are question i's hit scores, ``gold[i]`` the index of its gold hit (None when the
    gold passage was not retrieved or the question is unanswerable with ``-1``). Returns (threshold, objective)."""
    answerable = [(s, g) for s, g in zip(scores, gold) if g is not None and g >= 0]
    unanswerable = [s for s, g in zip(scores, gold) if g == -1]
    candidates = sorted({x for s in scores for x in s} | {float("inf")})
    best = (float("inf"), -1.0)
    for t in candidates:
        a = sum(s[g] >= t for s, g in answerable) / max(1, len(answerable))
        u = sum(all(x < t for x in s) for s in unanswerable) / max(1, len(unanswerable))
        value = (a + u) / 2
        if value > best[1]:
            best = (t, value)
    return best


def strict_threshold(scores: Sequence[Sequence[float]], gold: Sequence[int | None], reject: float = 0.95
                     ) -> tuple[float, float]:
    """The lowest threshold at which nothing passes for at least ``reject`` of the unanswerable questions (``gold``
    -1), and the share of answerable questions whose gold hit still passes there (``scores``/``gold`` as in
    :func:`choose_threshold`)."""
    tops = sorted(max(s, default=0.0) for s, g in zip(scores, gold) if g == -1)
    if not tops:
        return 0.0, 1.0
    keep = int(np.ceil(reject * len(tops)))  # questions that must have every hit below the threshold
    t = min(1.0, float(np.nextafter(tops[keep - 1], np.inf)) if keep else 0.0)
    answerable = [(s, g) for s, g in zip(scores, gold) if g is not None and g >= 0]
    return t, sum(s[g] >= t for s, g in answerable) / max(1, len(answerable))


def expected_calibration_error(p: Sequence[float], y: Sequence[int], bins: int = 10) -> float:
    """ECE over ``bins`` equal-width probability bins (weighted by the share of samples in each)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def _rows(memory, questions: Sequence[str], *, k: int, user_id: str) -> list[tuple[np.ndarray, list[str]]]:
    """Feature rows and hit source ids of each question's top-``k`` hits."""
    out = []
    for q in questions:
        hits = memory.search(q, k=k, user_id=user_id, relevance=False)
        dense, bm25 = memory.hit_scores(q, hits, user_id=user_id)
        out.append((features(dense, bm25), [str(h.payload.get("source_id")) for h in hits]))
    return out


def fit_relevance(memory, pairs: Sequence[tuple[str, str]], *, unanswerable: Sequence[str] = (),
                  k: int | None = None, seed: int = 0, source: str = "caller's pairs") -> dict[str, Any]:
    """Fit the memory's relevance calibrator on (question, passage) pairs; returns its state (stored by the caller).

    Args:
        memory: The activation memory (its transforms and config are used; its own chunks are not touched).
        pairs: (question, passage) pairs; at least :data:`MIN_PAIRS`.
        unanswerable: Questions no passage answers (every hit a negative).
        k: Hits per question (default: the memory's ``top_k``, at least 3).
        seed: Seed of the pool/held-out split.
        source: What the pairs are, for the report.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    pairs = [(str(q).strip(), str(p).strip()) for q, p in pairs if str(q).strip() and str(p).strip()]
    if len(pairs) < MIN_PAIRS:
        raise InputError(f"fitting relevance needs at least {MIN_PAIRS} (question, passage) pairs, got {len(pairs)}")
    k = max(3, int(k or memory.config.top_k))
    rng = random.Random(seed)
    passages = sorted({p for _, p in pairs})
    rng.shuffle(passages)
    in_pool = set(passages[: max(2, math.ceil(POOL_SHARE * len(passages)))])
    pool = [p for p in passages if p in in_pool]
    source_of = {p: f"p{i}" for i, p in enumerate(pool)}
    # a retrieval-only scratch memory (temporary folder) with this memory's layers and transforms
    cfg = replace(memory.config, payload="none", relevance=None, gate_threshold=0.0, backend="edge", redis_url="", blob_dir=None,
                  collection=None)
    scratch = type(memory)(memory.lm, cfg)
    scratch.pooled_transform, scratch.token_transform = memory.pooled_transform, memory.token_transform
    try:
        scratch.add(pool, user_id="fit", source_ids=[source_of[p] for p in pool])
        questions = [q for q, _ in pairs] + [str(q).strip() for q in unanswerable if str(q).strip()]
        gold = [source_of.get(p) for _, p in pairs] + [None] * (len(questions) - len(pairs))
        rows = _rows(scratch, questions, k=k, user_id="fit")
    finally:
        scratch.close()
    X = np.concatenate([r for r, _ in rows])
    y = np.concatenate([[int(s == g) for s in ids] for (_, ids), g in zip(rows, gold)])
    groups = np.concatenate([[i] * len(ids) for i, (_, ids) in enumerate(rows)])
    if y.min() == y.max():
        raise InputError("the fit pairs gave no " + ("negative" if y.min() else "positive") + " hit: give more, "
                         "more varied pairs")
    mean, scale = X.mean(0), X.std(0)
    scale[scale < 1e-9] = 1.0
    Z = (X - mean) / scale

    def model():
        return LogisticRegression(C=1.0, max_iter=1000)

    held = np.zeros(len(y))
    folds = min(5, len(rows))
    for train, test in GroupKFold(n_splits=folds).split(Z, y, groups):
        if y[train].min() == y[train].max():
            held[test] = y[train].mean()
            continue
        held[test] = model().fit(Z[train], y[train]).predict_proba(Z[test])[:, 1]
    final = model().fit(Z, y)
    per_q, gold_idx, at = [], [], 0
    for (_, ids), g in zip(rows, gold):
        per_q.append(held[at: at + len(ids)].tolist())
        gold_idx.append(ids.index(g) if g is not None and g in ids else (-1 if g is None else None))
        at += len(ids)
    best_t, best_j = choose_threshold(per_q, gold_idx)
    best_t = min(best_t, 1.0)
    strict_t, strict_pass = strict_threshold(per_q, gold_idx)
    auc = float(roc_auc_score(y, held)) if 0 < y.mean() < 1 else float("nan")
    return {"variant": memory.config.variant, "features": list(FEATURES), "mean": mean.tolist(),
            "scale": scale.tolist(), "coef": final.coef_[0].tolist(), "intercept": float(final.intercept_[0]),
            "source": source, "pairs": len(pairs), "pool_passages": len(pool), "unanswerable": len(unanswerable),
            "hits": int(len(y)), "positive_rate": round(float(y.mean()), 4), "k": k, "seed": seed,
            "heldout_ece": round(expected_calibration_error(held, y), 4), "heldout_auc": round(auc, 4),
            "heldout_folds": folds, "heldout_best_threshold": round(float(best_t), 4),
            "heldout_best_objective": round(float(best_j), 4),
            "heldout_threshold_reject95": round(float(strict_t), 4),
            "heldout_gold_pass_at_reject95": round(float(strict_pass), 4)}


GENERIC_QA = [
    ("When did the river flood the valley?", GENERIC_FIT_TEXTS[0]),
    ("How many strings does a violin have?", GENERIC_FIT_TEXTS[1]),
    ("What time does the town library open?", GENERIC_FIT_TEXTS[2]),
    ("Where do volcanoes form?", GENERIC_FIT_TEXTS[3]),
    ("When does the owner of the bakery wake up?", GENERIC_FIT_TEXTS[4]),
    ("How many squares does a chess board have?", GENERIC_FIT_TEXTS[5]),
    ("How often does the train to the coast leave?", GENERIC_FIT_TEXTS[6]),
    ("How many queens live in a colony of honey bees?", GENERIC_FIT_TEXTS[7]),
    ("What does the museum display?", GENERIC_FIT_TEXTS[8]),
    ("What is copper used for in houses?", GENERIC_FIT_TEXTS[9]),
    ("How long does the summer festival last?", GENERIC_FIT_TEXTS[10]),
    ("Why can owls fly almost without a sound?", GENERIC_FIT_TEXTS[11]),
    ("How long is a marathon?", GENERIC_FIT_TEXTS[12]),
    ("What shape of channels do glaciers carve?", GENERIC_FIT_TEXTS[13]),
    ("How many eggs does the recipe need?", GENERIC_FIT_TEXTS[14]),
    ("Who runs most lighthouses now?", GENERIC_FIT_TEXTS[15]),
    ("What did the city council vote to build?", GENERIC_FIT_TEXTS[16]),
    ("Where do tomatoes grow best?", GENERIC_FIT_TEXTS[17]),
    ("How long had the galaxy's light travelled?", GENERIC_FIT_TEXTS[18]),
    ("Where do penguins spend most of their lives?", GENERIC_FIT_TEXTS[19]),
    ("When did the company release its new phone?", GENERIC_FIT_TEXTS[20]),
    ("Where does a hurricane form?", GENERIC_FIT_TEXTS[21]),
    ("How many steps lead to the castle tower?", GENERIC_FIT_TEXTS[22]),
    ("Why does bread rise?", GENERIC_FIT_TEXTS[23]),
    ("When was the orchestra's concert?", GENERIC_FIT_TEXTS[24]),
    ("What share of marine species do coral reefs shelter?", GENERIC_FIT_TEXTS[25]),
    ("When did the hikers reach the summit?", GENERIC_FIT_TEXTS[26]),
    ("What is silk made from?", GENERIC_FIT_TEXTS[27]),
    ("How many students signed up for the programming course?", GENERIC_FIT_TEXTS[28]),
    ("What are earthquakes measured with?", GENERIC_FIT_TEXTS[29]),
    ("How often does the ferry cross the strait?", GENERIC_FIT_TEXTS[30]),
    ("How is maple syrup made?", GENERIC_FIT_TEXTS[31]),
    ("Where does the portrait hang now?", GENERIC_FIT_TEXTS[32]),
    ("How do wolves hunt?", GENERIC_FIT_TEXTS[33]),
    ("When did the bank raise its interest rates?", GENERIC_FIT_TEXTS[34]),
    ("What season do cotton plants need?", GENERIC_FIT_TEXTS[35]),
    ("When did the spacecraft land on the moon?", GENERIC_FIT_TEXTS[36]),
    ("How long can olive trees live?", GENERIC_FIT_TEXTS[37]),
    ("How did the football match end?", GENERIC_FIT_TEXTS[38]),
    ("What was salt once used as?", GENERIC_FIT_TEXTS[39]),
    ("How many beds does the new children's wing have?", GENERIC_FIT_TEXTS[40]),
    ("When do rainbows appear?", GENERIC_FIT_TEXTS[41]),
    ("How many languages was the novel translated into?", GENERIC_FIT_TEXTS[42]),
    ("What do camels store in their humps?", GENERIC_FIT_TEXTS[43]),
    ("What fuel does the power plant burn?", GENERIC_FIT_TEXTS[44]),
    ("When were the tulip bulbs planted?", GENERIC_FIT_TEXTS[45]),
    ("What happens during a solar eclipse?", GENERIC_FIT_TEXTS[46]),
    ("What does the factory make?", GENERIC_FIT_TEXTS[47]),
]
"""Built-in (question, passage) pairs about the generic fit texts (written for nativemem)."""

GENERIC_UNANSWERABLE = [
    "Hi", "Hello, how are you today?", "Thanks a lot!", "What is the capital of France?",
    "Who wrote Romeo and Juliet?", "What is two plus two?", "Can you tell me a joke?",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "Who painted the Mona Lisa?", "What is the largest planet in the solar system?", "Write a haiku about autumn.",
    "What is my favourite colour?", "What is the square root of eighty-one?", "Which language is spoken in Brazil?",
    "What year did the Second World War end?", "What is photosynthesis?", "Recommend a good book to read.",
    "What is the chemical symbol for gold?", "How do I reset my password?", "What is the speed of light?",
    "Who is the president of the United States?", "What does DNA stand for?",
]
"""Built-in questions that the generic fit texts do not answer (greetings, general knowledge, requests)."""


def warn_generic(n_pairs: int) -> None:
    warnings.warn(f"this memory's relevance score was not fitted: it is fitted now on the built-in generic set "
                  f"({n_pairs} question/passage pairs), which is not your data. Fit it on your own pairs with "
                  "mem.fit_relevance(pairs) or `nativemem fit --pairs FILE` (a JSON list of "
                  "{\"question\", \"passage\"})", RelevanceWarning, stacklevel=4)
