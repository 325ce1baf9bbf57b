"""Consolidation: move what a user's activation memory holds into a parametric memory (side_ffn or pkm).

The user's stored chunks are read back in write order and written into the target memory with its own
``add`` (side_ffn: memorize + test-time training on each chunk; pkm: each sentence becomes a completion
fact: every word but the last is the prompt, the last word is the answer). Then every sentence is asked
the same way *without retrieval*: the greedy continuation of its prompt must start with its last word.
The receipt reports recall and mean per-token NLL of the sentences before (the bare model) and after
(the model with the target memory), so a consolidation that taught nothing says so; and, for sentences that
state an entity's attribute, recall of a held-out question about it ("Name the employer of Ada Lind."), the
phrasing no training used (``details["after"]["questions"]``).

The source is read through the memory contract (:meth:`~nativemem.memories.base.Memory.items`), and every
model step (each probe, each training step) is a :func:`~nativemem.turns.model_step`, so a server can run a
consolidation between other requests (see :func:`~nativemem.turns.taking_turns`).
"""

from __future__ import annotations

import re
import time
from typing import Any

from .errors import InputError
from .memories.base import Memory, Receipt
from .text import split_sentences
from .turns import model_step

__all__ = ["consolidate", "completion_probes", "stored_chunks"]

_WORD = re.compile(r"\w+", re.UNICODE)


def completion_probes(texts: list[str], *, max_items: int = 200) -> list[tuple[str, str, str]]:
    """(sentence, prompt, answer word) for sentences of at least four words."""
    out = []
    for text in texts:
        for sentence in split_sentences(text):
            words = sentence.split()
            if len(words) < 4 or not _WORD.search(words[-1]):
                continue
            out.append((sentence, " ".join(words[:-1]), words[-1]))
            if len(out) >= max_items:
                return out
    return out


def question_probes(texts: list[str], *, max_items: int = 200) -> list[tuple[str, str]]:
    """(question, answer) about the sentences that state an entity's attribute ("Ada Lind works for Nordic
    Robotics."): a held-out phrasing of the question, one that augmentation never trains
    (:func:`~nativemem.memories.pkm.augment.fact_of_sentence`), so recall on it means the fact was stored, not the
    sentence."""
    from .memories.pkm.augment import fact_of_sentence

    out = []
    for text in texts:
        for sentence in split_sentences(text):
            fact = fact_of_sentence(sentence)
            if fact is None or not fact.paraphrases:
                continue
            out.append((fact.paraphrases[len(out) % len(fact.paraphrases)], fact.answer))
            if len(out) >= max_items:
                return out
    return out


def _ask(lm, probes: list[tuple[str, str]], memory) -> dict[str, Any]:
    """Greedy answers to the questions in the library's chat layout: the same words as the answer (case and
    punctuation aside), or containing them."""
    from .prompting import build_messages, postprocess_answer

    def words(text: str) -> str:
        return " ".join(_WORD.findall(text.lower()))

    em = contains = 0
    for question, answer in probes:
        with model_step():
            gen = lm.generate(lm.chat_ids(build_messages(question)), max_new_tokens=lm.count_tokens(answer) + 4,
                              memory=memory, query=question)
        got, want = words(postprocess_answer(gen.text)), words(answer)
        em += got == want
        contains += bool(want) and f" {want} " in f" {got} "
    n = max(1, len(probes))
    return {"recall": em / n, "recall_contains": contains / n, "asked": len(probes)}


def _norm(word: str) -> str:
    return "".join(_WORD.findall(word.lower()))


def _score(lm, probes, memory) -> dict[str, Any]:
    import torch

    hits, nlls = 0, []
    bos = [] if lm.tokenizer.bos_token_id is None else [int(lm.tokenizer.bos_token_id)]
    for sentence, prompt, answer in probes:
        ids = torch.tensor([bos + lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=lm.device)
        n = lm.count_tokens(" " + answer) + 1
        with model_step():
            gen = lm.generate(ids, max_new_tokens=n, memory=memory, query=prompt)
        got = gen.text.split()
        hits += bool(got) and _norm(got[0]) == _norm(answer) and bool(_norm(answer))
        with model_step():
            nlls.append(float(lm.nll(sentence, memory=memory).mean()))
    n = max(1, len(probes))
    return {"recall": hits / n, "recalled": hits, "mean_nll": sum(nlls) / n if nlls else None}


def stored_chunks(source: Memory, user_id: str | None, *, page: int = 1000) -> list[dict[str, Any]]:
    """Every item of ``user_id`` in ``source``, oldest first (the memory contract's :meth:`items`, paged)."""
    out: list[dict[str, Any]] = []
    while True:
        got = source.items(user_id=user_id, limit=page, offset=len(out))
        out += got
        if len(got) < page:
            return out


def consolidate(source, target: Memory, *, user_id: str | None = None, max_items: int = 200,
                chunks: list[dict[str, Any]] | None = None, **options) -> Receipt:
    """Write ``user_id``'s activation-memory chunks into ``target`` and measure recall without retrieval.

    Args:
        source: an activation memory (its chunks are read, never changed).
        target: a side_ffn or pkm memory for the same model.
        user_id: whose chunks (None: the anonymous user's).
        max_items: cap on the sentences asked before/after.
        chunks: the user's items as :func:`stored_chunks` reads them, when the caller read them already (e.g.
            under its store lock); None reads them here.
        options: passed to ``target.add`` (e.g. training steps for side_ffn).

    Returns:
        The target's add receipt, with ``op="consolidate"`` and ``details["before"]``/``["after"]``.
    """
    if target.kind not in ("side_ffn", "pkm"):
        raise InputError(f"consolidation goes into a side_ffn or pkm memory, not {target.kind!r}")
    if getattr(source, "kind", None) != "activation":
        raise InputError("consolidation reads an activation memory")
    target.fingerprint.check(source.lm.fingerprint)
    start = time.perf_counter()
    user = "" if user_id is None else user_id
    rows = stored_chunks(source, user_id) if chunks is None else chunks
    texts = [str(r.get("text", "")) for r in rows if str(r.get("text", "")).strip()]
    if not texts:
        return Receipt(target.kind, "consolidate", notes=[f"user {user_id!r} has no activation memories: "
                                                          "nothing was consolidated"])
    lm = source.lm
    probes = completion_probes(texts, max_items=max_items)
    questions = question_probes(texts, max_items=max_items)
    before = {**_score(lm, probes, None), "questions": _ask(lm, questions, None)}
    if target.kind == "pkm":
        sentences = [s for t in texts for s in split_sentences(t) if len(s.split()) >= 2]
        receipt = target.add(sentences, user_id=user_id, **options)
    else:
        receipt = target.add(texts, user_id=user_id, **options)
    after = {**_score(lm, probes, target), "questions": _ask(lm, questions, target)}
    receipt.op = "consolidate"
    receipt.details.update(before=before, after=after, chunks=len(texts), probes=len(probes),
                           source_ids=[r["id"] for r in rows], user_id=user)
    receipt.notes.append(f"recall without retrieval on {len(probes)} stored sentences: {before['recall']:.3f} "
                         f"before, {after['recall']:.3f} after")
    if questions:
        receipt.notes.append(f"held-out questions about {len(questions)} stated facts, without retrieval: "
                             f"{before['questions']['recall']:.3f} before, {after['questions']['recall']:.3f} after")
    receipt.elapsed_s = time.perf_counter() - start
    return receipt
