"""Needle in a haystack: a synthetic fact hidden at a chosen depth of a long essay haystack.

Haystack: the ``*.txt`` essays of a folder (default ``haystack/`` under the data root), concatenated in
file-name order and cut into sentence-aware filler chunks of at most ``chunk_chars`` characters (ids
``h:<i>``). One item per (length, depth) cell:

- ``length`` is nominal tokens (``chars_per_token`` characters each; the model's real count is what
  the ``long_context`` arm's overflow check uses): the haystack is the first filler chunks covering it;
- ``depth`` in [0, 1] picks the chunk (and the sentence in it) that gets the needle
  "The secret code for the <city> vault is <CODE>."; that chunk becomes ``n:<item id>`` (the gold chunk);
- the question asks for the code; the answer is the 6-character code (scored by ``contains`` = recall).

Filler chunks are shared between items, so the run's pool is the longest haystack plus one needle chunk
per item. ``retrieval_scope = "source"``: retrieval arms that honour it search only the item's own
haystack. :func:`needle_table` and :func:`needle_heatmap` break recall down by length x depth.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from ...text import chunk_text, split_sentences
from . import Chunk, QAItem, Task, TaskData, register_task

__all__ = ["NeedleTask", "needle_table", "needle_heatmap", "DEFAULT_LENGTHS", "DEFAULT_DEPTHS"]

DEFAULT_LENGTHS = (1000, 2000, 4000, 8000, 16000, 32000, 64000)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CITIES = ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Lima", "Dakar", "Riga", "Osaka",
          "Tunis", "Bergen", "Cusco", "Malmo", "Porto", "Accra", "Bogota", "Krakow", "Ghent", "Tallinn", "Zagreb",
          "Hobart", "Cork", "Leeds", "Turku", "Split", "Bilbao", "Graz", "Lyon")


@register_task("needle")
class NeedleTask(Task):
    """Needle-in-a-haystack recall by haystack length x needle depth.

    Args:
        data: folder of ``.txt`` essays (default ``haystack/`` under the data root).
        lengths: haystack lengths in nominal tokens.
        depths: needle depths in [0, 1] (0 = start, 1 = end).
        chunk_chars: maximum characters of a filler chunk.
        chars_per_token: characters per nominal token.
        needle_seed: seed of the needles (city and code per cell).
    """

    version = "1"
    default_path = "haystack"
    retrieval_scope = "source"

    def __init__(self, data=None, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
                 depths: Sequence[float] = DEFAULT_DEPTHS, chunk_chars: int = 1000, chars_per_token: float = 4.0,
                 needle_seed: int = 0) -> None:
        super().__init__(data)
        self.lengths = tuple(int(x) for x in _as_list(lengths))
        self.depths = tuple(float(x) for x in _as_list(depths))
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise InputError(f"lengths must be positive token counts, got {lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise InputError(f"depths must lie in [0, 1], got {depths!r}")
        if chunk_chars < 100 or chars_per_token <= 0:
            raise InputError("chunk_chars must be >= 100 and chars_per_token > 0")
        self.chunk_chars = int(chunk_chars)
        self.chars_per_token = float(chars_per_token)
        self.seed = int(needle_seed)

    def options(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "chunk_chars": self.chunk_chars,
                "chars_per_token": self.chars_per_token, "needle_seed": self.seed}

    def load(self, path: Path) -> TaskData:
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: no .txt essays found for the needle haystack")
        texts = []
        for f in files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{f}: cannot read as UTF-8 text ({e})") from None
        filler = chunk_text("\n\n".join(texts), self.chunk_chars, len)
        chunks = {f"h:{i}": Chunk(f"h:{i}", t, "", "haystack") for i, t in enumerate(filler)}
        starts, total = [], 0
        for t in filler:
            starts.append(total)
            total += len(t) + 1
        self._filler_ids = list(chunks)
        items = []
        for length in self.lengths:
            need = length * self.chars_per_token
            if need > total:
                raise DataError(f"{path}: the haystack has about {int(total / self.chars_per_token)} tokens; "
                                f"length {length} does not fit (pass smaller --lengths or more essays)")
            m = max(1, next((i + 1 for i, s in enumerate(starts) if s + len(filler[i]) >= need), len(filler)))
            for depth in self.depths:
                item_id = f"L{length}-d{round(depth * 100)}"
                rng = random.Random(f"{self.seed}:{item_id}")
                city = rng.choice(CITIES)
                code = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(6))
                needle = f"The secret code for the {city} vault is {code}."
                j = round(depth * (m - 1))
                sentences = split_sentences(filler[j])
                at = 0 if depth == 0.0 else len(sentences) if depth == 1.0 else len(sentences) // 2
                nid = f"n:{item_id}"
                chunks[nid] = Chunk(nid, " ".join([*sentences[:at], needle, *sentences[at:]]), "", "haystack")
                source = tuple(nid if i == j else f"h:{i}" for i in range(m))
                items.append(QAItem(item_id, f"What is the secret code for the {city} vault?", (code,), (nid,),
                                    source, {"length": length, "depth": depth, "city": city,
                                             "haystack_chars": sum(len(chunks[c].text) for c in source)}))
        return TaskData(tuple(items), chunks)

    def fit_texts(self, pool: Sequence[Chunk]) -> list[str]:
        """Filler chunks beyond every haystack of the run (never shown to the model as context)."""
        chunks = self.data.chunks  # loads the haystack (and _filler_ids) if needed
        used = {c.id for c in pool}
        return [chunks[c].text for c in self._filler_ids if c not in used]


def _as_list(value) -> list:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return list(value)


def needle_table(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Recall (``contains``) per arm: overall, and by length x depth, from a run's ``items.jsonl``."""
    from ..results import read_items

    table: dict[str, dict[str, Any]] = {}
    for rec in read_items(folder):
        arm = table.setdefault(rec["arm"], {"cells": {}, "skipped": 0})
        if rec.get("skipped"):
            arm["skipped"] += 1
            continue
        key = (int(rec["meta"]["length"]), float(rec["meta"]["depth"]))
        arm["cells"].setdefault(key, []).append(float(rec["metrics"]["contains"]))
    for arm in table.values():
        values = [v for cell in arm["cells"].values() for v in cell]
        arm["recall"] = sum(values) / len(values) if values else None
        arm["n"] = len(values)
        arm["cells"] = {k: sum(v) / len(v) for k, v in sorted(arm["cells"].items())}
    return table


def needle_heatmap(folder: str | Path, out: str | Path | None = None) -> str:
    """Write ``needle_<arm>.png`` heatmaps (length x depth recall) and return a Markdown summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    table = needle_table(folder)
    lines = ["| arm | recall | n | skipped |", "|---|---|---|---|"]
    for name, arm in table.items():
        recall = "n/a" if arm["recall"] is None else f"{arm['recall']:.3f}"
        lines.append(f"| {name} | {recall} | {arm['n']} | {arm['skipped']} |")
        lengths = sorted({k[0] for k in arm["cells"]})
        depths = sorted({k[1] for k in arm["cells"]})
        if not lengths:
            continue
        grid = [[arm["cells"].get((ln, d), math.nan) for ln in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1 + 0.9 * len(lengths), 1 + 0.6 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{ln // 1000}k" if ln >= 1000 else str(ln) for ln in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("haystack length (nominal tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle recall: {name}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"needle_{name}.png", dpi=100)
        plt.close(fig)
    (out / "needle.json").write_text(json.dumps(
        {a: {**t, "cells": {f"{k[0]}@{k[1]}": v for k, v in t["cells"].items()}} for a, t in table.items()},
        indent=2, sort_keys=True))
    return "\n".join(lines)
