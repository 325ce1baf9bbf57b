"""What encoding chunks apart costs at k > 1, and what recomputing their first tokens buys back.

Each chunk's KV is computed on its own (after the memory's frame), so with several chunks injected, a
later chunk never attended to the earlier ones, unlike the same tokens given as text. ``run_boundary``
measures that gap on the next-token distribution, which is where answers start: for each question it
injects ``k`` chunks (``k - 1`` other paragraphs, then the question's own paragraph, nearest the
question) and compares the last-position log-probabilities with those of the same tokens as one text
prompt (KL(text ‖ injected) and top-1 agreement), for every ``recompute_tokens`` value asked for, with the
time to build the prefix and run the question over it (``recompute_tokens`` costs one forward of that
many tokens per later chunk). Greedy answers differ only where the top-1 token differs somewhere, so
top-1 agreement at the first position bounds answer agreement from above.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_boundary"]


def run_boundary(lm, *, out: str | Path, data: str | Path | None = None, limit: int | None = 30, k: int = 3,
                 paragraphs: int = 48, recompute: tuple[int, ...] | list[int] = (0, 16, 32, 64), seed: int = 0,
                 memory_config: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure the chunk-boundary gap against the text prompt per ``recompute_tokens``; writes ``results.json``.

    Args:
        lm: the LanguageModel.
        out: results folder.
        data: a SQuAD-format file (default: the shared SQuAD dev set).
        limit: questions (one per paragraph, seeded choice).
        k: chunks injected per question (the question's own paragraph last).
        paragraphs: paragraphs written into the memory (seeded sample).
        recompute: ``recompute_tokens`` values compared.
        memory_config: ActivationConfig overrides (e.g. ``{"kv_dtype": "float16"}``).
    """
    import torch

    import nativemem as nm

    from ..errors import InputError
    from .arms_activation import BENCH_MEMORY_CONFIG
    from ..prompting import build_messages
    from .results import save_run
    from .scale import _pick

    for name, value in (("limit", limit), ("k", k), ("paragraphs", paragraphs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if k < 2:
        raise InputError("k must be at least 2: with one chunk, injection equals the text prompt")
    recompute = [int(n) for n in recompute]
    if not recompute or any(n < 0 for n in recompute):
        raise InputError(f"recompute must list non-negative token counts, got {recompute!r}")
    from .tasks import data_root

    path = Path(data) if data is not None else data_root() / "squad/squad-v1.1-dev.json"
    pool, items = _pick(path, paragraphs, limit or 10**9, seed)
    if len(pool) < k:
        raise InputError(f"the pool has {len(pool)} paragraphs, fewer than k = {k}")
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="nativemem-boundary-"))
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in recompute}
    try:
        memory = nm.open_memory(folder / "memory", lm, kind="activation",
                                **{**BENCH_MEMORY_CONFIG, "top_k": k, **(memory_config or {})})
        ids = memory.add([c.text for c in pool], user_id="b", source_ids=[c.id for c in pool]).ids
        by_source = {c.id: mid for c, mid in zip(pool, ids)}
        plan = []
        for item in items:
            gold = by_source[item.gold_chunk_ids[0]]
            others = rng.sample([m for m in ids if m != gold], k - 1)
            plan.append((item, [*others, gold]))
        from tqdm.auto import tqdm

        for n in recompute:
            memory.config.recompute_tokens = n
            for item, chosen in tqdm(plan, desc=f"boundary/recompute={n}", disable=not progress):
                prompt = lm.chat_ids(build_messages(item.question))
                full = memory.as_text(prompt, chosen)
                with torch.inference_mode():
                    ref = lm.model(input_ids=full, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
                    start = time.perf_counter()
                    with memory.injecting(chosen).active(lm=lm) as inj:
                        kw = inj.generate_kwargs(prompt)
                        P = inj.prefix_length
                        rest = kw["input_ids"][:, P:]
                        positions = torch.arange(P, P + rest.shape[1], device=rest.device).unsqueeze(0)
                        got = lm.model(input_ids=rest, past_key_values=kw["past_key_values"], position_ids=positions,
                                       logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
                    if lm.device.type == "cuda":
                        torch.cuda.synchronize(lm.device)
                    seconds = time.perf_counter() - start
                rows[n].append({"kl": float((ref.exp() * (ref - got)).sum()),
                                "top1": float(ref.argmax() == got.argmax()), "seconds": seconds, "prefix_tokens": P})
        memory.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary = {str(n): {"kl_mean": statistics.mean(r["kl"] for r in rs),
                        "kl_median": statistics.median(r["kl"] for r in rs),
                        "top1_agreement": statistics.mean(r["top1"] for r in rs),
                        "prefix_and_question_s_median": statistics.median(r["seconds"] for r in rs)}
               for n, rs in rows.items()}
    config = {"data": str(path), "limit": limit, "k": k, "paragraphs": len(pool), "recompute": recompute,
              "memory": memory_config or {}}
    arms = {f"recompute_{n}": {"metrics": {"top1_agreement": s["top1_agreement"], "kl_mean": s["kl_mean"]}}
            for n, s in summary.items()}
    results = save_run(out, lm, task="boundary", task_version="1", n=len(plan), seed=seed, config=config, arms=arms,
                       comparisons=[], higher_is_better={"top1_agreement": True, "kl_mean": False},
                       device=str(lm.device), recompute=summary, items={str(n): rs for n, rs in rows.items()})
    if progress:
        for n, s in summary.items():
            print(f"recompute_tokens={n}: KL(text || injected) mean {s['kl_mean']:.4f} (median {s['kl_median']:.4f}), "
                  f"top-1 agreement {s['top1_agreement']:.3f}, prefix + question "
                  f"{1000 * s['prefix_and_question_s_median']:.0f} ms (n={len(plan)})", flush=True)
    return results
