"""BEIR SciFact retrieval: BM25, MiniLM and the model's own states (pooled, token-level, hybrid) ranked by
nDCG@10 and Recall@100 (ir_measures), on the judged queries of a qrels file.

This is a retrieval benchmark, not a QA task, so it has its own runner, :func:`run_scifact` (CLI:
``nativemem scifact``). Data: a BEIR folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header
line); default ``scifact/`` under the data root with ``qrels/train.tsv``.

Fit split (never fit on what is evaluated): the judged queries are shuffled with the
seed; ``fit_fraction`` of them (their texts and their relevant documents) fit the own-state retrieval
transform and its layer probe; only the remaining queries are evaluated, against the full corpus.
Documents are ``title + " " + text``; a document longer than one chunk scores as its best chunk.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from . import Chunk, data_root

__all__ = ["load_beir", "run_scifact", "RANKERS", "OWN_STATE_RANKERS"]

OWN_STATE_RANKERS = ("pooled", "tokens", "hybrid", "hybrid_tokens")
RANKERS = ("bm25", "minilm", *OWN_STATE_RANKERS)


def _jsonl(path: Path) -> list[dict]:
    from ..results import read_jsonl

    return read_jsonl(path, "file not found (BEIR layout expected)")


def load_beir(folder: str | Path, qrels: str | Path = "qrels/train.tsv") -> tuple[dict, dict, dict]:
    """BEIR ``(corpus, queries, qrels)`` dicts: ``{doc_id: {"title", "text"}}``, ``{qid: text}``,
    ``{qid: {doc_id: score}}`` (queries without judgements are dropped)."""
    folder = Path(folder)
    corpus = {}
    for r in _jsonl(folder / "corpus.jsonl"):
        if "_id" not in r or "text" not in r:
            raise DataError(f"{folder / 'corpus.jsonl'}: every line needs '_id' and 'text'")
        corpus[str(r["_id"])] = {"title": str(r.get("title", "")), "text": str(r["text"])}
    queries = {str(r["_id"]): str(r["text"]) for r in _jsonl(folder / "queries.jsonl")}
    qrels_path = Path(qrels) if Path(qrels).is_absolute() else folder / qrels
    if not qrels_path.is_file():
        raise DataError(f"{qrels_path}: qrels file not found (pass --qrels)")
    judged: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # header
            if len(row) < 3:
                raise DataError(f"{qrels_path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
            qid, did, score = row[0], row[1], int(row[2])
            if qid in queries and did in corpus:
                judged.setdefault(qid, {})[did] = score
    if not judged:
        raise DataError(f"{qrels_path}: no judgement names a known query and document")
    return corpus, {q: queries[q] for q in judged}, judged


def _doc_text(doc: dict) -> str:
    return f"{doc['title']} {doc['text']}".strip() if doc["title"] else doc["text"]


def run_scifact(lm, *, arms: Sequence[str] = RANKERS, data: str | Path | None = None,
                qrels: str | Path = "qrels/train.tsv", limit: int | None = None, corpus_limit: int | None = None,
                fit_fraction: float = 0.3, out: str | Path = "results/scifact", seed: int = 0, depth: int = 100,
                progress: bool = True, memory_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank the corpus for every evaluation query with each ranker; write ``results.json`` + ``items.jsonl``.

    Args:
        lm: the LanguageModel whose own states are evaluated (the bm25 and minilm rankers ignore it).
        arms: rankers, names from :data:`RANKERS`.
        data: BEIR folder (default ``scifact/`` under the data root).
        qrels: judgements, relative to ``data`` or absolute.
        limit: evaluate at most this many queries (after the fit split, seeded order).
        corpus_limit: keep only this many documents (all judged ones first, then corpus order): quick runs.
        fit_fraction: share of the judged queries used only for fitting.
        depth: documents ranked per query (Recall@100 needs 100).
        memory_config: overrides of the own-state memory config (e.g. ``{"token_dim": 64}``).
    """
    import ir_measures
    from ir_measures import R, nDCG

    from ...retrieval import BM25Retriever, DenseRetriever
    from ..results import save_run
    from ..stats import means_with_ci, paired_comparisons

    rankers = list(arms)
    unknown = [r for r in rankers if r not in RANKERS]
    if unknown or not rankers:
        raise InputError(f"unknown ranker(s) {unknown}; choose from {', '.join(RANKERS)}")
    if not 0.0 <= fit_fraction < 1.0:
        raise InputError(f"fit_fraction must be in [0, 1), got {fit_fraction}")
    folder = Path(data) if data is not None else data_root() / "scifact"
    corpus, queries, judged = load_beir(folder, qrels)
    qids = sorted(judged)
    random.Random(seed).shuffle(qids)
    n_fit = int(round(fit_fraction * len(qids)))
    fit_q, eval_q = qids[:n_fit], qids[n_fit:]
    if limit is not None:
        eval_q = eval_q[:limit]
    if not eval_q:
        raise InputError("no evaluation queries left after the fit split")
    if corpus_limit is not None:
        keep = {d for q in (*eval_q, *fit_q) for d in judged[q]}
        keep |= set(list(corpus)[: max(0, corpus_limit - len(keep))])
        corpus = {d: v for d, v in corpus.items() if d in keep}
    chunks = [Chunk(did, _doc_text(doc)) for did, doc in corpus.items()]
    eval_qrels = {q: judged[q] for q in eval_q}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    costs: dict[str, dict[str, Any]] = {}
    memory = tmp = None
    for name in rankers:
        start = time.perf_counter()
        if name in ("bm25", "minilm"):
            retriever = BM25Retriever() if name == "bm25" else DenseRetriever(device=str(lm.device))
            retriever.index(chunks, progress=progress)
            index_s = time.perf_counter() - start
            runs[name] = {q: dict(retriever.search(queries[q], depth)) for q in eval_q}
            nbytes = retriever.nbytes
        else:
            index_s = 0.0  # the shared memory's build time is counted once, for the first own-state ranker
            if memory is None:
                pooled = any(r in ("pooled", "hybrid") for r in rankers)  # else one pass per document
                memory, tmp, fit_info = _own_state_memory(lm, chunks, corpus, queries, judged, fit_q, seed,
                                                          progress, {"index_pooled": pooled, **(memory_config or {})})
                index_s = time.perf_counter() - start
                costs["_own_states"] = {"index_s": index_s, "fit": fit_info}
            runs[name] = {q: _own_search(memory, queries[q], name, depth) for q in eval_q}
            nbytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        costs[name] = {"index_s": index_s, "query_s_total": time.perf_counter() - start - index_s,
                       "bytes_stored": int(nbytes)}
    measures = [nDCG @ 10, R @ 100]
    per_item: dict[str, dict[str, dict[str, float]]] = {}  # ranker -> query -> measure (0 where none came back)
    results_arms = {}
    for name, run in runs.items():
        pq: dict[str, dict[str, float]] = {}
        for m in ir_measures.iter_calc(measures, eval_qrels, run):
            pq.setdefault(m.query_id, {})[str(m.measure)] = float(m.value)
        agg = {str(k): float(v) for k, v in ir_measures.calc_aggregate(measures, eval_qrels, run).items()}
        per_item[name] = {q: {k: pq.get(q, {}).get(k, 0.0) for k in agg} for q in eval_q}
        ci = means_with_ci(per_item[name], seed=seed, metrics=list(agg))[1]
        results_arms[name] = {"n": len(eval_q), "scored": len(eval_q), "skipped": 0, "skipped_reasons": {},
                              "metrics": agg, "ci95": ci, "cost": costs[name]}
    comparisons = paired_comparisons(per_item, binary=lambda m: False, seed=seed, metrics=("nDCG@10", "R@100"))
    config = {"rankers": list(rankers), "data": str(folder.resolve()), "qrels": str(qrels),
              "corpus_size": len(corpus), "fit_queries": len(fit_q), "eval_queries": len(eval_q),
              "fit_fraction": fit_fraction, "depth": depth, "limit": limit, "corpus_limit": corpus_limit}
    records = [{"arm": name, "query_id": q, "query": queries[q], "relevant": eval_qrels[q],
                "metrics": per_item[name][q], "top10": [d for d, _ in sorted(run[q].items(), key=lambda t: -t[1])[:10]]}
               for name, run in runs.items() for q in eval_q]
    results = save_run(out, lm, task="scifact", task_version="1", n=len(eval_q), seed=seed, config=config,
                       arms=results_arms, comparisons=comparisons, records=records,
                       own_states=costs.get("_own_states"))
    if memory is not None:
        memory.close()
        del memory
        import gc

        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _own_state_memory(lm, chunks, corpus, queries, judged, fit_q, seed, progress, overrides):
    import nativemem as nm

    from ..arms_activation import TMP_ENV

    tmp = tempfile.mkdtemp(prefix="nativemem-scifact-", dir=os.environ.get(TMP_ENV))
    config = {"payload": "none", "chunk_tokens": 512, **overrides}
    memory = nm.open_memory(Path(tmp) / "memory", lm, kind="activation", **config)
    fit_docs = sorted({d for q in fit_q for d in judged[q]})
    pairs = [(queries[q], _doc_text(corpus[d])) for q in fit_q for d in judged[q] if judged[q][d] > 0]
    fit_info = None
    if len(fit_docs) >= 2:
        extra = [d for d in corpus if d not in set(fit_docs)]
        random.Random(seed).shuffle(extra)
        texts = [_doc_text(corpus[d]) for d in fit_docs] + [_doc_text(corpus[d]) for d in extra[:64]]
        fit_info = memory.fit(texts, probe_pairs=pairs or None, seed=seed).details
    from tqdm.auto import tqdm

    step = 64
    for i in tqdm(range(0, len(chunks), step), desc="own states: add corpus", disable=not progress):
        part = chunks[i: i + step]
        memory.add([c.text for c in part], source_ids=[c.id for c in part])
    return memory, tmp, fit_info


def _own_search(memory, query: str, variant: str, depth: int) -> dict[str, float]:
    scores: dict[str, float] = {}
    for h in memory.search(query, k=2 * depth, variant=variant):
        sid = str(h.payload.get("source_id"))
        scores[sid] = max(scores.get(sid, float("-inf")), h.score)
    return dict(sorted(scores.items(), key=lambda t: -t[1])[:depth])
