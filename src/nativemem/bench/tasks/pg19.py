"""PG-19 whole-book online language modelling: window-only vs side-FFN TTT vs LoRA TTT.

Protocol (as Locas, arXiv 2602.05085, and Temp-LoRA evaluate PG-19): each book is cut between the Project
Gutenberg ``*** START OF`` and ``*** END OF`` markers, tokenised with a BOS first, and streamed in windows of
``window`` new tokens behind ``context`` tokens of preceding text. Every window is scored (summed NLL of its new tokens)
*before* the arm trains on it; arms then train ``steps`` optimiser steps on it with the same loop
(:func:`nativemem.memories.side_ffn.stream`):

- ``window_only``: no training (the truncated-context baseline);
- ``side_ffn``: a fresh side-FFN memory per book, memorized from the first window, trained by TTT;
- ``lora``: fresh LoRA adapters (peft, all linear layers) per book, trained by the same loop.

Reported per arm: cumulative perplexity exp(Σ NLL / Σ tokens) (``ppl``, pooled over books and per
book, also at token checkpoints), per-token NLL with a bootstrap interval over windows, extra
parameters (absolute and % of the model), CPU and wall time and both relative to ``window_only``,
and paired per-window comparisons (Wilcoxon + paired bootstrap of the NLL difference). Files in
``out``: ``results.json`` (the common schema plus a ``books`` block), ``items.jsonl`` (one line per
book × arm × window), ``pg19_ppl.png`` (cumulative ppl vs tokens read) and ``pg19_report.md``.

Run it with :func:`run_pg19` (the QA runner cannot: this task has no questions).
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ...errors import DataError, InputError
from ...text import check_text
from . import data_root

__all__ = ["Book", "PG19Options", "cut_gutenberg", "load_books", "book_ids", "run_pg19", "STREAM_ARMS"]

VERSION = "1"
DEFAULT_PATH = "pg19"
STREAM_ARMS = ("window_only", "side_ffn", "lora")

_START = re.compile(r"\*\*\*\s*START OF[^*]*\*\*\*", re.IGNORECASE)
_END = re.compile(r"\*\*\*\s*END OF[^*]*\*\*\*", re.IGNORECASE)


def cut_gutenberg(text: str) -> tuple[str, bool]:
    """The text between the Gutenberg START and END markers, and whether both were found."""
    start = _START.search(text)
    end = _END.search(text, start.end()) if start else None
    if start is None or end is None:
        return text.strip(), False
    return text[start.end():end.start()].strip(), True


@dataclass(frozen=True)
class Book:
    """One book: id (file stem), title (from the metadata CSV when present), text, and whether it was cut."""

    id: str
    title: str
    text: str
    cut: bool


def load_books(path: str | Path) -> list[Book]:
    """Books from a folder of ``*.txt`` files (or one file), with titles from ``*metadata*.csv`` if present.

    Raises:
        DataError: no text files, or a file that is not readable text.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: PG-19 data not found (pass data=PATH: a folder of .txt books or one .txt file)")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt books in this folder")
    titles: dict[str, str] = {}
    for meta in sorted(path.glob("*metadata*.csv")) if path.is_dir() else []:
        with open(meta, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("book_id"):
                    titles[row["book_id"].strip()] = (row.get("short_book_title") or "").strip()
    books = []
    for file in files:
        try:
            raw = check_text(file.read_bytes(), what=str(file))
        except InputError as e:
            raise DataError(str(e)) from None
        text, cut = cut_gutenberg(raw)
        if not text.strip():
            raise DataError(f"{file}: nothing between the Gutenberg START and END markers")
        books.append(Book(file.stem, titles.get(file.stem, file.stem), text, cut))
    return books


@dataclass
class PG19Options:
    """Options of a PG-19 run (defaults sized for a laptop CPU and SmolLM2-135M)."""

    window: int = field(default=512, metadata={"help": "new tokens per window"})
    context: int = field(default=512, metadata={"help": "preceding tokens seen before each window"})
    steps: int = field(default=1, metadata={"help": "optimiser steps per window (side_ffn and lora alike)"})
    max_tokens: int | None = field(default=None, metadata={"help": "score only the first N tokens of each book"})
    width: int = field(default=12, metadata={"help": "side_ffn neurons per layer"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "side_ffn layers (None: all)"})
    init: str = field(default="highest", metadata={"help": "side_ffn memorize strategy"})
    lr: float = field(default=1e-2, metadata={"help": "side_ffn learning rate"})
    loss: str = field(default="ntp", metadata={"help": "ntp | sd | mix (both trained arms)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: = rank)"})
    lora_lr: float = field(default=1e-3, metadata={"help": "LoRA learning rate"})
    lora_targets: str = field(default="all-linear", metadata={"help": "peft target_modules"})
    context_grad: bool = field(default=False, metadata={"help": "backpropagate through the context too"})
    checkpoints: tuple[int, ...] = (4096, 8192, 16384, 32768, 50000, 65536, 100000)
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads for the run (None: unchanged)"})
    save_dir: str | None = field(default=None, metadata={
        "help": "save each book's trained side_ffn memory and LoRA adapters here (e.g. for the mmlu drift run)"})

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PG19Options:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown pg19 options {unknown}; known: {sorted(names)}")
        opts = cls(**options)
        if opts.layers is not None:
            opts.layers = tuple(opts.layers)
        opts.checkpoints = tuple(sorted(opts.checkpoints))
        if opts.max_tokens is not None and opts.max_tokens < opts.window:
            raise InputError(f"max_tokens ({opts.max_tokens}) is shorter than one window ({opts.window})")
        return opts


def _stream_arm(arm: str, lm, ids, opts: PG19Options, seed: int, progress, save: Path | None = None
                ) -> tuple[Any, int]:
    """Stream one book's ids through ``arm``: one loop and budget (windows, context, steps) for the three, only what
    learns differs. Returns (StreamResult, extra parameters) and saves what the arm learnt to ``save``."""
    from ...memories.side_ffn import SideFFNConfig, SideFFNMemory, StreamOptions, stream
    from ..lora import LoRABaseline, save_lora_state

    common = StreamOptions(window=opts.window, context=opts.context, steps=opts.steps, loss=opts.loss,
                           context_grad=opts.context_grad)
    if arm == "window_only":
        return stream(lm.model, ids, None, common, max_context=lm.max_context, progress=progress), 0
    if arm == "side_ffn":
        mem = SideFFNMemory(lm, SideFFNConfig(width=opts.width, layers=opts.layers, init=opts.init, lr=opts.lr,
                                              window=opts.window, context=opts.context, seed=seed,
                                              memorize_tokens=opts.window + 1))
        mem.memorize(ids[: opts.window + 1])  # the first window (values zero: it is still scored unchanged)
        result = stream(lm.model, ids, mem, replace(common, lr=opts.lr), max_context=lm.max_context,
                        progress=progress)
        mem.record(result, metadata={"source": "pg19"})
        if save is not None:
            mem.save(save)
        return result, mem.num_parameters
    with LoRABaseline(lm, rank=opts.lora_rank, alpha=opts.lora_alpha, target_modules=opts.lora_targets,
                      seed=seed) as lora:
        result = lora.train_stream(ids, replace(common, lr=opts.lora_lr), progress=progress)
        if save is not None:
            save_lora_state(lora, save)
        return result, lora.num_parameters


def run_pg19(lm, *, arms: Sequence[str] = STREAM_ARMS, out: str | Path, data: str | Path | None = None,
             limit: int | None = None, seed: int = 0, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Run the PG-19 streaming benchmark and write its files to ``out``.

    Args:
        lm: the LanguageModel.
        arms: any of ``window_only``, ``side_ffn``, ``lora`` (run in this order on every book).
        out: output folder.
        data: a folder of ``.txt`` books or one file (default: the shared PG-19 folder).
        limit: the first N books (sorted by id).
        seed: seed of memorize / LoRA initialisation and of the bootstrap.
        progress: show a progress bar per book and arm.
        **options: :class:`PG19Options` fields (window, context, steps, max_tokens, width, lr, ...).

    Returns:
        The results mapping (also written to ``out/results.json``).

    Raises:
        InputError: unknown arm or option, or a book shorter than one window.
        DataError: missing or unreadable data.
    """
    import torch
    from tqdm.auto import tqdm

    from ..runner import peak_rss_bytes

    arms = [arms] if isinstance(arms, str) else list(dict.fromkeys(arms))
    bad = [a for a in arms if a not in STREAM_ARMS]
    if bad or not arms:
        raise InputError(f"unknown pg19 arms {bad}; use {', '.join(STREAM_ARMS)}")
    opts = PG19Options.from_options(options)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of books, got {limit}")
    path = Path(data) if data is not None else data_root() / DEFAULT_PATH
    books = load_books(path)[:limit]
    base_params = sum(p.numel() for p in lm.model.parameters())
    threads_before = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    records, book_blocks = [], []
    per_arm: dict[str, dict[str, Any]] = {a: {"nll": 0.0, "tokens": 0, "cpu": 0.0, "wall": 0.0, "steps": 0,
                                              "params": [], "window_nll": [], "stopped": []} for a in arms}
    try:
        for book in books:
            ids = book_ids(lm, book, opts.max_tokens)
            if len(ids) - 1 < opts.window:
                raise InputError(f"book {book.id} has {len(ids) - 1} tokens, shorter than one window of {opts.window}")
            block = {"id": book.id, "title": book.title, "cut_at_markers": book.cut, "tokens": len(ids) - 1,
                     "arms": {}}
            for arm in arms:
                bar = tqdm(total=math.ceil((len(ids) - 1) / opts.window), desc=f"pg19/{book.id}/{arm}",
                           disable=not progress, leave=False)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                save = Path(opts.save_dir) / f"{arm}-{book.id}" if opts.save_dir and arm != "window_only" else None
                result, extra = _stream_arm(arm, lm, ids, opts, seed, lambda rec, n: bar.update(1), save)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                bar.close()
                acc = per_arm[arm]
                acc["nll"] += result.nll_sum
                acc["tokens"] += result.tokens
                acc["cpu"] += cpu
                acc["wall"] += wall
                acc["steps"] += result.steps
                acc["params"].append(extra)
                acc["window_nll"] += [(book.id, w.index, w.nll_sum / w.tokens) for w in result.windows]
                if result.stopped:
                    acc["stopped"].append(f"{book.id}: {result.stop_reason}")
                block["arms"][arm] = {
                    "ppl": result.ppl, "tokens": result.tokens, "windows": len(result.windows),
                    "ppl_at": {str(c): result.ppl_at(c) for c in opts.checkpoints if result.ppl_at(c) is not None},
                    "curve": result.cumulative(), "extra_params": extra, "extra_params_pct": 100.0 * extra / base_params,
                    "cpu_s": cpu, "wall_s": wall, "steps": result.steps, "stopped": result.stopped,
                    "stop_reason": result.stop_reason}
                records += [{"book": book.id, "arm": arm, **w.to_dict()} for w in result.windows]
            _relative_to_window_only(block["arms"])
            book_blocks.append(block)
    finally:
        torch.set_num_threads(threads_before)
    results = _results(lm, out, records, arms, opts, path, limit, seed, base_params, book_blocks, per_arm,
                       peak_rss_bytes())
    _plot(book_blocks, arms, Path(out) / "pg19_ppl.png")
    (Path(out) / "pg19_report.md").write_text(summary_markdown(results), encoding="utf-8")
    return results


def book_ids(lm, book: Book, max_tokens: int | None = None) -> list[int]:
    """The book's token ids with a BOS first (when the tokenizer has one), at most ``max_tokens`` after it."""
    ids = lm.tokenizer(book.text, add_special_tokens=False)["input_ids"]
    if lm.tokenizer.bos_token_id is not None:
        ids = [lm.tokenizer.bos_token_id, *ids]
    return ids[: max_tokens + 1] if max_tokens is not None else ids


def _relative_to_window_only(arms: dict[str, dict[str, Any]]) -> None:
    ref = arms.get("window_only")
    for block in arms.values():
        block["time_rel_cpu"] = block["cpu_s"] / ref["cpu_s"] if ref and ref["cpu_s"] else None
        block["time_rel_wall"] = block["wall_s"] / ref["wall_s"] if ref and ref["wall_s"] else None
        block["below_window_only"] = block["ppl"] < ref["ppl"] if ref else None


def _results(lm, out, records, arms, opts, path, limit, seed, base_params, books, per_arm,
             peak_rss) -> dict[str, Any]:
    from ..results import save_run
    from ..stats import bootstrap_mean_ci, paired_comparisons

    ref = per_arm.get("window_only")
    arm_blocks = {}
    for arm in arms:
        acc = per_arm[arm]
        values = [v for _, _, v in acc["window_nll"]]
        nll = acc["nll"] / acc["tokens"] if acc["tokens"] else math.nan
        ci = bootstrap_mean_ci(values, seed=seed) if values else None
        extra = max(acc["params"]) if acc["params"] else 0
        arm_blocks[arm] = {
            "n": len(values), "scored": len(values), "skipped": 0, "skipped_reasons": {},
            "metrics": {"ppl": math.exp(nll), "nll": nll},
            "ci95": {"nll": list(ci) if ci else None, "ppl": [math.exp(c) for c in ci] if ci else None},
            "cost": {"cpu_s": acc["cpu"], "wall_s": acc["wall"], "steps": acc["steps"],
                     "time_rel_cpu": acc["cpu"] / ref["cpu"] if ref and ref["cpu"] else None,
                     "time_rel_wall": acc["wall"] / ref["wall"] if ref and ref["wall"] else None,
                     "extra_params": extra, "extra_params_pct": 100.0 * extra / base_params,
                     "bytes_stored": 4 * extra, "peak_rss_bytes": peak_rss},
            "books_below_window_only": sum(1 for b in books if b["arms"][arm].get("below_window_only")),
            "stopped": acc["stopped"],
        }
    windows = {a: {(bk, w): {"nll": v} for bk, w, v in per_arm[a]["window_nll"]} for a in arms}
    comparisons = paired_comparisons(windows, binary=lambda m: False, seed=seed)
    config = {"arms": list(arms), "limit": limit, "data": str(Path(path).resolve()), "books": len(books),
              "base_params": base_params, "max_context": lm.max_context, **asdict(opts),
              "protocol": "score each window before training on it; cumulative ppl = exp(sum NLL / tokens)"}
    return save_run(out, lm, task="pg19", task_version=VERSION, n=sum(b["tokens"] for b in books), seed=seed,
                    config=config, arms=arm_blocks, comparisons=comparisons, records=records,
                    higher_is_better={"ppl": False, "nll": False}, books=books)


def _plot(books: list[dict[str, Any]], arms: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(books), figsize=(4.2 * len(books), 3.4), squeeze=False)
    for ax, book in zip(axes[0], books):
        for i, arm in enumerate(arms):
            curve = book["arms"][arm]["curve"]
            ax.plot([t for t, _ in curve], [p for _, p in curve], label=arm, color=f"C{i}")
        ax.set_title(f"{book['id']}: {book['title'][:40]}", fontsize=8)
        ax.set_xlabel("tokens read")
        ax.set_ylabel("cumulative perplexity")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(results: dict[str, Any]) -> str:
    """A Markdown summary: per book and pooled ppl, extra parameters and relative time per arm."""
    arms = results["config"]["arms"]
    lines = [f"# PG-19 online language modelling · {results['model_name']}", "",
             f"window {results['config']['window']} new tokens, context {results['config']['context']}, "
             f"{results['config']['steps']} step(s) per window; every window scored before training on it.", "",
             "| book | tokens | " + " | ".join(f"{a} ppl" for a in arms) + " |",
             "|---|---|" + "---|" * len(arms)]
    for b in results["books"]:
        lines.append(f"| {b['id']} | {b['tokens']} | " + " | ".join(f"{b['arms'][a]['ppl']:.3f}" for a in arms) + " |")
    pooled = " | ".join(f"{results['arms'][a]['metrics']['ppl']:.3f}" for a in arms)
    lines += [f"| all (pooled) | {results['n']} | {pooled} |", "",
              "| arm | extra params | % of model | CPU s | time vs window_only (CPU) | (wall) | books below "
              "window_only |", "|---|---|---|---|---|---|---|"]
    for a in arms:
        c = results["arms"][a]["cost"]
        rel = f"{c['time_rel_cpu']:.2f}×" if c["time_rel_cpu"] is not None else "–"
        relw = f"{c['time_rel_wall']:.2f}×" if c["time_rel_wall"] is not None else "–"
        lines.append(f"| {a} | {c['extra_params']:,} | {c['extra_params_pct']:.3f}% | {c['cpu_s']:.0f} | {rel} | "
                     f"{relw} | {results['arms'][a]['books_below_window_only']}/{len(results['books'])} |")
    lines += ["", "| a | b | paired windows | mean NLL diff (a−b, nats/token) | 95% CI | Wilcoxon p |",
              "|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        ci = c.get("ci95") or [math.nan, math.nan]
        lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['diff']:.4f} | [{ci[0]:.4f}, {ci[1]:.4f}] | "
                     f"{c['p_value']:.3g} |")
    return "\n".join(lines) + "\n"
