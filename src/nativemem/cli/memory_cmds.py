"""CLI commands that write and transform memories (`add`, `fuse`).

They parse input and call the Python API; no model logic here. Registered onto the main app by
:func:`register`.

Examples::

    nativemem add book.txt --memory book.mem --kind side_ffn -o width=8 -o lr=0.003
    nativemem fuse --memory book.mem --out book-model
    nativemem ask "Who is the narrator?" --model book-model
"""


import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, console, handle_errors, load

__all__ = ["register", "parse_options"]


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["width=8", "layers=[0,1]", "init=lowest"]`` -> {"width": 8, "layers": [0, 1], "init": "lowest"}.

    Values are read as JSON when they parse (numbers, true/false/null, lists), else kept as strings.
    """
    from ..errors import InputError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"option {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _read_file(path: Path) -> str:
    from ..text import check_text

    if str(path) == "-":
        return check_text(sys.stdin.buffer.read(), what="standard input")
    if not path.is_file():
        raise FileNotFoundError(2, "not a file", str(path))
    return check_text(path.read_bytes(), what=str(path))


@handle_errors
def add(files: Annotated[list[Path], typer.Argument(help="text files to write into the memory (- for stdin)")],
        memory: Annotated[Path, typer.Option("--memory", help="memory folder (created if missing)")],
        kind: Annotated[str | None, typer.Option(help="memory kind when creating the folder, e.g. side_ffn "
                                                      "(see `nativemem info`)")] = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE config field for a "
                                                         "new memory, e.g. -o width=8 -o lr=0.003")] = None,
        user: Annotated[str | None, typer.Option(help="user id recorded with the texts")] = None,
        model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Write text files into a memory (memorize + test-time training for side_ffn) and save it."""
    import nativemem as nm

    config = parse_options(option)
    texts = [_read_file(f) for f in files]  # fail on unreadable input before loading the model
    if kind is not None:
        nm.memories.get_memory_class(kind)  # unknown kind: did-you-mean error before loading
    lm = load(model, dtype, device)
    mem = nm.open_memory(memory, lm, kind=kind, **config)
    with console.status(f"writing {len(texts)} text(s) into the {mem.kind} memory…"):
        if mem.kind == "activation":  # each file's chunks carry its name as their source id
            receipt = mem.add(texts, user_id=user, source_ids=["stdin" if str(f) == "-" else f.name for f in files])
        else:
            receipt = mem.add(texts if len(texts) > 1 else texts[0], user_id=user)
    mem.save(memory)
    console.print(str(receipt), highlight=False)
    for note in receipt.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"saved {memory}", highlight=False)

@handle_errors
def fuse(memory: Annotated[Path, typer.Option("--memory", help="memory folder to fuse")],
         out: Annotated[Path, typer.Option("--out", help="folder for the fused transformers checkpoint")],
         model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Fuse a memory into the model's weights and save a plain transformers checkpoint.

    The result loads anywhere transformers does: `nativemem ask "..." --model OUT`.
    """
    import nativemem as nm

    from ..errors import InputError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new --out")
    lm = load(model, dtype, device)
    mem = nm.open_memory(memory, lm)
    if not mem.supports_fuse:
        raise InputError(f"memory kind {mem.kind!r} cannot be fused into weights")
    fused = mem.fuse()
    out.mkdir(parents=True, exist_ok=True)
    fused.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    extra = sum(p.numel() for p in fused.parameters()) - sum(p.numel() for p in lm.model.parameters())
    console.print(f"fused {mem.kind} memory {memory} into {out} (+{extra:,} parameters); "
                  f"use it with: nativemem ask \"...\" --model {out}", highlight=False)

@handle_errors
def repair(memory: Annotated[Path, typer.Option("--memory", help="activation memory folder to repair")],
           model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Rebuild an activation memory's index from its catalog (after a damaged index or unreadable payload).

    Every live chunk is encoded again, keeping its id, user, source and metadata.
    The old index is kept aside as store.damaged-<time> for you to delete.
    """
    from ..errors import InputError
    from ..memories.activation import ActivationMemory
    from ..memories.base import read_memory_config

    kind = read_memory_config(memory)["kind"]
    if kind != "activation":
        raise InputError(f"repair rebuilds activation memories; {memory} holds a {kind!r} memory")
    lm = load(model, dtype, device)
    with console.status("encoding the catalog's chunks again…"):
        receipt = ActivationMemory.repair(memory, lm)
    for note in receipt.notes:
        console.print(note, highlight=False)
    console.print(f"repaired {memory}: {receipt.details['chunks']} chunks served ({receipt.elapsed_s:.1f} s)",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(add)
    app.command()(fuse)
    app.command()(repair)
