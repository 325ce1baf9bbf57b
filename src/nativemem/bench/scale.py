"""The activation memory's costs at one model shape: write throughput, bytes per token, search and TTFT per tier.

``run_scale`` writes a pool of SQuAD paragraphs into a fresh activation memory (the benchmark memory config:
each paragraph one chunk, written in the user turn of the benchmark's chat prompt) and then, for each of
``n`` questions whose paragraph is in the pool, times:

- ``search``: the memory's own-state search (query encoded up to the retrieval layer, token MaxSim fused
  with BM25 in Qdrant), and ``bm25``: the bm25s search of the ``rag_bm25`` arm over the same pool;
- the time to first token of the same question with the top-``k`` chunks
  ``activation_disk`` (device and RAM tiers emptied, the segment files dropped from the OS page cache),
  ``activation_ram`` (the chunks in the host-RAM tier), ``activation_device`` (in the device tier; CUDA
  only), ``text_same_order`` (the same tokens as one text prompt) and ``rag_bm25`` (BM25's top-``k``
  passages pasted into the prompt);
- end to end, search plus TTFT (``activation_ram_e2e``, ``activation_disk_e2e``, ``rag_bm25_e2e``).

The write part is the ``write`` benchmark's: the model's plain batched forward over exactly the chunks that
``add()`` writes, timed before and after the write, against ``add()`` itself. Sizes: payload and index
bytes per stored token, as measured by ``stats()``. On CUDA every timing synchronises the device. With a
``random:NAME`` model the answers are noise, and only the timings and sizes mean anything (recorded in the
results as ``random_weights``).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_scale"]

USER = "scale"


def _sync(lm) -> None:
    import torch

    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def _timed(lm, fn):
    _sync(lm)
    start = time.perf_counter()
    out = fn()
    _sync(lm)
    return out, time.perf_counter() - start


def _pick(data: Path, paragraphs: int, questions: int, seed: int):
    from .tasks.squad import load_squad

    task = load_squad(data)
    chunks = list(task.chunks.values())
    rng = random.Random(seed)
    rng.shuffle(chunks)
    pool = chunks[:paragraphs]
    in_pool = {c.id for c in pool}
    items = [it for it in task.items if it.gold_chunk_ids and it.gold_chunk_ids[0] in in_pool]
    rng.shuffle(items)
    return pool, items[:questions]


class _Reader:
    """Times one question through every read path (see :func:`run_scale`)."""

    def __init__(self, lm, memory, bm25, texts: dict[str, str], source_of: dict[str, str], k: int,
                 max_new_tokens: int):
        self.lm, self.memory, self.bm25, self.texts, self.source_of = lm, memory, bm25, texts, source_of
        self.k, self.max_new_tokens = k, max_new_tokens

    def time(self, item) -> dict[str, Any]:
        from ..prompting import build_messages

        lm, memory, bm25, texts, source_of = self.lm, self.memory, self.bm25, self.texts, self.source_of
        k, max_new_tokens = self.k, self.max_new_tokens
        hits, search_s = _timed(lm, lambda: memory.search(item.question, k=k, user_id=USER))
        bm, bm25_s = _timed(lm, lambda: bm25.search(item.question, k))
        ids = [h.id for h in hits]
        prompt = lm.chat_ids(build_messages(item.question))
        row: dict[str, Any] = {"item_id": item.id, "search_s": search_s, "bm25_s": bm25_s,
                               "retrieved": [source_of.get(i) for i in ids]}
        pinned = memory.injecting(ids)
        memory.drop_caches(("device", "host", "page"))
        g = lm.generate(prompt, max_new_tokens=max_new_tokens, memory=pinned)
        row.update(activation_disk=g.ttft_s, prefix_tokens=g.prefix_tokens, prompt_tokens=g.prompt_tokens,
                   activation_text=g.text, disk_timing=dict(memory.last_timing))
        memory.drop_caches(("device",))
        g = lm.generate(prompt, max_new_tokens=max_new_tokens, memory=pinned)
        row.update(activation_ram=g.ttft_s, ram_timing=dict(memory.last_timing))
        if lm.device.type == "cuda" and memory.tiers.device_lru.budget > 0:
            g = lm.generate(prompt, max_new_tokens=max_new_tokens, memory=pinned)
            row.update(activation_device=g.ttft_s, device_timing=dict(memory.last_timing))
        full = memory.as_text(prompt, ids)
        g = lm.generate(full, max_new_tokens=max_new_tokens)
        row.update(text_same_order=g.ttft_s, text_same_order_tokens=g.prompt_tokens, text_same_order_text=g.text)
        rag_prompt = lm.chat_ids(build_messages(item.question, [texts[cid] for cid, _ in bm]))
        g = lm.generate(rag_prompt, max_new_tokens=max_new_tokens)
        row.update(rag_bm25=g.ttft_s, rag_bm25_tokens=g.prompt_tokens)
        row["activation_ram_e2e"] = search_s + row["activation_ram"]
        row["activation_disk_e2e"] = search_s + row["activation_disk"]
        row["rag_bm25_e2e"] = bm25_s + row["rag_bm25"]
        return row


def _medians(per_item: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """Median TTFTs and search times, median steps of each tier, and the ratios to ``rag_bm25``."""

    def med(name: str) -> float | None:
        vals = [r[name] for r in per_item if name in r]
        return statistics.median(vals) if vals else None

    timings = {name: med(name) for name in (
        "search_s", "bm25_s", "activation_disk", "activation_ram", "activation_device", "text_same_order", "rag_bm25",
        "activation_ram_e2e", "activation_disk_e2e", "rag_bm25_e2e")}
    steps = {}
    for tier in ("disk", "ram", "device"):
        rows = [r[f"{tier}_timing"] for r in per_item if f"{tier}_timing" in r]
        if rows:
            steps[tier] = {s: statistics.median(r.get(s, 0.0) for r in rows)
                           for s in ("fetch_s", "transfer_s", "assemble_s", "injection_s")}
    rag = timings["rag_bm25"]
    ratios = {f"{name}_over_rag_bm25": (timings[name] / rag if timings[name] is not None and rag else None)
              for name in ("activation_disk", "activation_ram", "activation_device", "text_same_order")}
    ratios["e2e_activation_ram_over_rag_bm25"] = timings["activation_ram_e2e"] / timings["rag_bm25_e2e"]
    ratios["e2e_activation_disk_over_rag_bm25"] = timings["activation_disk_e2e"] / timings["rag_bm25_e2e"]
    return timings, steps, ratios


def run_scale(lm, *, out: str | Path, data: str | Path | None = None, limit: int | None = 40, k: int = 3,
              paragraphs: int = 147, seed: int = 0, max_new_tokens: int = 2,
              memory_config: dict[str, Any] | None = None, cudnn_attention: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Measure write throughput, sizes, search latency and TTFT per tier; writes ``out/results.json``.

    Args:
        lm: the LanguageModel (any device; ``random:NAME`` shapes for timing without weights).
        out: results folder.
        data: a SQuAD-format file (default: the shared SQuAD dev set).
        limit: questions timed (their paragraphs are in the pool; seeded choice).
        k: chunks retrieved and injected (and passages pasted for ``rag_bm25``) per question.
        paragraphs: pool size (seeded sample of the file's paragraphs).
        max_new_tokens: tokens generated per answer (TTFT needs one).
        memory_config: ActivationConfig overrides (e.g. ``{"kv_dtype": "float16"}``).
        cudnn_attention: let PyTorch pick cuDNN's attention kernel (its default on Hopper GPUs). cuDNN builds
            an execution plan for every new sequence length, tens of milliseconds each, which a prompt of new
            length pays at its first token; False turns that backend off for the run (flash attention and the
            others are unaffected), as a server would. Recorded in the results.
    """
    import nativemem as nm

    from ..errors import InputError
    from .arms_activation import BENCH_MEMORY_CONFIG
    from .results import save_run
    from ..retrieval import BM25Retriever
    from .tasks import data_root
    from .write_speed import _forward_seconds, plain_sequences

    for name, value in (("limit", limit), ("k", k), ("paragraphs", paragraphs), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    path = Path(data) if data is not None else data_root() / "squad/squad-v1.1-dev.json"
    pool, items = _pick(path, paragraphs, limit or 10**9, seed)
    if not items:
        raise InputError(f"no question of {path} has its paragraph in a pool of {paragraphs}")
    log = (lambda msg: print(f"[scale] {msg}", flush=True)) if progress else (lambda msg: None)
    import torch

    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(bool(cudnn_attention))
    folder = Path(tempfile.mkdtemp(prefix="nativemem-scale-"))
    try:
        config = {**BENCH_MEMORY_CONFIG, "top_k": k, **(memory_config or {})}
        memory = nm.open_memory(folder / "memory", lm, kind="activation", **config)
        cfg = memory.config
        # --------------------------------------------------------------- write
        sequences, pad = plain_sequences(memory, [c.text for c in pool])
        _forward_seconds(lm.model, sequences[: cfg.batch_size], cfg.batch_size, pad)  # warm-up
        warm = memory.add(pool[0].text[:200], user_id="warm-up")  # first-call costs (frame, kernels) untimed
        before = _forward_seconds(lm.model, sequences, cfg.batch_size, pad)
        receipt, add_s = _timed(lm, lambda: memory.add([c.text for c in pool], user_id=USER,
                                                     source_ids=[c.id for c in pool]))
        after = _forward_seconds(lm.model, sequences, cfg.batch_size, pad)
        forward_s = (before + after) / 2
        tokens = sum(map(len, sequences))
        log(f"write: {tokens} tokens, add {add_s:.2f} s vs forward {forward_s:.2f} s")
        for mid in warm.ids:
            memory.delete(mid)
        stats = memory.stats()
        rows = memory.store.index.scroll(user_id=USER, with_payload=["source_id"])
        source_of = {mid: p["source_id"] for mid, p in rows}
        texts = {c.id: c.text for c in pool}
        bm25 = BM25Retriever()
        bm25.index(pool)
        # --------------------------------------------------------------- reads
        reader = _Reader(lm, memory, bm25, texts, source_of, k, max_new_tokens)
        reader.time(items[0])  # warm-up of every path
        from tqdm.auto import tqdm

        per_item = [reader.time(item) for item in tqdm(items, desc="scale", disable=not progress)]
        memory.close()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
        shutil.rmtree(folder, ignore_errors=True)

    timings, steps, ratios = _medians(per_item)
    same = sum(r["activation_text"] == r["text_same_order_text"] for r in per_item)
    config = {"data": str(path), "limit": limit, "k": k, "paragraphs": len(pool), "max_new_tokens": max_new_tokens,
              "memory": dict(config), "cudnn_attention": bool(cudnn_attention)}
    fp16 = memory.geometry.bytes_per_token("float16")
    results = save_run(
        out, lm, task="scale", task_version="1", n=len(per_item), seed=seed, config=config, comparisons=[],
        arms={name: {"metrics": {"ttft_median_s": value}} for name, value in timings.items() if value is not None},
        higher_is_better={"ttft_median_s": False}, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
        device_name=_device_name(lm),
        write={"tokens": tokens, "forward_s": forward_s, "forward_runs_s": [before, after], "add_s": add_s,
               "forward_tokens_per_s": tokens / forward_s, "add_tokens_per_s": tokens / add_s,
               "add_over_forward": forward_s / add_s, "chunks": len(receipt.ids)},
        bytes={"payload_per_token": stats["payload_bytes_per_token"],
               "index_vectors_per_token": stats["index_vector_bytes_per_token"], "fp16_kv_per_token": fp16,
               "payload_over_fp16": stats["payload_bytes_per_token"] / fp16, "payload_total": stats["payload_bytes"],
               "tokens": stats["tokens"]},
        ttft_median_s=timings, ratios=ratios, steps_median_s=steps,
        tokens_median={"activation_prefilled": statistics.median(r["prompt_tokens"] for r in per_item),
                       "activation_prefix": statistics.median(r["prefix_tokens"] for r in per_item),
                       "text_same_order": statistics.median(r["text_same_order_tokens"] for r in per_item),
                       "rag_bm25": statistics.median(r["rag_bm25_tokens"] for r in per_item)},
        agreement_activation_text_same_order=same / len(per_item), items=per_item)
    if progress:
        print(format_scale(results), flush=True)
    return results


def _device_name(lm) -> str:
    import torch

    if lm.device.type == "cuda":
        return torch.cuda.get_device_name(lm.device)
    import platform

    return platform.processor() or platform.machine()


def format_scale(results: dict[str, Any]) -> str:
    """A Markdown summary of one ``run_scale`` result."""
    t, r, w, b = results["ttft_median_s"], results["ratios"], results["write"], results["bytes"]

    def ms(x):
        return "–" if x is None else f"{1000 * x:.1f} ms"

    def ratio(x):
        return "–" if x is None else f"{x:.2f}×"

    lines = [f"model {results['model_name']} on {results['device_name']} ({results['dtype']}), n = {results['n']}, "
             f"k = {results['config']['k']}, kv_dtype {results['config']['memory'].get('kv_dtype', 'default')}, "
             f"cuDNN attention {'on' if results['config']['cudnn_attention'] else 'off'}"
             + (" — random weights: timings and sizes only" if results.get("random_weights") else ""), "",
             "| what | median | ÷ rag_bm25 |", "|---|---|---|"]
    for name, key in (("activation TTFT, disk tier", "activation_disk"),
                      ("activation TTFT, RAM tier", "activation_ram"),
                      ("activation TTFT, device tier", "activation_device"),
                      ("text_same_order TTFT", "text_same_order"), ("rag_bm25 TTFT", "rag_bm25")):
        over = 1.0 if key == "rag_bm25" else r.get(f"{key}_over_rag_bm25")
        lines.append(f"| {name} | {ms(t[key])} | {ratio(over)} |")
    lines += [f"| own-state search | {ms(t['search_s'])} | |", f"| BM25 search | {ms(t['bm25_s'])} | |",
              f"| end to end, activation (RAM) | {ms(t['activation_ram_e2e'])} | "
              f"{ratio(r['e2e_activation_ram_over_rag_bm25'])} |",
              f"| end to end, activation (disk) | {ms(t['activation_disk_e2e'])} | "
              f"{ratio(r['e2e_activation_disk_over_rag_bm25'])} |",
              f"| end to end, rag_bm25 | {ms(t['rag_bm25_e2e'])} | 1.00× |", "",
              f"write: {w['add_tokens_per_s']:,.0f} tok/s vs plain forward {w['forward_tokens_per_s']:,.0f} tok/s "
              f"({w['add_over_forward']:.2f}×); payload {b['payload_per_token']:,.0f} B/token "
              f"({b['payload_over_fp16']:.3f} of fp16's {b['fp16_kv_per_token']:,}), index vectors "
              f"{b['index_vectors_per_token']:,.0f} B/token"]
    return "\n".join(lines)
