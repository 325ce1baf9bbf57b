"""CLI commands around activation memory: `search`, `chat`, `fit`, and the `needle` / `scifact` benchmarks.

They parse input, call the Python API and print; no model logic here. :func:`register` adds them to the
main app (``nativemem.cli.main``).
"""

# no `from __future__ import annotations`: typer reads the option annotations at registration
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, console, handle_errors, load, split_list

MemoryOpt = Annotated[Path, typer.Option("--memory", help="memory folder")]
UserOpt = Annotated[str | None, typer.Option("--user", help="user id whose memories are used")]


def read_pairs(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(question, passage) pairs and unanswerable questions from a JSON list or JSON lines of
    ``{"question", "passage"}`` (``passage`` null or missing: a question nothing answers)."""
    import json

    from ..errors import DataError

    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the pairs file ({e})") from None
    try:
        rows = json.loads(body) if body.lstrip().startswith("[") else [json.loads(l) for l in body.splitlines()
                                                                         if l.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON or JSON lines ({e.msg}, line {e.lineno})") from None
    pairs, unanswerable = [], []
    for i, row in enumerate(rows):
        question = row.get("question") if isinstance(row, dict) else None
        passage = row.get("passage") if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip() or not isinstance(passage, (str, type(None))):
            raise DataError(f"{path}: entry {i} should be {{\"question\": text, \"passage\": text or null}}")
        if passage is None or not passage.strip():
            unanswerable.append(question)
        else:
            pairs.append((question, passage))
    return pairs, unanswerable


def _open(memory: Path, lm):
    import nativemem as nm

    from ..errors import InputError

    if not (memory / "memory_config.json").is_file():
        raise InputError(f"{memory} is not a memory folder (create one with `nativemem add ... --memory DIR`)")
    return nm.open_memory(memory, lm)

@handle_errors
def search(query: Annotated[str, typer.Argument(help="what to look for")], memory: MemoryOpt,
           user: UserOpt = None, k: Annotated[int, typer.Option("-k", "--k", min=1, help="results")] = 4,
           variant: Annotated[str | None, typer.Option(help="pooled | tokens | hybrid | hybrid_tokens | bm25 "
                                                       "(default: the memory's)")] = None,
           model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Search a memory folder by the model's own states (only --user's memories)."""
    from rich.table import Table

    from ..text import check_text

    query = check_text(query, what="query")
    lm = load(model, dtype, device)
    mem = _open(memory, lm)
    kwargs = {"variant": variant} if variant else {}
    hits = mem.search(query, k=k, user_id=user, **kwargs)
    if not hits:
        console.print("no memories found" + (f" for user {user!r}" if user else ""))
        return
    table = Table(title=f"{len(hits)} result(s) for {query!r}")
    for col in ("relevance", "score", "id", "source", "text"):
        table.add_column(col)
    for h in hits:
        text = h.text if len(h.text) <= 160 else h.text[:157] + "..."
        table.add_row("–" if h.relevance is None else f"{h.relevance:.2f}", f"{h.score:.4f}", h.id,
                      f"{h.payload.get('source_id')}#{h.payload.get('chunk_index')}", text)
    console.print(table)
    threshold = getattr(mem.config, "gate_threshold", None)
    if threshold is not None:
        console.print(f"[dim]relevance: calibrated probability that the chunk helps answer the query; chat "
                      f"injects hits with relevance >= {threshold:g} (gate_threshold). score: the search's raw "
                      "(rank-fusion) score[/]")

@handle_errors
def chat(memory: MemoryOpt, user: UserOpt = None,
         max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="cap on generated tokens")] = 128,
         remember: Annotated[bool, typer.Option("--remember", help="write each finished exchange into the "
                                                "user's memory (conversation memory)")] = False,
         model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Interactive chat: each question retrieves from the memory and answers with the injected chunks.

    Earlier turns of the session stay in the prompt while they fit half the model's window (oldest dropped).
    """
    from ..errors import NativememError
    from ..prompting import DEFAULT_SYSTEM, build_messages
    from ..text import check_text

    lm = load(model, dtype, device)
    mem = _open(memory, lm)
    if remember and not hasattr(mem, "remember"):
        from ..errors import UnsupportedError

        raise UnsupportedError(f"--remember writes conversations into activation memory; {memory} holds a "
                               f"{mem.kind!r} memory")
    console.print(f"[bold]chatting with {lm.name}[/] and memory {memory} ({mem.stats().get('chunks', '?')} "
                  "chunks). Empty line or Ctrl-D to quit.")
    turns: list[tuple[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line.strip() or line.strip() in ("exit", "quit"):
            return
        try:
            question = check_text(line, what="question")
            system, current = build_messages(question, system=getattr(mem, "chat_system", None) or DEFAULT_SYSTEM)
            while True:  # the session's earlier turns, the oldest dropped until the prompt fits half the window
                earlier = [m for q, a in turns for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})]
                ids = lm.chat_ids([system, *earlier, current])
                if not turns or ids.shape[1] + max_new_tokens <= lm.max_context // 2:
                    break
                turns.pop(0)
            keep = lm.user_span([system, *earlier, current]) if remember else None  # the write reuses its KV
            gen = lm.generate(ids, max_new_tokens=max_new_tokens, memory=mem, user_id=user, query=question,
                              keep=keep)
            written = (mem.remember(question, gen.text, user_id=user, generation=gen)
                       if remember and gen.text.strip() else None)
            gen.kept = None
        except NativememError as e:  # one bad line does not end the session
            console.print(f"[red]error:[/] {e}", highlight=False)
            continue
        turns.append((question, gen.text))
        console.print(gen.text, highlight=False)
        if written is not None:
            what = ("already remembered" if written.details["duplicate"]
                    else f"remembered ({len(written.ids)} chunk, "
                         f"{'the chat KV reused' if written.details.get('reused_kv') else 'a separate pass'})")
            console.print(f"[dim]{what}: write {written.elapsed_s * 1000:.0f} ms, "
                          f"turn {gen.total_s * 1000:.0f} ms[/]",
                          highlight=False)
        hits = getattr(mem, "last_selection", {}).get("hits", [])
        scores = ", ".join(f"{'+' if h['injected'] else '-'}{h['relevance']:.2f}" for h in hits
                           if h.get("relevance") is not None)
        console.print(f"[dim]{gen.prefix_tokens} memory tokens injected, {gen.prompt_tokens} prefilled, "
                      f"TTFT {gen.ttft_s * 1000:.0f} ms" + (f"; relevance of the hits (+ injected): {scores}"
                                                             if scores else "") + "[/]")

@handle_errors
def fit(files: Annotated[list[Path], typer.Argument(help="text files of the fit set (paragraphs = texts); "
                                                    "never the documents you will search")],
        memory: MemoryOpt,
        pairs_file: Annotated[Path | None, typer.Option(
            "--pairs", help="(question, passage) pairs for the relevance score: a JSON list (or JSON lines) of "
                            "{\"question\", \"passage\"}, a question with no passage being one nothing "
                            "answers; default: the built-in generic questions")] = None,
        model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Fit an empty activation memory: TwoNN layer choice, retrieval probe, whitening, relevance score."""
    import nativemem as nm

    from ..text import check_text

    texts = []
    for f in files:
        body = check_text(f.read_bytes(), what=str(f))
        texts += [p.strip() for p in body.split("\n\n") if p.strip()]
    lm = load(model, dtype, device)
    mem = nm.open_memory(memory, lm, kind="activation")
    pairs, unanswerable = read_pairs(pairs_file) if pairs_file is not None else (None, [])
    receipt = mem.fit(texts, relevance_pairs=pairs, unanswerable=unanswerable)
    console.print(str(receipt), highlight=False)
    report = receipt.details
    console.print(f"ID curve: {report['id_curve']}", highlight=False)
    console.print("; ".join(receipt.notes), highlight=False)

@handle_errors
def fit_relevance(pairs_file: Annotated[Path, typer.Argument(
                      metavar="PAIRS", help="JSON list (or JSON lines) of {\"question\", \"passage\"}; a "
                                            "question with no passage is one nothing answers")],
                  memory: MemoryOpt, model: ModelOpt = None, dtype: DtypeOpt = None,
                  device: DeviceOpt = "cpu") -> None:
    """Fit the calibrated relevance score (and so the injection gate) of an activation memory on your pairs."""
    from ..errors import InputError

    pairs, unanswerable = read_pairs(pairs_file)
    lm = load(model, dtype, device)
    mem = _open(memory, lm)
    if not hasattr(mem, "fit_relevance"):
        raise InputError(f"{memory} is a {mem.kind} memory; only activation memories have a relevance score")
    receipt = mem.fit_relevance(pairs, unanswerable=unanswerable)
    mem.save()
    console.print("; ".join(receipt.notes), highlight=False)

@handle_errors
def needle(arms: Annotated[str, typer.Option(help="comma-separated arms")] = "long_context,rag_bm25,"
                                                                              "rag_dense,activation",
           lengths: Annotated[str, typer.Option(help="haystack lengths in tokens, comma-separated")] =
           "1000,2000,4000,8000,16000,32000,64000",
           depths: Annotated[str, typer.Option(help="needle depths in [0,1], comma-separated")] =
           "0,0.25,0.5,0.75,1",
           out: Annotated[Path, typer.Option(help="results folder")] = Path("results/needle"),
           data: Annotated[Path | None, typer.Option(help="folder of .txt essays")] = None,
           k: Annotated[int, typer.Option(min=1, help="chunks retrieved")] = 3,
           max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
           seed: int = 0, model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Needle in a haystack (= `nativemem bench needle`): recall by length x depth, with heatmaps."""
    from ..bench.catalog import check_task, run_task
    from ..bench.tasks.needle import needle_heatmap

    arm_names = split_list(arms)
    options = {"lengths": split_list(lengths), "depths": split_list(depths), "needle_seed": seed}
    check_task("needle", arm_names, options, data=data)  # before the model loads
    lm = load(model, dtype, device)
    run_task("needle", lm, arms=arm_names, out=out, seed=seed, data=data, k=k, max_new_tokens=max_new_tokens,
             progress=True, **options)
    console.print(needle_heatmap(out), highlight=False, markup=False)

@handle_errors
def scifact(rankers: Annotated[str, typer.Option(help="comma-separated: bm25, minilm, pooled, tokens, "
                                                 "hybrid, hybrid_tokens")] =
            "bm25,minilm,pooled,tokens,hybrid,hybrid_tokens",
            qrels: Annotated[str, typer.Option(help="qrels file, relative to the data folder")] =
            "qrels/train.tsv",
            limit: Annotated[int | None, typer.Option(min=1, help="evaluation queries")] = None,
            corpus_limit: Annotated[int | None, typer.Option(min=1, help="documents kept (quick runs)")] = None,
            fit_fraction: Annotated[float, typer.Option(help="share of judged queries used only to fit")] = 0.3,
            out: Annotated[Path, typer.Option(help="results folder")] = Path("results/scifact"),
            data: Annotated[Path | None, typer.Option(help="BEIR folder")] = None,
            seed: int = 0, model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """BEIR SciFact retrieval (= `nativemem bench scifact`): nDCG@10 and Recall@100 of BM25, MiniLM and the
    model's own states."""
    from ..bench.catalog import run_task
    from ..bench.tasks import data_root
    from ..bench.tasks.scifact import load_beir

    load_beir(data or data_root() / "scifact", qrels)  # validate before loading the model
    lm = load(model, dtype, device)
    res = run_task("scifact", lm, arms=split_list(rankers), data=data, qrels=qrels, limit=limit,
                   corpus_limit=corpus_limit, fit_fraction=fit_fraction, out=out, seed=seed)
    for name, arm in res["arms"].items():
        m = arm["metrics"]
        console.print(f"{name:14s} nDCG@10 {m['nDCG@10']:.4f}  R@100 {m['R@100']:.4f}  (n={arm['n']})")
    console.print(f"wrote {Path(out) / 'results.json'}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(search)
    app.command()(chat)
    app.command()(fit)
    app.command("fit-relevance")(fit_relevance)
    app.command()(needle)
    app.command()(scifact)
