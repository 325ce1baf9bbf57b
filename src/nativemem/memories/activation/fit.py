"""Fit an activation memory on a fit set: TwoNN layer curve, retrieval-layer probe, whitening transforms.

Steps (after Neural Native Memory's layer selection and whitening, github.com/tobiasbrummer/neural-native-memory):

1. **ID curve.** Residual stream after every layer, at *content* tokens only (BOS and template excluded),
   dropping attention-sink positions (a token whose norm exceeds ``SINK_FACTOR`` x the median token norm
   of that layer in its text, at any layer), subsampling at most ``tokens_per_text`` tokens per text and
   ``MAX_ID_POINTS`` in all. TwoNN per layer.
2. **Re-routed layers** from the curve (:func:`~.encode.choose_reroute_layers`), unless fixed in the config.
3. **Retrieval probe.** Candidate layers (the re-routed ones plus 1/2, 2/3, 5/6 and full depth) are scored
   by the MRR of probe queries against probe texts, pooled (cosine) and token-level (MaxSim), each with a
   transform fitted on texts the probe does not use. Probe pairs are the caller's (e.g. a training split;
   transforms then fitted on all fit texts) or, by default, the first sentence against the rest of each
   text of a held-out half of the fit set (transforms fitted on the other half). The layer with the best
   pooled + token MRR wins (ties: the deeper one).
4. **Transforms** at the chosen layer, fitted on every fit text. With ``whiten="auto"`` each variant keeps
   z-score + PCA whitening or plain centring, whichever scored better in the probe (both scores are in
   the report). On SmolLM2-135M with SQuAD paragraphs, whitening did not beat centring (see the report
   of issue 3); the whitening gains reported for that system came from a transductive fit (transforms
   fitted on the evaluated corpus itself).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch

from ...errors import InputError
from ...text import chunk_text, split_sentences
from ..base import Receipt
from .encode import choose_reroute_layers, encode_layers, fit_transform, twonn
from .kv import capture

__all__ = ["fit_memory", "id_curve", "SINK_FACTOR", "MAX_ID_POINTS"]

SINK_FACTOR = 8.0
MAX_ID_POINTS = 2048
MAX_TOKEN_FIT = 20_000
MIN_PROBE_PAIRS = 4
MAX_PROBE_PAIRS = 128


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def id_curve(memory, layouts, *, tokens_per_text: int, rng: random.Random) -> tuple[list[float], int]:
    """TwoNN intrinsic dimension after every layer over content tokens (sinks dropped); (curve, points)."""
    L = memory.geometry.num_layers
    per_text = max(1, min(tokens_per_text, math.ceil(MAX_ID_POINTS / max(1, len(layouts)))))
    points: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for batch in _batches(list(layouts), memory.config.batch_size):
        caps = capture(memory.lm.model, [lay.ids for lay in batch], kv=False, hidden_layers=range(L),
                       pad_id=memory._pad_id())
        for lay, cap in zip(batch, caps):
            start, end = lay.content
            if end - start < 1:
                continue
            keep = torch.ones(end - start, dtype=torch.bool)
            for l in range(L):
                norms = cap.hidden[l][start:end].float().norm(dim=-1)
                keep &= norms <= SINK_FACTOR * norms.median().clamp_min(1e-12)
            idx = [i for i in range(end - start) if keep[i]]
            idx = sorted(rng.sample(idx, min(per_text, len(idx))))
            for l in range(L):
                points[l].append(cap.hidden[l][start:end][idx].float().cpu())
    curve = []
    n = 0
    for l in range(L):
        x = torch.cat(points[l]) if points[l] else torch.zeros((0, 1))
        n = int(x.shape[0])
        curve.append(twonn(x))
    return curve, n


def _pseudo_pairs(texts: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for t in texts:
        sentences = split_sentences(t)
        if len(sentences) >= 2:
            pairs.append((sentences[0], " ".join(sentences[1:])))
    return pairs


def _mrr(q: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """MRR and hit@1 when query i's relevant document is document i (cosine)."""
    q = torch.nn.functional.normalize(q, dim=-1)
    d = torch.nn.functional.normalize(d, dim=-1)
    s = q @ d.T
    gold = s.diagonal().unsqueeze(1)
    ranks = (s > gold).sum(1) + 1
    return float((1.0 / ranks.float()).mean()), float((ranks == 1).float().mean())


def _maxsim_mrr(queries: Sequence[torch.Tensor], docs: Sequence[torch.Tensor]) -> float:
    """MRR of token-level MaxSim (cosine) when query i's relevant document is document i."""
    norm = torch.nn.functional.normalize
    qs = [norm(q.float(), dim=-1) for q in queries]
    ds = [norm(d.float(), dim=-1) for d in docs]
    scores = torch.tensor([[float((q @ d.T).max(dim=1).values.sum()) for d in ds] for q in qs])
    ranks = (scores > scores.diagonal().unsqueeze(1)).sum(1) + 1
    return float((1.0 / ranks.float()).mean())


def fit_memory(memory, texts, *, probe_pairs=None, tokens_per_text: int = 32, max_texts: int = 512,
               seed: int = 0) -> Receipt:
    start = time.perf_counter()
    cfg = memory.config
    texts = memory._texts(texts)
    rng = random.Random(seed)
    if len(texts) > max_texts:
        texts = rng.sample(texts, max_texts)
    if len(texts) < 2:
        raise InputError(f"fit needs at least 2 texts, got {len(texts)}")
    memory._reset_store()
    L = memory.geometry.num_layers
    first_chunks = [chunk_text(t, cfg.chunk_tokens, memory.lm.count_tokens)[0] for t in texts]
    layouts = [memory.chunk_layout(c) for c in first_chunks]
    for lay in layouts:
        memory._check_fits(lay, what="fit text")

    # 1-2. ID curve and re-routed layers
    curve, n_points = id_curve(memory, layouts, tokens_per_text=tokens_per_text, rng=rng)
    if cfg.reroute_layers is not None:
        reroute, rule = list(cfg.reroute_layers), "fixed in the config"
    else:
        reroute, rule = choose_reroute_layers(curve)

    # 3. retrieval probe over candidate layers
    if cfg.retrieval_layer is not None:
        candidates = [cfg.retrieval_layer]
    else:
        candidates = sorted({*reroute, *(round(f * (L - 1)) for f in (0.5, 2 / 3, 5 / 6, 1.0))})
    model, bias, pad = memory.lm.model, cfg.reroute_bias, memory._pad_id()

    def run(lays):
        out = []
        for batch in _batches(list(lays), cfg.batch_size):
            out += encode_layers(model, batch, layers=candidates, reroute=reroute, bias=bias, pad_id=pad)
        return out

    fit_states = run(layouts)
    D = memory.geometry.hidden_size
    modes = {"auto": (True, False), "always": (True,), "never": (False,)}[cfg.whiten]

    def fit_pooled(states, l, whiten):
        return fit_transform(torch.stack([s[l][1] for s in states]), dim=min(cfg.pooled_dim or D, D),
                             zscore=cfg.zscore, shrinkage=cfg.shrinkage, whiten=whiten)

    def fit_tokens(states, l, whiten):
        per_text = max(1, MAX_TOKEN_FIT // len(states))
        rows = []
        for s in states:
            tok = s[l][0]
            rows.append(tok[sorted(rng.sample(range(tok.shape[0]), min(per_text, tok.shape[0])))])
        return fit_transform(torch.cat(rows), dim=min(cfg.token_dim or D, D), zscore=cfg.zscore,
                             shrinkage=cfg.shrinkage, whiten=whiten)

    # probe pairs: the caller's, or pseudo pairs from a held-out half of the fit texts (the transforms used
    # while probing are fitted on the other half: probing texts a transform was fitted on is biased)
    if probe_pairs is not None:
        pairs, transform_states = list(probe_pairs), fit_states
    else:
        half = len(first_chunks) // 2
        pairs, transform_states = _pseudo_pairs(first_chunks[half:]), fit_states[:half]
    pairs = [(q, d) for q, d in pairs if q.strip() and d.strip()]
    probe: dict[str, dict[str, float]] = {}
    choice = {"pooled": modes[0], "tokens": modes[0]}
    name = {True: "whiten", False: "center"}
    if len(pairs) >= MIN_PROBE_PAIRS and len(transform_states) >= 2 and (len(candidates) > 1 or len(modes) > 1):
        pairs = rng.sample(pairs, min(len(pairs), MAX_PROBE_PAIRS))
        q_states = run([memory.query_layout(q) for q, _ in pairs])
        d_states = run([memory.chunk_layout(chunk_text(d, cfg.chunk_tokens, memory.lm.count_tokens)[0])
                        for _, d in pairs])
        for l in candidates:
            row: dict[str, float] = {}
            for whiten in modes:
                t = fit_pooled(transform_states, l, whiten)
                row[f"pooled_{name[whiten]}_mrr"] = round(_mrr(t.apply(torch.stack([s[l][1] for s in q_states])),
                                                               t.apply(torch.stack([s[l][1] for s in d_states])))[0], 4)
                t = fit_tokens(transform_states, l, whiten)
                row[f"tokens_{name[whiten]}_mrr"] = round(_maxsim_mrr([t.apply(s[l][0]) for s in q_states],
                                                                      [t.apply(s[l][0]) for s in d_states]), 4)
            probe[str(l)] = row

        def best(l, variant):
            return max(probe[str(l)][f"{variant}_{name[w]}_mrr"] for w in modes)

        layer = max(candidates, key=lambda l: (best(l, "pooled") + best(l, "tokens"), l))
        for variant in ("pooled", "tokens"):
            choice[variant] = max(modes, key=lambda w: (probe[str(layer)][f"{variant}_{name[w]}_mrr"], w))
        layer_rule = (f"retrieval probe: best pooled + token MRR over {len(pairs)} held-out pairs"
                      if len(candidates) > 1 else "fixed in the config")
    else:
        layer = candidates[0] if len(candidates) == 1 else (2 * (L - 1)) // 3
        layer_rule = ("fixed in the config" if cfg.retrieval_layer is not None
                      else f"2/3 depth (only {len(pairs)} probe pairs; need {MIN_PROBE_PAIRS})")

    # 4. transforms at the chosen layer, fitted on every fit text
    memory.pooled_transform = fit_pooled(fit_states, layer, choice["pooled"])
    memory.token_transform = fit_tokens(fit_states, layer, choice["tokens"])
    report = {
        "id_curve": [None if c != c else round(c, 3) for c in curve], "id_points": n_points,
        "reroute_layers": reroute, "reroute_rule": rule, "retrieval_layer": int(layer), "layer_rule": layer_rule,
        "probe": probe, "probe_pairs": len(pairs), "fit_texts": len(texts),
        "pooled_transform": memory.pooled_transform.mode, "token_transform": memory.token_transform.mode,
        "pooled_dim": memory.pooled_transform.dim(D), "token_dim": memory.token_transform.dim(D), "seed": seed,
    }
    cfg.fit_report = report
    if memory.path is not None and memory._tmpdir is None:
        memory.save()
    return Receipt(memory.kind, "fit", layers=sorted({layer, *reroute}), elapsed_s=time.perf_counter() - start,
                   steps=1, details=report, notes=[f"retrieval layer {layer} ({layer_rule}); re-routed {reroute} "
                                                   f"({rule}); transforms: pooled {memory.pooled_transform.mode}, "
                                                   f"tokens {memory.token_transform.mode}"])
