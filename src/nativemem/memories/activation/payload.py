"""The KV payload on disk: compressed per-chunk records appended to segment files, one contiguous read each.

How this works:

- **Record.** One chunk's payload is one record: ``MAGIC | header length | JSON header | padding | body``.
  The header names the layout (``kv_dtype``, tokens, layers, KV heads, head width), the model fingerprint,
  the frame digest, the body's length and its CRC-32. The body is a fixed sequence of aligned sections
  (:func:`sections`): the token ids (int32), then keys and values in the stored precision. Every section
  is a plain tensor in (layers, heads, tokens, width) order, so a body read from disk or copied to a device
  is sliced into views without parsing or copying.
- **Precisions** (KIVI-style grouping: keys per channel, values per token):

  ``float16`` / ``bfloat16`` / ``float32``: keys and values as they are.
  ``int8``: keys asymmetric per channel (uint8 codes, fp16 scale and minimum per layer, head and channel
  over the chunk's tokens, or over groups of at most ``key_group`` tokens, as the header says); values
  symmetric per token (int8 codes, fp16 scale per layer, head and token).
  ``int4``: the same grouping with 4-bit codes, two per byte (keys 0..15 asymmetric, values -7..7
  symmetric, stored +8).

  Keys are quantised per channel because pre-RoPE keys carry a few large fixed channels (one scale per
  token would waste the codes of every other channel on them); values have no such channels and are
  quantised per token. Dequantisation runs where the body is (on the GPU when injecting on one).
- **Segments.** Records are appended to ``segments/<writer>-<n>.kv`` files (a new file after
  ``SEGMENT_BYTES``). A group of records is written with one ``write`` and made durable with one ``fsync``
  (:meth:`SegmentStore.append`); only then does the index learn their locations, so an acknowledged chunk
  always has its bytes on disk, and a kill mid-group leaves only unreferenced bytes at a segment's tail.
  Each writer (process) appends to its own files, so writers sharing a folder never interleave.
  A read is one ``preadv`` of the whole record straight into the buffer that keeps it (pinned memory when
  it is headed for a GPU), then a CRC check: no page-fault-driven copy through a memory map.
- **Locations** are strings ``seg:<file>:<offset>:<length>`` kept in the chunk's index payload (field
  ``blob``); payloads written by older versions name a content-addressed blob instead (64 hex digits) and
  are read by the blob store.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .store import BlobError, _fsync_dir

__all__ = ["RECORD_FORMAT", "QUANTIZED", "Record", "sections", "pack", "unpack", "SegmentStore", "parse_location",
           "is_segment_location", "quantize", "dequantize"]

RECORD_FORMAT = "nativemem-kv-record/1"
MAGIC = b"NMKV"
ALIGN = 16
SEGMENT_BYTES = 1 << 30
QUANTIZED = ("int8", "int4")
_FLOAT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _align(n: int, to: int = ALIGN) -> int:
    return n + (-n % to)


def _groups(T: int, key_group: int) -> int:
    return -(-T // key_group) if key_group else 1


def sections(kv_dtype: str, L: int, H: int, T: int, D: int,
             key_group: int = 0) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Name, dtype and shape of each body section, in order (``key_group``: tokens per key scale, 0 = all)."""
    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = [("ids", torch.int32, (T,))]
    if kv_dtype in _FLOAT:
        dt = _FLOAT[kv_dtype]
        return out + [("k", dt, (L, H, T, D)), ("v", dt, (L, H, T, D))]
    if kv_dtype not in QUANTIZED:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}")
    width = D if kv_dtype == "int8" else D // 2
    G = _groups(T, key_group)
    return out + [("k", torch.uint8, (L, H, T, width)), ("k_scale", torch.float16, (L, H, G, D)),
                  ("k_min", torch.float16, (L, H, G, D)),
                  ("v", torch.int8 if kv_dtype == "int8" else torch.uint8, (L, H, T, width)),
                  ("v_scale", torch.float16, (L, H, T, 1))]


def _layout(kv_dtype: str, L: int, H: int, T: int, D: int,
            key_group: int = 0) -> tuple[list[tuple[str, torch.dtype, tuple, int, int]], int]:
    """Sections with their (offset, nbytes) in the body, and the body size."""
    out, offset = [], 0
    for name, dtype, shape in sections(kv_dtype, L, H, T, D, key_group):
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append((name, dtype, shape, offset, n))
        offset = _align(offset + n)
    return out, offset


# ---------------------------------------------------------------------------- quantisation
def quantize(keys: torch.Tensor, values: torch.Tensor, kv_dtype: str, key_group: int = 0) -> dict[str, torch.Tensor]:
    """Stored sections (without ids) of pre-RoPE keys and values (L, H, T, D), on their device.

    ``key_group``: at most this many tokens share one key scale and minimum per channel (KIVI's grouping;
    the chunk is split into ceil(T / key_group) groups of equal size); 0 = one per channel for the chunk.
    """
    if kv_dtype in _FLOAT:
        return {"k": keys.to(_FLOAT[kv_dtype]), "v": values.to(_FLOAT[kv_dtype])}
    levels = 255 if kv_dtype == "int8" else 15
    tiny = torch.finfo(torch.float16).tiny  # a smaller scale would round to 0 in fp16 (a constant channel)
    k = keys.float()
    L, H, T, D = k.shape
    G = _groups(T, key_group)
    g = -(-T // G)
    padded = torch.cat([k, k[:, :, -1:].expand(L, H, G * g - T, D)], dim=2) if G * g > T else k
    grouped = padded.view(L, H, G, g, D)
    kmin = grouped.amin(dim=3)
    kscale = (grouped.amax(dim=3) - kmin) / levels
    # round scales to fp16 first, so the codes are computed with the scales the reader will use
    kmin, kscale = kmin.half(), kscale.half().clamp_min(tiny)
    kq = torch.round((k - _per_token(kmin.float(), T)) / _per_token(kscale.float(), T)).clamp_(0, levels)
    kq = kq.to(torch.uint8)
    v = values.float()
    vmax = 127 if kv_dtype == "int8" else 7
    vscale = (v.abs().amax(dim=-1, keepdim=True) / vmax).half().clamp_min(tiny)
    vq = torch.round(v / vscale.float()).clamp_(-vmax, vmax)
    if kv_dtype == "int8":
        return {"k": kq, "k_scale": kscale, "k_min": kmin, "v": vq.to(torch.int8), "v_scale": vscale}
    vq = (vq + 8).to(torch.uint8)
    return {"k": _pack4(kq), "k_scale": kscale, "k_min": kmin, "v": _pack4(vq), "v_scale": vscale}


def _per_token(x: torch.Tensor, T: int) -> torch.Tensor:
    """Per-group key scales (L, H, G, D) spread over the T tokens of the groups (G = 1: broadcast)."""
    G = x.shape[2]
    if G == 1:
        return x
    return x.repeat_interleave(-(-T // G), dim=2)[:, :, :T]


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (even index in the high nibble)."""
    return (q[..., 0::2] << 4) | q[..., 1::2]


def _unpack4(b: torch.Tensor) -> torch.Tensor:
    out = torch.empty((*b.shape[:-1], b.shape[-1] * 2), dtype=torch.uint8, device=b.device)
    out[..., 0::2] = b >> 4
    out[..., 1::2] = b & 0xF
    return out


def dequantize(parts: dict[str, torch.Tensor], kv_dtype: str, dtype: torch.dtype,
               out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (L, H, T, D) in ``dtype`` from stored sections; written into ``out_k``/``out_v`` if given."""
    if kv_dtype in _FLOAT:
        k, v = parts["k"], parts["v"]
    else:
        kq, vq = parts["k"], parts["v"]
        if kv_dtype == "int4":
            kq, vq = _unpack4(kq), _unpack4(vq)
            vq = vq.to(torch.int8) - 8
        # float32 arithmetic (a bf16 product of code and scale would add its own rounding to the codes')
        T = kq.shape[2]
        k = torch.addcmul(_per_token(parts["k_min"].float(), T), kq.float(), _per_token(parts["k_scale"].float(), T))
        v = vq.float() * parts["v_scale"].float()
    if out_k is None:
        return k.to(dtype), v.to(dtype)
    out_k.copy_(k)
    out_v.copy_(v)
    return out_k, out_v


# ---------------------------------------------------------------------------- records
@dataclass
class Record:
    """One chunk's payload: header fields and its body (a uint8 tensor on any device)."""

    header: dict[str, Any]
    body: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def nbytes(self) -> int:
        return int(self.body.numel())

    def parts(self, body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Views of the sections in ``body`` (default: this record's own)."""
        h = self.header
        body = self.body if body is None else body
        layout, _ = _layout(h["kv_dtype"], h["num_layers"], h["num_kv_heads"], h["tokens"], h["head_dim"],
                            int(h.get("key_group", 0)))
        return {name: body[off: off + n].view(dtype).view(shape) for name, dtype, shape, off, n in layout}

    def ids(self) -> list[int]:
        return self.parts()["ids"].tolist()


def pack(ids: list[int], stored: dict[str, torch.Tensor], *, kv_dtype: str, key_group: int = 0) -> torch.Tensor:
    """The body of one record as a uint8 tensor on the sections' device (ids are added here)."""
    any_part = stored["k"]
    L, H, T = any_part.shape[:3]
    D = int(stored["k_scale"].shape[-1]) if "k_scale" in stored else int(any_part.shape[3])
    layout, size = _layout(kv_dtype, L, H, T, D, key_group)
    body = torch.zeros(size, dtype=torch.uint8, device=any_part.device)
    full = {"ids": torch.tensor(ids, dtype=torch.int32, device=any_part.device), **stored}
    for name, dtype, shape, off, n in layout:
        x = full[name]
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            raise ValueError(f"section {name}: got {tuple(x.shape)} {x.dtype}, expected {shape} {dtype}")
        body[off: off + n] = x.contiguous().view(-1).view(torch.uint8)
    return body


def _frame(header: dict[str, Any], body: bytes | memoryview) -> bytes:
    """Magic, header length and header (padded): what goes before the body."""
    head = json.dumps({**header, "format": RECORD_FORMAT, "body_bytes": len(body),
                       "crc32": zlib.crc32(body)}, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 8) % ALIGN)
    return MAGIC + len(head).to_bytes(4, "little") + head


def unpack(view: memoryview, where: str) -> tuple[dict[str, Any], memoryview]:
    """Header and body view of one record (``view`` is the whole record); raises BlobError if it is damaged
    (magic, header, length or CRC). The body starts at a multiple of 16 bytes from the record's start."""
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise BlobError(f"payload record {where} is damaged (no record header)")
    n = int.from_bytes(view[4:8], "little")
    try:
        header = json.loads(bytes(view[8: 8 + n]))
    except ValueError:
        raise BlobError(f"payload record {where} is damaged (unreadable header)") from None
    if header.get("format") != RECORD_FORMAT:
        raise BlobError(f"payload record {where} has format {header.get('format')!r}, expected {RECORD_FORMAT!r}")
    body = view[8 + n: 8 + n + int(header.get("body_bytes", -1))]
    if len(body) != header.get("body_bytes") or zlib.crc32(body) != header.get("crc32"):
        raise BlobError(f"payload record {where} is corrupted (its CRC-32 or length does not match)")
    return header, body


def is_segment_location(location: str) -> bool:
    return isinstance(location, str) and location.startswith("seg:")


def parse_location(location: str) -> tuple[str, int, int]:
    try:
        _, name, offset, length = location.split(":")
        return name, int(offset), int(length)
    except ValueError:
        raise BlobError(f"malformed payload location {location!r}") from None


# ---------------------------------------------------------------------------- segment files
class SegmentStore:
    """Append-only segment files of payload records under ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._writer = uuid.uuid4().hex[:8]
        self._seq = 0
        self._active: Path | None = None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        if "/" in name or "\\" in name or name.startswith("."):
            raise BlobError(f"malformed segment name {name!r}")
        return self.root / name

    # -------------------------------------------------------------- write
    def append(self, records: list[tuple[dict[str, Any], bytes | memoryview]]) -> list[str]:
        """Append records (header, body) with one write and one fsync; returns their locations."""
        if not records:
            return []
        frames = [(_frame(h, b), b) for h, b in records]
        total = sum(len(f) + len(b) for f, b in frames)
        with self._lock:
            path = self._target(total)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                offset = os.fstat(fd).st_size
                locations, at = [], offset
                for f, b in frames:  # written as they are (no copy into one buffer), made durable together
                    locations.append(f"seg:{path.name}:{at}:{len(f) + len(b)}")
                    _write_all(fd, f)
                    _write_all(fd, b)
                    at += len(f) + len(b)
                os.fsync(fd)
            finally:
                os.close(fd)
            if offset == 0:
                _fsync_dir(self.root)  # a new file's directory entry is durable too
        return locations

    def _target(self, incoming: int) -> Path:
        if self._active is not None and self._active.exists() \
                and self._active.stat().st_size + incoming <= SEGMENT_BYTES:
            return self._active
        self._seq += 1
        self._active = self.root / f"{self._writer}-{self._seq:06d}.kv"
        return self._active

    # -------------------------------------------------------------- read
    def read(self, location: str, *, pin: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
        """Header and body (a uint8 tensor, pinned if ``pin``) of one record, read with one ``preadv`` and
        CRC-checked; raises BlobError if the segment is missing or the record is damaged."""
        name, offset, length = parse_location(location)
        if offset < 0 or length < 8:
            raise BlobError(f"malformed payload location {location!r}")
        fd = self._fd(name)
        buf = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(buf.numpy())
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got) if hasattr(os, "preadv") else \
                _pread_into(fd, view[got:], offset + got)
            if n <= 0:
                raise BlobError(f"payload record {location} lies beyond the end of its segment (truncated file?)")
            got += n
        header, body = unpack(view, location)
        start = 8 + int.from_bytes(view[4:8], "little")  # where unpack found the body
        return header, buf[start: start + len(body)]

    def view(self, location: str) -> tuple[dict[str, Any], memoryview]:
        """Header and body bytes of one record (see :meth:`read`)."""
        header, body = self.read(location)
        return header, memoryview(body.numpy())

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            path = self.path(name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise BlobError(f"payload segment {path} is missing") from None
            self._fds[name] = fd
            return fd

    # -------------------------------------------------------------- maintenance
    def files(self) -> dict[str, int]:
        """Segment name -> size in bytes."""
        return {p.name: p.stat().st_size for p in sorted(self.root.glob("*.kv"))}

    def settled(self, name: str) -> bool:
        """Whether ``gc()`` may remove this file when none of its records is referenced (always: a folder has one
        writer, whose adds are finished or rolled back by the time it collects)."""
        return True

    def delete(self, name: str) -> None:
        with self._lock:
            self._close_fd(name)
            if self._active is not None and self._active.name == name:
                self._active = None
            self.path(name).unlink(missing_ok=True)

    def drop_page_cache(self) -> None:
        """Advise the OS to drop the segments' pages (written and fsynced, so clean): the next read goes to the
        disk. Without ``posix_fadvise`` (not POSIX) this does nothing."""
        with self._lock:
            for path in self.root.glob("*.kv"):
                if hasattr(os, "posix_fadvise"):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)

    def _close_fd(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for name in list(self._fds):
                self._close_fd(name)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
