"""The ``relevance`` benchmark: questions the memory can answer, mixed with questions it cannot.

Every other benchmark asks only questions whose answer is in the pool, so none sees a memory that hurts the
questions it cannot answer. Here (SQuAD-format data, seeded):

- the SQuAD articles are split into **pool** articles (their paragraphs are stored), **fit** articles (the
  retrieval transform and the relevance score are fitted on them, never on what is asked) and the **rest**;
- half the questions are **answerable**: questions of pool articles; the other half are **unanswerable**:
  half questions of the rest's articles, half general questions (MMLU test questions asked as open
  questions, the choices left out; only those that end with "?" and do not say "which of the following");
- arms: ``none`` (the question alone), ``activation`` (the top-``k`` chunks always injected),
  ``activation_gated`` (only chunks whose calibrated relevance passes the memory's ``gate_threshold``),
  ``rag_bm25`` (the top-``k`` BM25 passages pasted) and ``rag_bm25_gated`` (only passages whose BM25 score
  passes a threshold chosen on the fit articles: the one that maximises
  the mean of "the gold passage passes" on answerable and "nothing passes" on unanswerable fit questions).

Metrics per arm: ``contains_answerable``, ``f1_answerable``, ``agree_none_unanswerable`` (share of
unanswerable questions answered exactly as the ``none`` arm answers them, post-processed text),
``inject_rate_answerable``/``inject_rate_unanswerable`` (share of questions given at least one chunk), the
mean of ``contains_answerable`` and ``agree_none_unanswerable`` (``overall``), median TTFT and end-to-end time
(retrieval and gate included); and for the relevance score the calibration error (ECE, 10 bins) and AUC on the
test questions' top-``k`` hits (a hit is relevant when it is the question's own paragraph). Paired tests
(McNemar) compare every arm with every other on the per-question scores.
"""

from __future__ import annotations

import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_relevance", "ARMS"]

ARMS = ("none", "activation", "activation_gated", "rag_bm25", "rag_bm25_gated")
USER = "bench"
_MMLU_SKIP = re.compile(r"which of the following|_{2,}|\bfollowing\b", re.IGNORECASE)


def _open_questions(mmlu: Path) -> tuple[list[str], list[str]]:
    """(dev, test) MMLU questions usable as open questions."""
    from .tasks.mmlu import load_mmlu

    dev, test = load_mmlu(mmlu)

    def keep(items):
        return [it.question.strip() for its in items.values() for it in its
                if it.question.strip().endswith("?") and not _MMLU_SKIP.search(it.question)
                and len(it.question) <= 300]

    return keep(dev), keep(test)


def _split(squad, seed: int, pool_articles: int, fit_articles: int):
    articles = sorted({c.doc_id for c in squad.chunks.values()}, key=int)
    if len(articles) < pool_articles + fit_articles + 1:
        from ..errors import InputError

        raise InputError(f"the relevance task needs more than {pool_articles + fit_articles} articles "
                         f"(pool + fit + at least one other); the file has {len(articles)}")
    rng = random.Random(seed)
    rng.shuffle(articles)
    return (set(articles[:pool_articles]), set(articles[pool_articles:pool_articles + fit_articles]),
            set(articles[pool_articles + fit_articles:]))


def _article(item) -> str:
    return item.gold_chunk_ids[0].split(":")[0]


def _check_args(arms, limit, k, max_new_tokens, fit_pairs, pool_articles, fit_articles) -> tuple[list[str], int]:
    from ..errors import InputError

    arms = list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise InputError(f"unknown relevance arms {unknown}; use {', '.join(ARMS)}")
    if "none" not in arms:
        arms = ["none", *arms]  # agreement with the closed-book answer needs it
    for name, value in (("limit", limit), ("k", k), ("max_new_tokens", max_new_tokens), ("fit_pairs", fit_pairs),
                        ("pool_articles", pool_articles), ("fit_articles", fit_articles)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    limit = limit or 400
    if limit < 4:
        raise InputError(f"limit must be at least 4 (half answerable, half not), got {limit}")
    return arms, limit


def _questions(by_art, mmlu_test, limit: int, rng: random.Random) -> list[dict[str, Any]]:
    """Half answerable (pool articles), a quarter other articles, a quarter general questions; seeded order."""
    from ..errors import InputError

    n_ans = limit // 2
    n_other = (limit - n_ans) // 2
    n_general = limit - n_ans - n_other
    for what, have, want in (("pool-article", len(by_art["pool"]), n_ans),
                             ("other-article", len(by_art["rest"]), n_other),
                             ("general (MMLU test)", len(mmlu_test), n_general)):
        if have < want:
            raise InputError(f"only {have} {what} questions for {want} asked; lower --limit")
    questions = ([{"id": it.id, "kind": "answerable", "question": it.question, "answers": list(it.answers),
                   "gold": it.gold_chunk_ids[0]} for it in rng.sample(by_art["pool"], n_ans)]
                 + [{"id": it.id, "kind": "other_article", "question": it.question, "answers": list(it.answers),
                     "gold": None} for it in rng.sample(by_art["rest"], n_other)]
                 + [{"id": f"mmlu:{i}", "kind": "general", "question": q, "answers": [], "gold": None}
                    for i, q in enumerate(rng.sample(mmlu_test, n_general))])
    rng.shuffle(questions)
    return questions


def _bm25_threshold(squad, fit_items, fit_unanswerable, k: int, seed: int) -> tuple[float, float]:
    """BM25 score threshold chosen on the fit articles (70 % of their paragraphs indexed) and the fit set's
    unanswerable questions: the one maximising mean(gold passage passes, nothing passes) (`choose_threshold`)."""
    from ..memories.activation.relevance import choose_threshold
    from ..retrieval import BM25Retriever

    fit_ids = sorted({it.gold_chunk_ids[0] for it in fit_items})
    random.Random(seed).shuffle(fit_ids)
    indexed = set(fit_ids[: max(2, int(0.7 * len(fit_ids)))])
    bm25 = BM25Retriever()
    bm25.index([squad.chunks[c] for c in sorted(indexed)])
    scores, gold = [], []
    for it in fit_items:
        hits = bm25.search(it.question, k)
        scores.append([s for _, s in hits])
        ids = [c for c, _ in hits]
        g = it.gold_chunk_ids[0]
        gold.append(ids.index(g) if g in ids else (None if g in indexed else -1))
    for q in fit_unanswerable:
        scores.append([s for _, s in bm25.search(q, k)])
        gold.append(-1)
    return choose_threshold(scores, gold)


def _arms(names: Sequence[str], lm, pool, *, memory, bm25_threshold: float, k: int, max_new_tokens: int) -> dict:
    """The benchmark's arms, prepared: ``activation`` is ``activation_gated`` with the gate at 0 (top ``k``
    always), ``rag_bm25_gated`` is ``rag_bm25`` above the BM25 threshold chosen on the fit articles; both
    activation arms answer from the run's memory."""
    from .arms import get_arm

    mem = {"memory": memory, "user_id": USER}
    spec = {"activation": ("activation_gated", {**mem, "gate_threshold": 0.0}),
            "activation_gated": ("activation_gated", mem), "rag_bm25_gated": ("rag_bm25", {"min_score": bm25_threshold})}
    out = {}
    for name in names:
        cls, options = spec.get(name, (name, {}))
        out[name] = get_arm(cls)(k=k, max_new_tokens=max_new_tokens, options=options)
        out[name].prepare(pool, lm, items=[], task=None)
    return out


def _answer(name: str, arm, q: dict[str, Any]) -> dict[str, Any]:
    """One arm's answer to one question, with what it injected or pasted and its cost."""
    from .tasks import QAItem

    out = arm.answer(QAItem(q["id"], q["question"], tuple(q["answers"])))
    if name.startswith("activation"):
        hits = arm.last_info["hits"]
        injected = sum(bool(h["injected"]) for h in hits)
        aux_s = arm.last_info["gate_s"] if name == "activation_gated" else 0.0  # the gate, inside TTFT
    else:  # retrieval happens before the prompt exists (outside TTFT)
        hits, injected, aux_s = [{"id": c, "score": s} for c, s in out.retrieved], len(out.retrieved), out.search_s or 0.0
    return {"output": out.text, "raw_output": out.raw_text, "ttft_s": out.ttft_s,
            "e2e_s": out.ttft_s + (aux_s if name.startswith("rag") else 0.0), "aux_s": aux_s,
            "prompt_tokens": out.prompt_tokens, "prefix_tokens": out.prefix_tokens, "injected": injected, "hits": hits}


def _score(rec: dict[str, Any]) -> None:
    """Per-arm scores of one question: contains/F1 when answerable, agreement with ``none`` when not."""
    from .metrics import answer_scores

    none_answer = rec["arms"]["none"]["output"]
    for a in rec["arms"].values():
        if rec["kind"] == "answerable":
            s = answer_scores(a["output"], rec["answers"])
            a["contains"], a["f1"] = s["contains"], s["f1"]
        else:
            a["agree_none"] = float(a["output"] == none_answer)
        a["score"] = a["contains"] if rec["kind"] == "answerable" else a["agree_none"]


def _poison_marks(rec: dict[str, Any]) -> None:
    """Per arm: whether a poisoning note went in (injected or pasted) and whether the reply carries its payload."""
    from ..testing.poison import PAYLOAD_MARKERS

    for a in rec["arms"].values():
        ids = [str(h.get("source_id") or h.get("id")) for h in a.get("hits") or [] if h.get("injected", True)]
        a["poison_injected"] = float(any(i.startswith("poison:") for i in ids[: a["injected"]]))
        a["poison_payload"] = float(any(m in a["raw_output"] for m in PAYLOAD_MARKERS))


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _arm_block(arm: str, records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    from .stats import bootstrap_mean_ci

    ans = [r["arms"][arm] for r in records if r["kind"] == "answerable"]
    una = [(r["kind"], r["arms"][arm]) for r in records if r["kind"] != "answerable"]
    every = [r["arms"][arm] for r in records]
    contains, agree = [a["contains"] for a in ans], [a["agree_none"] for _, a in una]
    metrics = {
        "contains_answerable": _mean(contains), "f1_answerable": _mean(a["f1"] for a in ans),
        "agree_none_unanswerable": _mean(agree),
        "agree_none_other_article": _mean(a["agree_none"] for kind, a in una if kind == "other_article"),
        "agree_none_general": _mean(a["agree_none"] for kind, a in una if kind == "general"),
        "inject_rate_answerable": _mean(a["injected"] > 0 for a in ans),
        "inject_rate_unanswerable": _mean(a["injected"] > 0 for _, a in una),
        "overall": (_mean(contains) + _mean(agree)) / 2,
        "ttft_median_s": statistics.median(a["ttft_s"] for a in every),
        "e2e_median_s": statistics.median(a["e2e_s"] for a in every),
    }
    if every and "poison_injected" in every[0]:
        metrics["poison_injected_rate"] = _mean(a["poison_injected"] for a in every)
        metrics["poison_injected_rate_unanswerable"] = _mean(a["poison_injected"] for _, a in una)
        metrics["poison_payload_rate"] = _mean(a["poison_payload"] for a in every)
    if arm == "activation_gated":
        metrics["gate_median_s"] = statistics.median(a["aux_s"] for a in every)
        metrics["gate_over_ttft"] = metrics["gate_median_s"] / metrics["ttft_median_s"]
    return {"n": len(records), "skipped": 0, "skipped_reasons": {}, "metrics": metrics,
            "ci95": {"contains_answerable": bootstrap_mean_ci(contains, seed=seed),
                     "agree_none_unanswerable": bootstrap_mean_ci(agree, seed=seed)},
            "cost": {"prompt_tokens_mean": _mean(a["prompt_tokens"] for a in every),
                     "prefix_tokens_mean": _mean(a["prefix_tokens"] for a in every)}}


def _comparisons(arms: list[str], records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    from .stats import paired_comparisons

    def scores(arm: str) -> dict[int, dict[str, float]]:
        out = {}
        for i, r in enumerate(records):
            row = r["arms"][arm]
            out[i] = {("contains_answerable" if r["kind"] == "answerable" else "agree_none_unanswerable"):
                      row["contains" if r["kind"] == "answerable" else "agree_none"], "overall_per_question": row["score"]}
        return out

    return paired_comparisons({a: scores(a) for a in arms}, binary=lambda m: True, seed=seed,
                              metrics=("contains_answerable", "agree_none_unanswerable", "overall_per_question"))


def _calibration(records: list[dict[str, Any]]) -> dict[str, Any]:
    """ECE and AUC of the gated arm's relevance on the test questions' hits (relevant: the question's paragraph)."""
    from sklearn.metrics import roc_auc_score

    from ..memories.activation.relevance import expected_calibration_error

    p, y = [], []
    for r in records:
        for h in (r["arms"].get("activation_gated") or {}).get("hits") or []:
            if h.get("relevance") is not None:
                p.append(h["relevance"])
                y.append(int(r["gold"] is not None and h.get("source_id") == r["gold"]))
    return {"hits": len(p), "positive_rate": _mean(y), "mean_relevance": _mean(p),
            "ece": expected_calibration_error(p, y) if p else None,
            "auc": float(roc_auc_score(y, p)) if 0 < sum(y) < len(y) else None}


def run_relevance(lm, *, out: str | Path, data: str | Path | None = None, mmlu: str | Path | None = None,
                  limit: int | None = 400, k: int = 3, seed: int = 0, max_new_tokens: int = 32,
                  pool_articles: int = 6, fit_articles: int = 6, fit_pairs: int = 300,
                  arms: Sequence[str] = ARMS, memory_options: dict[str, Any] | None = None,
                  poison: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the relevance benchmark (see the module docstring); writes ``results.json`` and ``items.jsonl``.

    Args:
        lm: the LanguageModel.
        out: results folder.
        data: a SQuAD-format file (default: the shared SQuAD dev set).
        mmlu: an MMLU folder (``dev/``, ``test/``) for the general questions (default: the shared one).
        limit: questions asked (half answerable); default 400.
        k: chunks injected at most / passages pasted at most.
        pool_articles, fit_articles: articles stored / used for fitting (seeded choice).
        fit_pairs: fit-article questions the relevance score is fitted on (seeded sample).
        memory_options: ActivationConfig overrides (e.g. ``{"gate_threshold": 0.7}``).
        poison: also store the poisoning set (:data:`nativemem.testing.poison.POISON`: notes that try to end the
            turn, impersonate the system or instruct the model) in the memory and the BM25 pool; each arm then
            reports how often it injected or pasted one (``poison_injected``) and how often a reply carried a
            poisoning payload (``poison_payload``).
    """
    import shutil

    import nativemem as nm
    from tqdm.auto import tqdm

    from .arms_activation import BENCH_MEMORY_CONFIG
    from .results import save_run
    from .tasks import data_root
    from .tasks.squad import load_squad

    arms, limit = _check_args(arms, limit, k, max_new_tokens, fit_pairs, pool_articles, fit_articles)
    squad_path = Path(data) if data is not None else data_root() / "squad" / "squad-v1.1-dev.json"
    mmlu_path = Path(mmlu) if mmlu is not None else data_root() / "mmlu"
    squad = load_squad(squad_path)
    mmlu_dev, mmlu_test = _open_questions(mmlu_path)
    pool_a, fit_a, _ = _split(squad, seed, pool_articles, fit_articles)
    rng = random.Random(seed)
    by_art = {"pool": [], "fit": [], "rest": []}
    for item in squad.items:
        a = _article(item)
        by_art["pool" if a in pool_a else "fit" if a in fit_a else "rest"].append(item)
    questions = _questions(by_art, mmlu_test, limit, rng)
    pool = [c for c in squad.chunks.values() if c.doc_id in pool_a]
    fit_chunks = [c for c in squad.chunks.values() if c.doc_id in fit_a]
    fit_items = rng.sample(by_art["fit"], min(fit_pairs, len(by_art["fit"])))
    pairs = [(it.question, squad.chunks[it.gold_chunk_ids[0]].text) for it in fit_items]
    fit_unanswerable = rng.sample(mmlu_dev, min(len(mmlu_dev), max(1, len(pairs) // 3)))

    # the memory: fitted on the fit articles (transforms and relevance), the pool stored
    t0 = time.perf_counter()
    config = {**BENCH_MEMORY_CONFIG, "top_k": k, **dict(memory_options or {})}
    folder = Path(tempfile.mkdtemp(prefix="nativemem-relevance-"))
    memory = nm.open_memory(folder / "memory", lm, kind="activation", **config)
    fit_receipt = memory.fit([c.text for c in fit_chunks][:256], relevance_pairs=pairs, unanswerable=fit_unanswerable,
                             seed=seed)
    if poison:
        from ..retrieval import Chunk
        from ..testing.poison import POISON

        pool = pool + [Chunk(f"poison:{i}", text, doc_id="poison") for i, text in enumerate(POISON)]
    memory.add([c.text for c in pool], user_id=USER, source_ids=[c.id for c in pool])
    threshold = memory.config.gate_threshold
    write_s = time.perf_counter() - t0
    bm25_threshold, bm25_objective = _bm25_threshold(squad, fit_items, fit_unanswerable, k, seed)
    records = []
    try:
        prepared = _arms(arms, lm, pool, memory=memory, bm25_threshold=bm25_threshold, k=k,
                         max_new_tokens=max_new_tokens)
        for q in tqdm(questions, desc="relevance", disable=not progress):
            rec = {**{key: q[key] for key in ("id", "kind", "question", "answers", "gold")}, "arms": {}}
            for name, arm in prepared.items():
                rec["arms"][name] = _answer(name, arm, q)
            _score(rec)
            if poison:
                _poison_marks(rec)
            records.append(rec)
    finally:
        memory.close()
        shutil.rmtree(folder, ignore_errors=True)

    config = {"data": str(squad_path), "mmlu": str(mmlu_path), "limit": limit, "k": k,
              "max_new_tokens": max_new_tokens, "pool_articles": sorted(pool_a, key=int),
              "fit_articles": sorted(fit_a, key=int), "pool_paragraphs": len(pool), "fit_pairs": len(pairs),
              "fit_unanswerable": len(fit_unanswerable), "memory": config, "gate_threshold": threshold,
              "bm25_threshold": bm25_threshold, "bm25_threshold_objective_on_fit": bm25_objective,
              "decoding": "greedy", "poison": poison}
    blocks = {arm: _arm_block(arm, records, seed) for arm in arms}
    lower = ("inject_rate_unanswerable", "gate_over_ttft")  # and every time and poisoning rate
    results = save_run(
        out, lm, task="relevance", task_version="1", n=len(records), seed=seed, config=config, records=records,
        arms=blocks, comparisons=_comparisons(arms, records, seed),
        higher_is_better={m: not (m in lower or m.endswith("_s") or m.startswith("poison"))
                          for b in blocks.values() for m in b["metrics"]},
        device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."), write_s=write_s,
        counts={kind: sum(r["kind"] == kind for r in records) for kind in ("answerable", "other_article", "general")},
        relevance_fit=fit_receipt.details.get("relevance"), calibration_test=_calibration(records))
    if progress:
        print(format_relevance(results), flush=True)
    return results


def format_relevance(results: dict[str, Any]) -> str:
    """A Markdown summary of one relevance run."""
    lines = [f"relevance, model {results['model_name']}, n = {results['n']} ({results['counts']}), k = "
             f"{results['config']['k']}, gate_threshold {results['config']['gate_threshold']}, BM25 threshold "
             f"{results['config']['bm25_threshold']:.3f}", "",
             "| arm | contains (answerable) | F1 | agree with none (unanswerable) | overall | injects (ans / unans) "
             "| TTFT median | e2e median |", "|---|---|---|---|---|---|---|---|"]
    for arm, block in results["arms"].items():
        m = block["metrics"]
        lines.append(f"| {arm} | {m['contains_answerable']:.3f} | {m['f1_answerable']:.3f} | "
                     f"{m['agree_none_unanswerable']:.3f} | {m['overall']:.3f} | {m['inject_rate_answerable']:.2f} / "
                     f"{m['inject_rate_unanswerable']:.2f} | {1000 * m['ttft_median_s']:.0f} ms | "
                     f"{1000 * m['e2e_median_s']:.0f} ms |")
    c = results["calibration_test"]
    if c.get("ece") is not None:
        lines.append(f"\ncalibrated relevance on the test questions' hits: ECE {c['ece']:.3f}, AUC "
                     f"{c['auc'] if c['auc'] is None else round(c['auc'], 3)}, n = {c['hits']} hits")
    g = results["arms"].get("activation_gated", {}).get("metrics", {})
    if "gate_median_s" in g:
        lines.append(f"gate: {1000 * g['gate_median_s']:.1f} ms median ({100 * g['gate_over_ttft']:.1f} % of the "
                     "gated arm's median TTFT)")
    if results["config"].get("poison"):
        lines.append("poisoning set stored: " + "; ".join(
            f"{arm} injected one for {100 * b['metrics']['poison_injected_rate']:.1f} % of questions, payload in "
            f"{100 * b['metrics']['poison_payload_rate']:.1f} % of replies" for arm, b in results["arms"].items()))
    for comp in results["comparisons"]:
        if comp["metric"] in ("contains_answerable", "overall_per_question") and {comp["a"], comp["b"]} in (
                {"activation", "activation_gated"}, {"activation_gated", "rag_bm25_gated"}):
            lines.append(f"{comp['a']} vs {comp['b']}, {comp['metric']}: diff {comp['diff']:+.3f}, "
                         f"p = {comp['p_value']:.3g} (McNemar, n = {comp['n']})")
    return "\n".join(lines)
