"""Tiers of the KV read path: device memory, host RAM, disk; and the assembly of one query's prefix.

How this works:

- **Tiers.** A chunk's record body (compressed, as stored) is looked up in a device LRU, then in a host
  LRU (pinned memory when the model is on a CUDA device), then read from its segment on disk (one
  contiguous read straight into pinned memory, CRC-checked) and kept in the host tier. Each LRU has a byte budget; a
  record larger than a tier's budget is not kept there (it is read again next time, never an error).
  Entries are keyed by user, chunk location and model fingerprint, and a memory's tiers are its own: a
  chunk is only ever fetched for the user whose search returned it, so no entry is shared across users.
- **Assembly** (:meth:`KVTiers.assemble`). The bodies of the query's chunks that are not on the device
  yet are copied from pinned host memory into one device buffer by asynchronous DMA copies (no staging
  copy on the host); then, on the device, each chunk is dequantised into its slice of one
  (layers, heads, positions, width) buffer behind the frame, all keys are rotated for their positions in
  one call per rotary type, and the per-layer views fill a ``DynamicCache``. Since bodies move
  compressed, the bytes crossing the bus are those stored (a quarter of fp16 with ``int4``), and the CPU
  is free while the copy and kernels run.
- **Out of device memory.** Filling the device tier never fails a query: on a CUDA out-of-memory error
  the device tier is emptied, a :class:`TierWarning` is issued, and the query goes the host path.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .payload import Record, dequantize

__all__ = ["ByteLRU", "KVTiers", "TierWarning", "rotate_all"]


class TierWarning(UserWarning):
    """A cache tier could not be used (out of device memory, budget too small); the query still runs."""


class ByteLRU:
    """Least-recently-used records under a byte budget."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._items: OrderedDict[Any, Record] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.oversize = 0

    def get(self, key) -> Record | None:
        rec = self._items.get(key)
        if rec is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return rec

    def put(self, key, rec: Record) -> bool:
        """Keep ``rec`` (evicting the least recently used); False if it is larger than the whole budget."""
        if rec.nbytes > self.budget:
            self.oversize += 1
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._items and self.bytes + rec.nbytes > self.budget:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes
        self._items[key] = rec
        self.bytes += rec.nbytes
        return True

    def discard(self, predicate) -> int:
        """Drop entries whose key satisfies ``predicate``; returns how many."""
        keys = [k for k in self._items if predicate(k)]
        for k in keys:
            self.bytes -= self._items.pop(k).nbytes
        return len(keys)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"budget_bytes": self.budget, "bytes": self.bytes, "entries": len(self._items), "hits": self.hits,
                "misses": self.misses, "oversize": self.oversize}


def rotate_all(model, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotate pre-RoPE keys (L, H, P, D) for positions ``start..start+P-1``, in place, per rotary type.

    Layers that share a rotary type (all of them in most models; Gemma 3 has two) are rotated in one call
    of the model's own ``apply_rotary_pos_emb``, treating the layers as the batch.
    """
    from .kv import _layer_types, _rotary

    rotary, takes_type, apply = _rotary(model)
    L, _, P, _ = keys.shape
    positions = torch.arange(start, start + P, device=keys.device).unsqueeze(0)
    types = _layer_types(model) if takes_type else None
    groups: dict[Any, list[int]] = {}
    for layer in range(L):
        groups.setdefault(types[layer] if types else None, []).append(layer)
    for kind, layers in groups.items():
        cos, sin = rotary(keys, positions, kind) if takes_type else rotary(keys, positions)
        if len(layers) == L:
            keys.copy_(apply(keys, keys, cos, sin)[1])
        else:
            idx = torch.tensor(layers, device=keys.device)
            keys[idx] = apply(keys[idx], keys[idx], cos, sin)[1]
    return keys


class KVTiers:
    """Device and host LRUs in front of the payload on disk (see the module docstring)."""

    def __init__(self, *, device: torch.device, device_budget: int, host_budget: int):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.device_lru = ByteLRU(device_budget if self.cuda else 0)
        self.host_lru = ByteLRU(host_budget)
        self._lock = threading.RLock()
        self.last: dict[str, Any] = {}

    # -------------------------------------------------------------- lookup
    def fetch(self, key, load: Callable[[], Record]) -> tuple[Record, str]:
        """The record cached under ``key`` and the tier it came from (``device``, ``host`` or ``disk``).

        On a miss ``load()`` reads it from disk (and raises BlobError if it is damaged or does not fit the
        memory); the record is then kept in the host tier.
        """
        with self._lock:
            rec = self.device_lru.get(key)
            if rec is not None:
                return rec, "device"
            rec = self.host_lru.get(key)
            if rec is not None:
                return rec, "host"
        rec = load()
        with self._lock:
            self.host_lru.put(key, rec)
        return rec, "disk"

    def forget(self, predicate) -> None:
        """Drop cached entries whose key satisfies ``predicate`` (deleted chunks)."""
        with self._lock:
            self.device_lru.discard(predicate)
            self.host_lru.discard(predicate)

    def clear(self, tiers: Sequence[str] = ("device", "host")) -> None:
        with self._lock:
            if "device" in tiers:
                self.device_lru.clear()
            if "host" in tiers:
                self.host_lru.clear()

    def stats(self) -> dict[str, Any]:
        return {"device": self.device_lru.stats(), "host": self.host_lru.stats()}

    # -------------------------------------------------------------- assembly
    def assemble(self, model, frame: tuple[torch.Tensor, torch.Tensor] | None,
                 records: Sequence[tuple[Any, Record]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated for positions 0..P-1) and values (L, H, P, D) of the frame followed by ``records``.

        Args:
            frame: the frame's pre-RoPE keys and values (L, H, F, D) on the model's device, or None.
            records: ``(cache key, record)`` in prefix order, bodies on the host or the device.
        """
        t0 = time.perf_counter()
        dtype = next(model.parameters()).dtype
        bodies = self._to_device(records)
        t1 = time.perf_counter()
        first = records[0][1].header if records else None
        L = first["num_layers"] if first else frame[0].shape[0]
        H = first["num_kv_heads"] if first else frame[0].shape[1]
        D = first["head_dim"] if first else frame[0].shape[3]
        F = 0 if frame is None else int(frame[0].shape[2])
        P = F + sum(r.tokens for _, r in records)
        keys = torch.empty((L, H, P, D), dtype=dtype, device=self.device)
        values = torch.empty_like(keys)
        if F:
            keys[:, :, :F] = frame[0]
            values[:, :, :F] = frame[1]
        pos = F
        for (_, rec), body in zip(records, bodies):
            n = rec.tokens
            dequantize(rec.parts(body), rec.header["kv_dtype"], dtype, keys[:, :, pos: pos + n],
                       values[:, :, pos: pos + n])
            pos += n
        rotate_all(model, keys)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # honest step timings (and ready data)
        self.last = {"transfer_s": t1 - t0, "assemble_s": time.perf_counter() - t1, "tokens": P}
        return keys, values

    def _to_device(self, records: Sequence[tuple[Any, Record]]) -> list[torch.Tensor]:
        """Bodies on the model's device: one buffer, filled by asynchronous copies of those still on the host."""
        if not self.cuda:
            return [rec.body for _, rec in records]
        out: list[torch.Tensor | None] = [None] * len(records)
        pending = []  # (index, offset) of host bodies in the device buffer
        offset = 0
        for i, (_, rec) in enumerate(records):
            if rec.body.device.type == "cuda":
                out[i] = rec.body
            else:
                pending.append((i, offset))
                offset += rec.nbytes + (-rec.nbytes % 16)
        if pending:
            # one device buffer; each pinned host body is DMA-copied into its slice asynchronously (no host-side
            # staging copy), and the dequantisation kernels queue behind the copies on the same stream
            on_device = torch.empty(offset, dtype=torch.uint8, device=self.device)
            for i, off in pending:
                body = records[i][1].body
                on_device[off: off + body.numel()].copy_(body, non_blocking=body.is_pinned())
            for i, off in pending:
                key, rec = records[i]
                out[i] = on_device[off: off + rec.nbytes]
                self._keep_on_device(key, rec, out[i])
        return out

    def _keep_on_device(self, key, rec: Record, body: torch.Tensor) -> None:
        if self.device_lru.budget <= 0 or rec.nbytes > self.device_lru.budget:
            return
        try:
            kept = Record(rec.header, body.clone())
        except torch.OutOfMemoryError:
            with self._lock:
                self.device_lru.clear()
            torch.cuda.empty_cache()
            warnings.warn("out of device memory while caching KV on the device: the device tier was emptied and "
                          "this query uses the host path", TierWarning, stacklevel=4)
            return
        with self._lock:
            self.device_lru.put(key, kept)
