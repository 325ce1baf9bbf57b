"""The ``nativemem`` command line. It parses input, calls the Python API and prints; no model logic here.

Every :class:`~nativemem.errors.NativememError` becomes one red line and exit code 2, never a traceback.

Examples::

    nativemem info
    nativemem ask "What is the capital of France?"
    nativemem demo
    nativemem bench squad --arms none,rag_bm25,rag_dense --limit 300 --out results/squad
    nativemem report results/squad
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import InputError
from . import activation_cmds, lifecycle_cmds, memory_cmds, server_cmds
from .common import DeviceOpt, DtypeOpt, ModelOpt, console, err_console
from .common import handle_errors as _handle_errors
from .common import load as _load
from .common import quiet_libraries as _quiet_libraries
from .common import split_list as _split_list

app = typer.Typer(
    name="nativemem", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Memory that lives in a language model's own representations. Benchmarks against RAG and long context.",
    epilog="Quick start: `nativemem ask \"What is the capital of France?\"`, then "
           "`nativemem bench squad --arms none,rag_bm25 --limit 50 --out results/squad`.",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"nativemem {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Memory that lives in a language model's own representations. Benchmarks against RAG and long context."""
def _read_text_arg(text: str) -> str:
    """A question given as text, or '-' for standard input (bytes checked as UTF-8)."""
    from ..text import check_text

    if text == "-":
        return check_text(sys.stdin.buffer.read(), what="standard input")
    return check_text(text, what="question")


@app.command()
@_handle_errors
def info(model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
         memory: Annotated[Path | None, typer.Option(help="also describe this memory folder")] = None) -> None:
    """Show the model, its fingerprint, the memory kinds, and library versions."""
    import platform

    import torch
    import transformers

    import nativemem as nm

    lm = _load(model, dtype, device)
    table = Table(title="model", show_header=False)
    for key, value in lm.fingerprint.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("context window", f"{lm.max_context} tokens")
    table.add_row("parameters", f"{sum(p.numel() for p in lm.model.parameters()):,}")
    table.add_row("device", str(lm.device))
    console.print(table)
    if memory is not None:
        from ..memories.base import read_memory_config

        meta = read_memory_config(memory)
        mt = Table(title=f"memory {memory}", show_header=False)
        mt.add_row("kind", meta["kind"])
        for key, value in sorted(meta["config"].items()):
            mt.add_row(key, str(value))
        field = nm.Fingerprint.from_dict(meta["fingerprint"]).mismatch(lm.fingerprint)
        mt.add_row("matches model", "yes" if field is None else f"NO ({field} differs)")
        console.print(mt)
    versions = Table(title="versions", show_header=False)
    for name, ver in [("nativemem", nm.__version__), ("python", platform.python_version()),
                      ("torch", torch.__version__), ("transformers", transformers.__version__)]:
        versions.add_row(name, ver)
    versions.add_row("memory kinds", ", ".join(nm.memory_kinds()) or "(none registered)")
    console.print(versions)


@app.command()
@_handle_errors
def ask(question: Annotated[str, typer.Argument(help="the question, or - to read it from standard input")],
        model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu",
        memory: Annotated[Path | None, typer.Option(help="answer with this memory folder")] = None,
        user: Annotated[str | None, typer.Option(help="user id whose memories may be used")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="cap on generated tokens")] = 128) -> None:
    """Answer one question with the model (and a memory, if given)."""
    question = _read_text_arg(question)
    lm = _load(model, dtype, device)
    mem = None
    if memory is not None:
        import nativemem as nm

        mem = nm.open_memory(memory, lm)
        if user is None and getattr(mem, "supports_search", False):  # per-user memories
            err_console.print("[dim]no --user: answering with the memories stored without a user id[/]")
    console.print(lm.chat(question, memory=mem, user_id=user, max_new_tokens=max_new_tokens), highlight=False)


@app.command()
@_handle_errors
def demo(kind: Annotated[str, typer.Option(help="activation: the documents' own KV injected as a prefix, compared "
                                                "with pasted text and no memory | bm25: text retrieval (RAG) only")
                         ] = "activation",
         model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Write a few short documents into a memory and answer questions about them."""
    if kind not in ("activation", "bm25"):
        raise InputError(f"unknown demo kind {kind!r}; use activation or bm25")
    lm = _load(model, dtype, device)
    if kind == "bm25":
        from ..demo import run_demo

        run_demo(lm, console)
    else:
        from ..activation_demo import run_activation_demo

        run_activation_demo(lm, console)


@app.command()
@_handle_errors
def bench(task: Annotated[str, typer.Argument(help="task name (see --list)")] = "squad",
          arms: Annotated[str, typer.Option(help="comma-separated arm names (default: none,rag_bm25 for QA tasks, "
                                                       "the task's own arms for the others; see --list)")] = "",
          limit: Annotated[int | None, typer.Option(min=1, help="first N items in seeded order (all if unset)")] = None,
          out: Annotated[Path, typer.Option(help="folder for results.json and items.jsonl")] = Path("results/bench"),
          seed: Annotated[int, typer.Option(help="seed of the item order and bootstrap")] = 0,
          data: Annotated[Path | None, typer.Option(help="your own file/folder in the task's format")] = None,
          k: Annotated[int, typer.Option(min=1, help="chunks retrieved per question")] = 3,
          max_new_tokens: Annotated[int, typer.Option(min=1, help="cap on generated tokens")] = 32,
          list_all: Annotated[bool, typer.Option("--list", help="list tasks and arms, then exit")] = False,
          facts: Annotated[int | None, typer.Option(min=1, help="facts task: number of facts stored")] = None,
          option: Annotated[list[str] | None, typer.Option("--option", "-o", help="task option KEY=VALUE (VALUE "
                                                           "read as JSON when it parses), repeatable; e.g. -o "
                                                           "max_tokens=32768 for pg19")] = None,
          memory_option: Annotated[list[str] | None, typer.Option(
              "--memory-option", help="config of the memory that memory arms build, KEY=VALUE (JSON value), "
                                      "repeatable; e.g. --memory-option kv_dtype=int8")] = None,
          model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Run a benchmark task over several arms; writes results.json (and items.jsonl) to --out."""
    _quiet_libraries()
    from ..bench import report
    from ..bench.catalog import SCORES, TASKS, check_task, run_task, task_arms, task_entry

    if list_all:
        for name, entry in TASKS.items():
            arms_known = ", ".join(task_arms(name)) or "-"
            console.print(f"{name} ({entry.scores}): {entry.summary}. Arms: {arms_known}", highlight=False,
                          markup=False)
        console.print("scores: " + "; ".join(f"{key} = {text}" for key, text in SCORES.items()), highlight=False,
                      markup=False)
        return
    entry = task_entry(task)
    arm_names = _split_list(arms)
    from .memory_cmds import parse_options

    options = parse_options(option)
    memory_options = parse_options(memory_option)
    if memory_options:  # a task that builds no memory refuses it as an unknown option
        options["memory_options"] = memory_options
    if facts is not None:
        if task != "facts":
            raise InputError("--facts applies to the facts task only")
        options["num_facts"] = facts
    check_task(task, arm_names, options, limit=limit, data=data)  # before the model loads
    lm = _load(model, dtype, device)
    results = run_task(task, lm, arms=arm_names, out=out, data=data, limit=limit, seed=seed, k=k,
                       max_new_tokens=max_new_tokens, progress=True, **options)
    if entry.driver is None:
        console.print(report([out]), highlight=False, markup=False)
        console.print(f"wrote {out / 'results.json'} (n={results['n']})")
        return
    console.print(f"wrote {Path(out) / 'results.json'}", highlight=False)
    for arm, block in results.get("arms", {}).items():
        metrics = block.get("metrics", {})
        console.print(f"{arm}: " + ", ".join(f"{m} {v:.4g}" for m, v in metrics.items() if isinstance(v, float)),
                      highlight=False, markup=False)


@app.command("report")
@_handle_errors
def report_cmd(dirs: Annotated[list[Path], typer.Argument(help="result folders written by `nativemem bench`")],
               out: Annotated[Path | None, typer.Option(help="where report.md and PNGs go (default: first dir)")] = None
               ) -> None:
    """Turn result folders into a Markdown table plus PNG plots."""
    from ..bench import report

    console.print(report(dirs, out=out), highlight=False, markup=False)


@app.command("merge")
@_handle_errors
def merge_cmd(dirs: Annotated[list[Path], typer.Argument(help="run folders of one task and item set, each with "
                                                             "other arms (e.g. run in parallel processes)")],
              out: Annotated[Path, typer.Option(help="folder of the merged run")]) -> None:
    """Merge runs of the same task and items into one run; paired comparisons are recomputed across all arms."""
    from ..bench import merge_runs, report

    merged = merge_runs(dirs, out)
    console.print(f"merged {len(dirs)} runs: arms {', '.join(merged['arms'])} -> {out}", highlight=False)
    console.print(report([out]), highlight=False, markup=False)


for _commands in (memory_cmds, lifecycle_cmds, activation_cmds, server_cmds):  # in the order --help lists them
    _commands.register(app)

if __name__ == "__main__":
    app()
