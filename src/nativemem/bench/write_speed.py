"""Write throughput of the activation memory against the model's plain forward pass on the same chunks.

``run_write`` takes ``limit`` SQuAD paragraphs (seeded sample; any SQuAD-format file with ``data``), lays each
out as the memory stores it (chunk template and text, after BOS; the memory's chat frame is left out:
it is the memory's own overhead), and times

- ``forward``: the model's plain batched forward over exactly those token sequences, batched as the memory
  batches them (sorted by length, ``batch_size`` per pass, right padding without a mask), no cache, logits
  of the last position only (as a prefill computes them), nothing kept;
- ``add``: ``memory.add(texts)`` into a fresh memory folder: chunking, the forward pass with KV and token
  capture, serialisation and fsync of the payload blobs, and the Qdrant upsert and flush.

The forward timing is taken before and after the write and averaged, so warm-up or drift in machine load
does not favour either side. Reported: tokens, seconds and tokens/s of both, their ratio
(``add_over_forward``; 1.0 = writing costs no more than reading the text once), bytes written per token.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_write"]


def _forward_seconds(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> float:
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda n: len(sequences[n]))
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = [sequences[n] for n in order[b: b + batch_size]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s, device=device)
            # right padding needs no mask in a causal model; logits of the last position only, as a prefill
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the kernels have run, not only been queued
    return time.perf_counter() - start


def plain_sequences(memory, texts: list[str]) -> tuple[list[list[int]], int]:
    """Token sequences of exactly the chunks ``memory.add(texts)`` writes, as a plain forward reads them
    (BOS and the chunk with its template; the memory's frame is the memory's own overhead), and the pad id."""
    from ..text import chunk_text

    cfg = memory.config
    pieces = [c for t in texts for c in chunk_text(t, cfg.chunk_tokens, memory.lm.count_tokens)]
    frame, bos = len(memory.frame_ids()[0]), memory._bos()
    return [bos + list(memory.chunk_layout(c).ids)[frame:] for c in pieces], memory._pad_id()


def run_write(lm, *, out: str | Path, data: str | Path | None = None, limit: int | None = 256, seed: int = 0,
              memory_config: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure activation-memory write throughput against the plain forward; writes ``out/results.json``.

    Args:
        lm: the LanguageModel.
        out: results folder.
        data: a SQuAD-format file (default: the shared SQuAD dev set).
        limit: paragraphs written (seeded sample); None = all.
        seed: sample seed.
        memory_config: ActivationConfig overrides (e.g. ``{"index_pooled": true}``, ``{"kv_dtype": "int8"}``).
    """
    import nativemem as nm

    from ..errors import InputError
    from .results import save_run
    from .tasks import data_root
    from .tasks.squad import load_squad

    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of paragraphs, got {limit}")
    path = Path(data) if data is not None else data_root() / "squad/squad-v1.1-dev.json"
    chunks = list(load_squad(path).chunks.values())
    random.Random(seed).shuffle(chunks)
    texts = [c.text for c in chunks[:limit]]
    log = (lambda msg: print(f"[write] {msg}", flush=True)) if progress else (lambda msg: None)
    folder = Path(tempfile.mkdtemp(prefix="nativemem-write-"))
    try:
        memory = nm.open_memory(folder / "memory", lm, kind="activation", **(memory_config or {}))
        config = memory.config
        # exactly the chunks add() writes (long paragraphs are split by the memory's chunker)
        sequences, pad = plain_sequences(memory, texts)
        log(f"{len(texts)} paragraphs, {sum(map(len, sequences))} tokens, batch {config.batch_size}")
        _forward_seconds(lm.model, sequences[: config.batch_size], config.batch_size, pad)  # warm-up
        before = _forward_seconds(lm.model, sequences, config.batch_size, pad)
        log(f"forward {before:.2f} s")
        start = time.perf_counter()
        receipt = memory.add(texts, user_id="write-bench")
        add_s = time.perf_counter() - start
        log(f"add {add_s:.2f} s")
        after = _forward_seconds(lm.model, sequences, config.batch_size, pad)
        log(f"forward again {after:.2f} s")
        memory.close()
        stored = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    forward_s = (before + after) / 2
    tokens_forward = sum(map(len, sequences))
    forward = {"seconds": forward_s, "seconds_runs": [before, after], "tokens": tokens_forward,
               "tokens_per_s": tokens_forward / forward_s}
    add = {"seconds": add_s, "tokens": tokens_forward, "tokens_stored": receipt.tokens, "chunks": len(receipt.ids),
           "tokens_per_s": tokens_forward / add_s, "bytes_written": receipt.bytes_written, "bytes_on_disk": stored,
           "bytes_per_token": receipt.details["bytes_per_token"]}
    ratio = add["tokens_per_s"] / forward["tokens_per_s"]
    config = {"data": str(path), "limit": limit, "batch_size": config.batch_size, "payload": config.payload,
              "kv_dtype": config.kv_dtype, "index_pooled": memory.indexes_pooled, "variant": config.variant,
              "chunks": len(sequences)}
    arms = {"forward": {"metrics": {"tokens_per_s": forward["tokens_per_s"]}},
            "add": {"metrics": {"tokens_per_s": add["tokens_per_s"], "add_over_forward": ratio}}}
    return save_run(out, lm, task="write", task_version="1", n=len(texts), seed=seed, config=config, arms=arms,
                    comparisons=[], forward=forward, add=add, add_over_forward=ratio)
