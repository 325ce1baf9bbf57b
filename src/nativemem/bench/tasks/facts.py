"""The ``facts`` benchmark: store synthetic facts, then measure recall, paraphrase recall and the drift they
cause on neutral text and general QA.

What :func:`run_facts_benchmark` measures, per arm (:mod:`nativemem.bench.arms`, one registry for every task), on identical items:

- ``recall``: greedy exact recall of every stored fact asked in its training phrasing: the generated
  answer (``max_new_tokens`` cap, post-processed as every benchmark answer) equals the fact's answer after
  SQuAD normalisation; ``recall_contains`` credits an answer wrapped in a sentence;
- ``recall_paraphrase`` (and ``recall_paraphrase_contains``): the same with one held-out phrasing per fact, for up
  to ``paraphrase_limit`` facts: a template of the relation that augmentation never trains (the ``heldout``
  templates of :data:`~nativemem.memories.pkm.RELATIONS`, or a facts file's own ``paraphrases``);
- ``recall_reverse``: for those of them whose value names one entity (a birth city, an employer), a held-out
  reverse question ("Which person has Oslo as their birthplace?"), answered by the entity;
- ``ppl`` and ``ppl_drift``: perplexity of neutral passages (PG-19 test books and the haystack essays,
  ``passage_words`` words each) and its relative change against the bare model (``none``), with a paired
  bootstrap interval over passages;
- ``mmlu_acc``, ``mmlu_agree`` and ``qa_drift``: MMLU test questions answered by the letter with the highest
  logit; accuracy, agreement with the bare model's letter, and the accuracy change against ``none``
  with its paired interval (McNemar p-value);
- cost: training time (total and per fact), exposures, bytes stored (total and per fact), peak RSS, pool
  size, and for the pkm arms the forward-time overhead of the memory at 512 tokens.

Data splits (no item is used twice): the gate of ``pkm_gated`` is trained with the built-in closed set plus
``gate_passages`` passages from the *other* half of each book and the odd-numbered essays, MMLU *dev*
questions and SQuAD questions; drift is measured on the first half of the books, the even-numbered essays
and MMLU *test*.

``FactsTask`` also registers the facts as a QA task (``run_benchmark("facts", ...)``): one item per fact
question, the pool is the fact sentences, so the QA arms (``none``, ``rag_bm25``, ...) run on it unchanged.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from ...prompting import DEFAULT_SYSTEM
from . import Chunk, QAItem, Task, TaskData, data_root, register_task

__all__ = ["FactsTask", "run_facts_benchmark", "neutral_passages", "mmlu_items", "forward_overhead", "load_facts_file"]

_LETTERS = ("A", "B", "C", "D")
_GUTENBERG = re.compile(r"\*\*\*\s*START OF[^\n]*\n(.*?)\*\*\*\s*END OF", re.S)


def load_facts_file(path: str | Path):
    """Facts from a JSONL/TSV file (see :func:`nativemem.memories.pkm.load_facts`)."""
    from ...memories.pkm import load_facts, parse_facts

    return parse_facts(load_facts(path))


def _facts(data, num_facts: int, seed: int):
    from ...memories.pkm import generate_facts

    if data is None:
        return generate_facts(num_facts, seed=seed)
    facts = load_facts_file(data)
    return facts[:num_facts] if num_facts else facts


@register_task("facts")
class FactsTask(Task):
    """Synthetic facts as QA items (training phrasing, plus paraphrases when ``paraphrases`` > 0).

    Args:
        data: a facts file (JSONL/TSV); None generates ``num_facts`` facts with ``facts_seed``.
        num_facts: number of facts (the first ones of a file).
        facts_seed: seed of the generator.
        paraphrases: paraphrased questions per fact added as extra items.
    """

    version = "1"

    def __init__(self, data: str | Path | None = None, *, num_facts: int = 100, facts_seed: int = 0,
                 paraphrases: int = 0) -> None:
        super().__init__(data)
        if int(num_facts) < 1 or int(paraphrases) < 0:
            raise InputError(f"num_facts must be >= 1 and paraphrases >= 0, got {num_facts}, {paraphrases}")
        self.generated = data is None
        self.num_facts, self.facts_seed, self.paraphrases = int(num_facts), int(facts_seed), int(paraphrases)
        if self.generated:
            self.path = Path(f"generated-facts-n{self.num_facts}-seed{self.facts_seed}")

    def options(self) -> dict[str, Any]:
        return {"num_facts": self.num_facts, "facts_seed": self.facts_seed, "paraphrases": self.paraphrases,
                "generated": self.generated}

    @property
    def facts(self) -> list:
        """The stored facts (what arms that learn facts train on)."""
        if getattr(self, "_facts", None) is None:
            self._facts = _facts(None if self.generated else self.path, self.num_facts, self.facts_seed)
        return self._facts

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = self.load(self.path)
        return self._data

    def load(self, path: Path) -> TaskData:
        chunks = {f.id: Chunk(f.id, f.sentence or f"{f.prompt} {f.answer}") for f in self.facts}
        items = []
        for f in self.facts:
            items.append(QAItem(f.id, f.prompt, (f.answer,), (f.id,), (f.id,), {"phrasing": "training"}))
            for j, p in enumerate(f.paraphrases[: self.paraphrases]):
                items.append(QAItem(f"{f.id}:p{j + 1}", p, (f.answer,), (f.id,), (f.id,), {"phrasing": "paraphrase"}))
        return TaskData(tuple(items), chunks)


# ---------------------------------------------------------------------- neutral text and general QA
def _split_words(text: str, words: int) -> list[str]:
    tokens = text.split()
    return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]


def neutral_passages(root: Path, *, words: int = 180, count: int = 16, split: str = "eval",
                     seed: int = 0) -> list[dict[str, str]]:
    """Neutral passages from PG-19 books (licence header and footer cut) and the haystack essays.

    ``split="eval"`` takes the first half of each book and the even-numbered essays (sorted by name);
    ``"gate"`` the second half and the odd-numbered essays. Half the passages come from each source, drawn
    with ``seed``.

    Raises:
        DataError: a folder is missing or holds no usable text.
    """
    if split not in ("eval", "gate"):
        raise ValueError(f"split must be eval or gate, got {split!r}")
    pools: dict[str, list[tuple[str, str]]] = {"pg19": [], "haystack": []}
    books = sorted((root / "pg19").glob("*.txt"))
    essays = sorted((root / "haystack").glob("*.txt"))
    if not books or not essays:
        raise DataError(f"{root}: needs pg19/*.txt and haystack/*.txt for the neutral-text passages")
    for book in books:
        text = book.read_text(encoding="utf-8", errors="replace")
        m = _GUTENBERG.search(text)
        body = (m.group(1) if m else text).split()
        half = len(body) // 2
        offset, part = (0, body[:half]) if split == "eval" else (half, body[half:])
        pools["pg19"] += [(f"pg19/{book.stem}@{offset + i * words}", p)
                          for i, p in enumerate(_split_words(" ".join(part), words))]
    for n, essay in enumerate(essays):
        if (n % 2 == 0) == (split == "eval"):
            text = essay.read_text(encoding="utf-8", errors="replace")
            pools["haystack"] += [(f"haystack/{essay.stem}@{i * words}", p)
                                  for i, p in enumerate(_split_words(text, words))]
    rng = random.Random(f"neutral-{split}-{seed}")
    out = []
    for source, pool in pools.items():
        take = rng.sample(pool, min(len(pool), (count + 1) // 2 if source == "pg19" else count // 2))
        out += [{"id": pid, "source": source, "text": text} for pid, text in take]
    return out


def mmlu_items(root: Path, *, split: str = "test", limit: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """MMLU questions (CSV ``question,choice0..3,answer``), a seeded sample spread over the subjects.

    Raises:
        DataError: the folder is missing or a file is malformed.
    """
    from .mmlu import read_mmlu_csv

    folder = root / "mmlu" / split
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(f"{folder}: no MMLU CSV files")
    rows = [{"id": it.id, "subject": it.subject, "question": it.question, "choices": list(it.choices),
             "answer": it.answer} for file in files for it in read_mmlu_csv(file)]
    rng = random.Random(f"mmlu-{split}-{seed}")
    rng.shuffle(rows)
    return rows[:limit]


def _mmlu_content(item: dict[str, Any]) -> str:
    choices = "\n".join(f"{letter}. {c}" for letter, c in zip(_LETTERS, item["choices"]))
    return f"{item['question']}\n{choices}\nAnswer with the letter of the correct choice."


def squad_questions(root: Path, limit: int, seed: int = 0) -> list[str]:
    """Questions from the SQuAD file (gate negatives only); [] when the file is missing."""
    from .squad import load_squad

    path = root / "squad" / "squad-v1.1-dev.json"
    if not path.exists():
        return []
    qs = [item.question for item in load_squad(path).items]
    random.Random(f"squad-gate-{seed}").shuffle(qs)
    return qs[:limit]


# ---------------------------------------------------------------------- measurement helpers
def forward_overhead(lm, memory, *, tokens: int = 512, reps: int = 5, text: str | None = None) -> dict[str, float]:
    """Forward time of one ``tokens``-token pass with the memory vs without (medians of interleaved runs)."""
    import torch

    if text is None:
        text = " ".join(["The committee met on Tuesday to discuss the budget for the coming year."] * 64)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise InputError(f"the overhead text has {len(ids)} tokens, fewer than {tokens}")
    bos = [lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []
    x = torch.tensor([(bos + ids)[:tokens]], device=lm.device)
    bare, mem = [], []
    lm.logits(x)
    lm.logits(x, memory=memory)
    for _ in range(reps):
        t = time.perf_counter()
        lm.logits(x)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        lm.logits(x, memory=memory)
        mem.append(time.perf_counter() - t)
    b, m = statistics.median(bare), statistics.median(mem)
    return {"bare_s": b, "memory_s": m, "overhead": m / b - 1.0, "tokens": tokens, "reps": reps}


def _answer(arm, fact, question: str, answer: str) -> dict[str, Any]:
    out = arm.answer(QAItem(fact.id, question, (answer,), (fact.id,), (fact.id,)))
    return {"output": out.text, "raw_output": out.raw_text, "retrieved": [cid for cid, _ in out.retrieved],
            "ttft_s": out.ttft_s, "total_s": out.total_s or 0.0, "prompt_tokens": out.prompt_tokens}


def _nll(lm, arm, text: str) -> tuple[float, int]:
    nll = lm.nll(text, memory=arm.memory())
    return float(nll.sum()), int(nll.numel())


def _mmlu_letter(lm, arm, item: dict[str, Any], letter_ids: list[int]) -> int:
    ids = lm.chat_ids(_mmlu_content(item), system=DEFAULT_SYSTEM)
    logits = lm.logits(ids, memory=arm.memory())[0, -1].float()
    return int(logits[letter_ids].argmax())


# ---------------------------------------------------------------------- the run
def _evaluate(lm, arm, name: str, recall_facts, para_items, passages, mmlu, letter_ids, reference: dict[str, Any],
              records: list[dict[str, Any]], log, cost: dict[str, Any] | None) -> tuple[dict[str, list[float]], int, float]:
    """Ask an arm every fact (training phrasing, then paraphrases), score the neutral passages and MMLU; the
    ``none`` arm sets ``reference``; with ``cost``, a pkm arm's forward overhead goes into it. Returns the
    per-item scores, the passage tokens and the generation time."""
    from ..metrics import answer_scores

    scores: dict[str, list[float]] = {"recall": [], "recall_contains": [], "recall_paraphrase": [],
                                      "recall_paraphrase_contains": [], "recall_reverse": [],
                                      "recall_reverse_contains": [], "passage_nll": [], "mmlu_acc": [],
                                      "mmlu_agree": []}
    tokens = 0
    gen_s = 0.0
    with arm.session():
        asked = (("", [(f, f.prompt, f.answer) for f in recall_facts]),
                 ("_paraphrase", [(f, q, f.answer) for f, q in para_items]),
                 ("_reverse", [(f, *f.meta["reverse"]) for f, _ in para_items if f.meta.get("reverse")]))
        for suffix, batch in asked:
            for f, question, answer in batch:
                rec = _answer(arm, f, question, answer)
                s = answer_scores(rec["output"], [answer])
                gen_s += rec["total_s"]
                scores[f"recall{suffix}"].append(s["em"])
                scores[f"recall{suffix}_contains"].append(s["contains"])
                records.append({"arm": name, "kind": "recall", "phrasing": suffix.strip("_") or "training",
                                "item_id": f.id, "question": question, "answers": [answer], "metrics": s, **rec})
        log(f"{name}: recall {statistics.fmean(scores['recall']):.3f}"
            + (f", held-out paraphrase {statistics.fmean(scores['recall_paraphrase']):.3f}" if para_items else "")
            + (f", held-out reverse {statistics.fmean(scores['recall_reverse']):.3f}" if scores["recall_reverse"]
               else ""))
        for p in passages:
            total, n = _nll(lm, arm, p["text"])
            tokens += n
            scores["passage_nll"].append(total / n)
            records.append({"arm": name, "kind": "ppl", "item_id": p["id"], "source": p["source"], "tokens": n,
                            "nll_sum": total})
        preds = [_mmlu_letter(lm, arm, q, letter_ids) for q in mmlu]
        if name == "none":
            reference["mmlu"] = preds
            reference["nll"] = list(scores["passage_nll"])
            reference["tokens"] = tokens
        for q, pred, ref in zip(mmlu, preds, reference["mmlu"]):
            scores["mmlu_acc"].append(float(pred == q["answer"]))
            scores["mmlu_agree"].append(float(pred == ref))
            records.append({"arm": name, "kind": "mmlu", "item_id": q["id"], "pred": pred, "answer": q["answer"],
                            "bare_pred": ref})
        if cost is not None and name.startswith("pkm"):
            cost["forward_overhead_512"] = forward_overhead(lm, arm.memory())
    return scores, tokens, gen_s


def _metrics(scores: dict[str, list[float]], reference: dict[str, Any], mmlu, seed: int) -> tuple[dict, dict]:
    """Means with bootstrap intervals; perplexity and its drift from ``none``; MMLU accuracy drift."""
    from ..stats import bootstrap_mean_ci

    arm_scores_nll = scores["passage_nll"]
    nll_mean = statistics.fmean(arm_scores_nll)
    ref_mean = statistics.fmean(reference["nll"])
    drift_ci = bootstrap_mean_ci([a - b for a, b in zip(arm_scores_nll, reference["nll"])], seed=seed)
    metrics = {k2: (statistics.fmean(v) if v else None) for k2, v in scores.items() if k2 != "passage_nll"}
    metrics["ppl"] = math.exp(nll_mean)
    metrics["ppl_drift"] = math.exp(nll_mean - ref_mean) - 1.0
    metrics["qa_drift"] = metrics["mmlu_acc"] - statistics.fmean(
        float(p == q["answer"]) for p, q in zip(reference["mmlu"], mmlu))
    ci95 = {k2: list(bootstrap_mean_ci(v, seed=seed)) if v else None for k2, v in scores.items()
            if k2 != "passage_nll"}
    ci95["ppl_drift"] = [math.exp(drift_ci[0]) - 1.0, math.exp(drift_ci[1]) - 1.0]
    return metrics, ci95


def _comparisons(names: list[str], per_arm: dict[str, dict[str, list[float]]], seed: int) -> list[dict[str, Any]]:
    """Paired tests of every arm against ``none`` (and ``pkm_gated`` against ``pkm``)."""
    from ..stats import paired_comparisons

    pairs = [(a, "none") for a in names if a != "none"]
    if "pkm" in names and "pkm_gated" in names:
        pairs.append(("pkm_gated", "pkm"))
    metrics = ("recall", "recall_paraphrase", "recall_reverse", "mmlu_acc", "passage_nll")
    per_item = {a: {(m, i): {m: v} for m in metrics for i, v in enumerate(per_arm[a][m])} for a in names}
    return paired_comparisons(per_item, pairs=pairs, binary=lambda m: m != "passage_nll", seed=seed, metrics=metrics)


def run_facts_benchmark(lm, *, arms: Sequence[str] = ("none", "pkm", "pkm_gated", "rag_bm25"), num_facts: int = 100,
                        out: str | Path, seed: int = 0, data: str | Path | None = None,
                        data_dir: str | Path | None = None, recall_limit: int | None = None,
                        paraphrase_limit: int = 200, ppl_passages: int = 16, passage_words: int = 180,
                        mmlu_limit: int = 200, gate_passages: int = 32, gate_questions: int = 200, k: int = 3,
                        max_new_tokens: int = 24, memory_options: dict[str, Any] | None = None,
                        side_ffn_options: dict[str, Any] | None = None, baseline_lr: float = 1e-3,
                        lora_rank: int = 8, overhead: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the facts benchmark (see the module docstring) and write ``results.json`` and ``items.jsonl``.

    Args:
        lm: the LanguageModel.
        arms: arms (``list_arms()``: ``none``, ``rag_bm25``, ``pkm``, ``pkm_gated``, ``side_ffn``, ``lora``, ...);
            ``none`` is always run first (the drift reference).
        num_facts: facts to store (generated with ``seed`` unless ``data`` names a facts file).
        out: output folder.
        seed: seed of the facts, of every sample and of the bootstrap.
        data: a facts JSONL/TSV file instead of generated facts.
        data_dir: the evaluation data root (PG-19, haystack, MMLU, SQuAD); default ``data_root()``.
        recall_limit: facts asked for ``recall`` (all when None).
        paraphrase_limit: facts asked with a paraphrase.
        ppl_passages: neutral passages scored for perplexity.
        passage_words: words per passage.
        mmlu_limit: MMLU test questions.
        gate_passages / gate_questions: extra closed-set examples for the gate (disjoint splits).
        k: sentences retrieved by ``rag_bm25``.
        max_new_tokens: generation cap per answer.
        memory_options: PKMConfig overrides for the pkm arms (``num_keys`` grows with the facts by default); its
            ``phrasings``, ``batch_size``, ``max_epochs`` and ``margin`` also set the side_ffn and lora arms' loop.
        side_ffn_options: SideFFNConfig overrides of the side_ffn arm (``width``, ``layers``, ...).
        baseline_lr: Adam learning rate of the side_ffn and lora arms.
        lora_rank: rank of the lora arm's adapters.
        overhead: measure the pkm arms' forward overhead at 512 tokens.
        progress: print progress lines.

    Returns:
        The results mapping, as written to ``results.json``.
    """
    from ..arms import get_arm
    from ..results import save_run
    from ..runner import peak_rss_bytes

    for name, value in (("num_facts", num_facts), ("max_new_tokens", max_new_tokens), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    names = ["none"] + [a for a in dict.fromkeys(arms) if a != "none"]
    classes = [(name, get_arm(name)) for name in names]  # unknown names fail before any work
    root = Path(data_dir) if data_dir is not None else data_root()
    log = (lambda msg: print(f"[facts] {msg}", flush=True)) if progress else (lambda msg: None)

    task = FactsTask(data, num_facts=num_facts, facts_seed=seed)
    facts = task.facts
    order = list(range(len(facts)))
    random.Random(f"facts-order-{seed}").shuffle(order)
    recall_facts = [facts[i] for i in order[: recall_limit or len(facts)]]
    para_rng = random.Random(f"facts-paraphrase-{seed}")
    para_items = [(f, para_rng.choice(f.paraphrases)) for f in (facts[i] for i in order) if f.paraphrases]
    para_items = para_items[:paraphrase_limit]
    passages = neutral_passages(root, words=passage_words, count=ppl_passages, split="eval", seed=seed)
    mmlu = mmlu_items(root, split="test", limit=mmlu_limit, seed=seed)
    letter_ids = [lm.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in _LETTERS]
    gate_neg = [p["text"] for p in neutral_passages(root, words=passage_words, count=gate_passages, split="gate",
                                                    seed=seed)] if gate_passages else []
    gate_q = []
    if gate_questions:
        gate_q = [q["question"] for q in mmlu_items(root, split="dev", limit=gate_questions // 2, seed=seed)]
        gate_q += squad_questions(root, gate_questions - len(gate_q), seed)
    options = {"gate_negatives": gate_neg, "gate_questions": gate_q, "side_ffn": side_ffn_options or {},
               "baseline_lr": baseline_lr, "lora": {"rank": lora_rank}, "shared": {},
               "progress_fn": (lambda e, a, loss: log(f"  epoch {e}: {a} facts trained, loss {loss:.3f}"))
               if progress else None}
    log(f"{len(facts)} facts, {len(recall_facts)} asked, {len(para_items)} paraphrases, {len(passages)} passages, "
        f"{len(mmlu)} MMLU questions; arms {names}")

    pool = list(task.data.chunks.values())
    records: list[dict[str, Any]] = []
    per_arm: dict[str, dict[str, list[float]]] = {}
    results_arms: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for name, cls in classes:
        arm = cls(k=k, max_new_tokens=max_new_tokens, memory_options=memory_options, options=options)
        start = time.perf_counter()
        log(f"{name}: preparing")
        arm.prepare(pool, lm, items=[], task=task)
        cost = dict(arm.cost)
        prepare_s = time.perf_counter() - start
        scores, tokens, gen_s = _evaluate(lm, arm, name, recall_facts, para_items, passages, mmlu, letter_ids,
                                          reference, records, log, cost if overhead else None)
        metrics, ci95 = _metrics(scores, reference, mmlu, seed)
        stored = int(arm.bytes_stored())
        cost.update(prepare_s=prepare_s, wall_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
                    bytes_stored=stored, bytes_per_fact=stored / len(facts), generate_s_total=gen_s,
                    ppl_tokens=tokens)
        results_arms[name] = {"n": len(recall_facts), "scored": len(recall_facts), "skipped": 0,
                              "skipped_reasons": {}, "metrics": metrics, "ci95": ci95, "cost": cost}
        per_arm[name] = scores
        log(f"{name}: ppl drift {metrics['ppl_drift']:+.4f}, MMLU {metrics['mmlu_acc']:.3f} "
            f"(agree {metrics['mmlu_agree']:.3f}), stored {stored:,} bytes")

    config = {"arms": names, "num_facts": len(facts), "recall_limit": recall_limit, "paraphrases": len(para_items),
              "ppl_passages": len(passages), "passage_words": passage_words, "mmlu_limit": len(mmlu),
              "gate_passages": len(gate_neg), "gate_questions": len(gate_q), "k": k, "max_new_tokens": max_new_tokens,
              "memory_options": memory_options or {}, "decoding": "greedy", "system_prompt": DEFAULT_SYSTEM,
              "data": str(data) if data is not None else f"generated (seed {seed})"}
    lower = ("ppl", "ppl_drift")
    return save_run(out, lm, task="facts", task_version=FactsTask.version, n=len(recall_facts), seed=seed,
                    config=config, arms=results_arms, comparisons=_comparisons(names, per_arm, seed), records=records,
                    higher_is_better={m: m not in lower for m in next(iter(results_arms.values()))["metrics"]})
