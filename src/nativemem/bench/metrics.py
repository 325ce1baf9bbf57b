"""Answer and retrieval metrics shared by every benchmark task.

Answer metrics follow the official SQuAD v1.1 evaluation script: both the model output and each
reference answer are normalised (lower case, punctuation and the articles *a*, *an*, *the* removed,
whitespace collapsed) and the score of an output is the **maximum over all reference answers**.

- :func:`exact_match`: 1.0 when the normalised output equals some normalised reference.
- :func:`token_f1`: bag-of-tokens F1 between output and reference.
- :func:`contains`: 1.0 when some normalised reference occurs in the normalised output as a whole
  token sequence (so ``"1"`` is not found in ``"10"``). Small instruction models often answer in a
  sentence; this metric credits a right answer wrapped in extra words.

Retrieval metrics use `ir_measures <https://ir-measur.es>`_ on BEIR's dict shapes: qrels
``{qid: {docid: int}}`` and run ``{qid: {docid: float}}``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "contains",
    "answer_scores",
    "hit_at_k",
    "retrieval_scores",
    "per_query_retrieval",
    "perplexity",
    "is_binary_metric",
    "ANSWER_METRICS",
]

ANSWER_METRICS: tuple[str, ...] = ("em", "f1", "contains")
"""Names of the per-item answer metrics, in report order."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official SQuAD script does.

    Args:
        text: Any answer string.

    Returns:
        Lower-cased text without punctuation and articles, with single spaces between tokens.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_refs(references: Sequence[str]) -> Sequence[str]:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    return references


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """Exact match after normalisation, max over references.

    Args:
        prediction: The model's (post-processed) answer.
        references: All accepted reference answers.

    Returns:
        1.0 or 0.0 (0.0 when there are no references).
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _check_refs(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD convention: both empty is a match, one empty is not
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1, max over references.

    Args:
        prediction: The model's (post-processed) answer.
        references: All accepted reference answers.

    Returns:
        F1 in [0, 1] (0.0 when there are no references).
    """
    pred = normalize_answer(prediction).split()
    scores = [_f1(pred, normalize_answer(ref).split()) for ref in _check_refs(references)]
    return max(scores, default=0.0)


def contains(prediction: str, references: Sequence[str]) -> float:
    """Whether some normalised reference occurs in the normalised prediction, on token boundaries.

    References that normalise to the empty string never match.

    Args:
        prediction: The model's answer (post-processed or raw).
        references: All accepted reference answers.

    Returns:
        1.0 or 0.0.
    """
    padded = f" {normalize_answer(prediction)} "
    for ref in _check_refs(references):
        norm = normalize_answer(ref)
        if norm and f" {norm} " in padded:
            return 1.0
    return 0.0


def answer_scores(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """All answer metrics of one prediction.

    Args:
        prediction: The model's (post-processed) answer.
        references: All accepted reference answers.

    Returns:
        ``{"em": ..., "f1": ..., "contains": ...}``.
    """
    return {
        "em": exact_match(prediction, references),
        "f1": token_f1(prediction, references),
        "contains": contains(prediction, references),
    }


def hit_at_k(retrieved: Sequence[str], gold: Iterable[str], k: int) -> float:
    """1.0 when any gold document id is among the first ``k`` retrieved ids.

    Args:
        retrieved: Retrieved document ids, best first.
        gold: Relevant document ids.
        k: Cut-off.

    Returns:
        1.0 or 0.0.
    """
    gold_set = set(gold)
    return float(any(doc in gold_set for doc in retrieved[:k]))


def _measures(k: int):
    from ir_measures import R, nDCG  # imported lazily: pulls in pytrec_eval / pandas

    return {f"ndcg@{k}": nDCG @ k, f"recall@{k}": R @ k}


def retrieval_scores(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int
) -> dict[str, float]:
    """Mean nDCG@k and Recall@k over the queries of ``qrels`` (BEIR dict shapes).

    A query in ``qrels`` with no entry in ``run`` counts as 0, as in BEIR (``ir_measures`` alone
    would drop it from the mean).

    Args:
        qrels: ``{qid: {docid: relevance}}``.
        run: ``{qid: {docid: score}}``.
        k: Cut-off.

    Returns:
        ``{"ndcg@k": ..., "recall@k": ...}`` with ``k`` filled in; NaN for an empty ``qrels``.
    """
    per_query = per_query_retrieval(qrels, run, k)
    out = {}
    for name in _measures(k):
        values = [scores[name] for scores in per_query.values()]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def per_query_retrieval(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int
) -> dict[str, dict[str, float]]:
    """nDCG@k and Recall@k for each query of ``qrels``.

    Args:
        qrels: ``{qid: {docid: relevance}}``.
        run: ``{qid: {docid: score}}``.
        k: Cut-off.

    Returns:
        ``{qid: {"ndcg@k": ..., "recall@k": ...}}``; queries missing from ``run`` score 0.
    """
    import ir_measures

    measures = _measures(k)
    names = {str(m): name for name, m in measures.items()}
    out: dict[str, dict[str, float]] = {qid: dict.fromkeys(measures, 0.0) for qid in qrels}
    clean_qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    clean_run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if docs}
    for metric in ir_measures.iter_calc(list(measures.values()), clean_qrels, clean_run):
        if metric.query_id in out:
            out[metric.query_id][names[str(metric.measure)]] = float(metric.value)
    return out


def perplexity(nlls: Iterable[float]) -> float:
    """Perplexity from per-token negative log-likelihoods (natural log).

    Args:
        nlls: Per-token NLLs, e.g. ``lm.nll(text).tolist()``.

    Returns:
        ``exp(mean(nlls))``.

    Raises:
        ValueError: If ``nlls`` is empty.
    """
    values = [float(x) for x in nlls]
    if not values:
        raise ValueError("perplexity needs at least one token NLL")
    return math.exp(sum(values) / len(values))


def is_binary_metric(name: str) -> bool:
    """Whether a per-item metric only takes the values 0 and 1 (so McNemar's test applies).

    Args:
        name: Metric name such as ``"em"`` or ``"hit@3"``.
    """
    return name in ("em", "contains") or name.startswith("hit@")
