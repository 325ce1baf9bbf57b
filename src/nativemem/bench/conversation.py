"""Conversation memory: facts stated in one chat, asked in a new one (``nativemem bench conversation``).

A user states personal facts, one per turn, in a chat with ``remember`` on (each finished exchange is written
into their activation memory); then a new conversation, with no history, asks one question per fact. Arms:

- ``none``: the new conversation without memory (the model cannot know the facts; the floor);
- ``remembered``: the same questions with the user's memory (retrieval, the relevance gate, KV injection), the
  exchanges written from the chat's own KV (``remember(generation=...)``: no second pass over the exchange);
- ``remembered_separate``: the same, with each exchange written by a separate pass (``remember`` without the
  generation) into a second memory.

Reported: ``contains`` (the fact's answer appears in the reply) per arm with a bootstrap interval and the paired
tests; the write's cost per turn for both ways of writing (``write_s`` against the turn's own generation time,
``write_over_turn``); and how often the gate injected the remembered exchange. The facts are built in
(synthetic, so the model cannot know them); ``limit`` takes the first N.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_conversation", "FACTS"]

_PEOPLE = [("sister", "Mara"), ("brother", "Tobin"), ("neighbour", "Ilse"), ("dentist", "Dr. Okafor"),
           ("boss", "Renata"), ("best friend", "Quill"), ("cousin", "Anouk"), ("landlord", "Mr. Pryce"),
           ("piano teacher", "Lorna"), ("doctor", "Dr. Vasquez")]
_THINGS = [("cat", "Pixel"), ("dog", "Biscuit"), ("boat", "Sea Otter"), ("car", "Bluebell"), ("horse", "Juniper"),
           ("parrot", "Kiwi"), ("plant", "Gerald"), ("bicycle", "Rocket"), ("laptop", "Orion"), ("goldfish", "Bubbles")]
_NUMBERS = [("locker code at the gym", "4312"), ("flat number", "27"), ("bank PIN hint", "9-1-7"),
            ("seat number on the train", "43C"), ("table number at the wedding", "12"), ("parking spot", "B17"),
            ("room number at the hotel", "508"), ("bib number in the marathon", "2291"),
            ("badge number at work", "7734"), ("shoe size", "44")]
_PLACES = [("I grew up in", "Where did I grow up?", "Lyon"), ("I work in", "Where do I work?", "Tampere"),
           ("My wife was born in", "Where was my wife born?", "Cork"),
           ("My next holiday is in", "Where is my next holiday?", "Madeira"),
           ("My grandmother lives in", "Where does my grandmother live?", "Gdansk"),
           ("I studied in", "Where did I study?", "Leiden"), ("My office is in", "Where is my office?", "Bergen"),
           ("My brother moved to", "Where did my brother move to?", "Quito"),
           ("I bought my guitar in", "Where did I buy my guitar?", "Seville"),
           ("Our wedding was in", "Where was our wedding?", "Sintra")]

# (statement said in the first conversation, question asked in a new one, the answer)
FACTS: list[tuple[str, str, str]] = (
    [(f"My {who} is called {name}.", f"What is my {who} called?", name) for who, name in _PEOPLE]
    + [(f"My {what} is named {name}.", f"What is my {what} named?", name) for what, name in _THINGS]
    + [(f"My {what} is {n}.", f"What is my {what}?", n) for what, n in _NUMBERS]
    + [(f"{head} {place}.", question, place) for head, question, place in _PLACES])


def run_conversation(lm, *, out: str | Path, limit: int | None = None, seed: int = 0, max_new_tokens: int = 32,
                     progress: bool = True) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); writes ``out/results.json`` and ``out/items.jsonl``."""
    import nativemem as nm

    from ..prompting import build_messages
    from .stats import bootstrap_mean_ci, compare_paired

    facts = FACTS[:limit] if limit else FACTS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = print if progress else (lambda *a, **k: None)
    user = "conversation-user"
    with tempfile.TemporaryDirectory(prefix="nativemem-conversation-") as tmp:
        mem = nm.open_memory(Path(tmp) / "m", lm, kind="activation")
        separate = nm.open_memory(Path(tmp) / "separate", lm, kind="activation")
        system = mem.chat_system
        writes, writes_separate, turns, records, reused = [], [], [], [], []
        for n, (statement, _, _) in enumerate(facts):  # the first conversation: one fact per turn, remembered
            messages = build_messages(statement, system=system)
            gen = lm.generate(lm.chat_ids(messages), max_new_tokens=max_new_tokens, memory=mem, user_id=user,
                              query=statement, keep=lm.user_span(messages))
            reply = gen.text or "OK."
            receipt = mem.remember(statement, reply, user_id=user, generation=gen)
            other = separate.remember(statement, reply, user_id=user)
            writes.append(receipt.elapsed_s)
            writes_separate.append(other.elapsed_s)
            reused.append(float(bool(receipt.details.get("reused_kv"))))
            turns.append(gen.total_s)
            records.append({"kind": "turn", "item_id": n, "statement": statement, "reply": gen.text,
                            "turn_s": gen.total_s, "write_s": receipt.elapsed_s, "reused_kv": bool(reused[-1]),
                            "retrieval_states": receipt.details.get("retrieval_states"),
                            "write_separate_s": other.elapsed_s, "ids": receipt.ids})
            if progress and (n + 1) % 10 == 0:
                log(f"[conversation] {n + 1}/{len(facts)} turns remembered")
        arms = {"none": None, "remembered": mem, "remembered_separate": separate}
        scores: dict[str, list[float]] = {arm: [] for arm in arms}
        injected: dict[str, list[float]] = {"remembered": [], "remembered_separate": []}
        for n, (_, question, answer) in enumerate(facts):  # a new conversation: no history, only the memory
            ids = lm.chat_ids(build_messages(question, system=system))
            for arm, memory in arms.items():
                gen = lm.generate(ids, max_new_tokens=max_new_tokens, memory=memory, user_id=user, query=question)
                hit = float(answer.lower() in gen.text.lower())
                scores[arm].append(hit)
                rec = {"kind": "question", "arm": arm, "item_id": n, "question": question, "answers": [answer],
                       "output": gen.text, "contains": hit, "ttft_s": gen.ttft_s, "prefix_tokens": gen.prefix_tokens}
                if memory is not None:
                    chosen = [h for h in memory.last_selection.get("hits", []) if h["injected"]]
                    injected[arm].append(float(bool(chosen)))
                    rec["injected"] = chosen
                records.append(rec)
        mem.close()
        separate.close()
    ratios = [w / t for w, t in zip(writes, turns)]
    ratios_separate = [w / t for w, t in zip(writes_separate, turns)]
    results = {
        "task": "conversation", "model": lm.name, "n": len(facts), "seed": seed, "max_new_tokens": max_new_tokens,
        "arms": {arm: {"metrics": {"contains": statistics.fmean(v)},
                       "ci95": {"contains": list(bootstrap_mean_ci(v, seed=seed))}} for arm, v in scores.items()},
        "comparisons": {
            "remembered_vs_none": compare_paired(scores["remembered"], scores["none"], binary=True, seed=seed),
            "remembered_vs_remembered_separate": compare_paired(scores["remembered"], scores["remembered_separate"],
                                                                binary=True, seed=seed)},
        "write": {"reused_kv_rate": statistics.fmean(reused),
                  "write_s_median": statistics.median(writes), "turn_s_median": statistics.median(turns),
                  "write_over_turn_median": statistics.median(ratios), "write_over_turn_max": max(ratios),
                  "write_over_turn_ci95": list(bootstrap_mean_ci(ratios, seed=seed)),
                  "separate_write_s_median": statistics.median(writes_separate),
                  "separate_write_over_turn_median": statistics.median(ratios_separate),
                  "separate_write_over_turn_ci95": list(bootstrap_mean_ci(ratios_separate, seed=seed))},
        "inject_rate": statistics.fmean(injected["remembered"]),
        "machine_note": "timings are wall-clock on the machine that ran it; write_s reuses the chat's KV, "
                        "separate_write_s runs a separate pass over the exchange",
        "created": time.time()}
    for arm, rate in injected.items():
        results["arms"][arm]["metrics"]["inject_rate"] = statistics.fmean(rate)
    results["arms"]["remembered"]["metrics"]["write_over_turn_median"] = results["write"]["write_over_turn_median"]
    results["arms"]["remembered_separate"]["metrics"]["write_over_turn_median"] = \
        results["write"]["separate_write_over_turn_median"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with open(out / "items.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return results
