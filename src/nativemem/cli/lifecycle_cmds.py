"""CLI commands of a memory's lifecycle: `list`, `get`, `update`, `history`, `delete`, `reset`, `export`, `import`,
`reencode`.

They parse input and call the Python API (:class:`nativemem.memories.base.Memory`'s lifecycle methods);
registered onto the main app by :func:`register`.

Examples::

    nativemem list --memory notes.mem --user alice
    nativemem export --memory notes.mem --out notes.jsonl
    nativemem reencode --memory notes.mem --model gemma3-270m --out notes-gemma.mem
"""

# no `from __future__ import annotations`: typer reads the option annotations
import json
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, console, handle_errors, load

__all__ = ["register"]

MemoryOpt = Annotated[Path, typer.Option("--memory", help="memory folder")]
UserOpt = Annotated[str | None, typer.Option("--user", help="user id (default: memories written without one)")]


def _open(memory: Path, model, dtype, device):
    import nativemem as nm

    from ..memories.base import read_memory_config

    read_memory_config(memory)  # not a memory folder: a clear error before loading the model
    return nm.open_memory(memory, load(model, dtype, device))

def _reader(memory: Path, model, dtype, device):
    """The memory for reading; while another process holds an activation folder, its catalog (no model)."""
    from ..errors import MemoryLockedError
    from ..memories.activation.catalog import Catalog, CatalogView
    from ..memories.activation.store import _acquire_lock
    from ..memories.base import read_memory_config

    if read_memory_config(memory)["kind"] == "activation" and Catalog(memory).exists:
        try:
            _acquire_lock(memory).release()
        except MemoryLockedError:
            console.print("[dim]the folder is open in another process: reading its catalog (every acknowledged "
                          "write; search and ask need that process, e.g. its HTTP API)[/]", highlight=False)
            return CatalogView(memory)
    return _open(memory, model, dtype, device)

@handle_errors
def list_(memory: MemoryOpt, user: UserOpt = None,
          limit: Annotated[int, typer.Option(min=1, help="items shown")] = 20,
          offset: Annotated[int, typer.Option(min=0, help="items skipped")] = 0,
          as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
          model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """List a user's stored items, oldest first (also while another process writes to the folder)."""
    mem = _reader(memory, model, dtype, device)
    rows = mem.items(user_id=user, limit=limit, offset=offset)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    for row in rows:
        text = row["text"].replace("\n", " ")
        console.print(f"{row['id']}  {text[:90]}{'…' if len(text) > 90 else ''}", highlight=False, markup=False)
    console.print(f"{len(rows)} item(s) from {offset}", highlight=False)

@handle_errors
def get(memory_id: Annotated[str, typer.Argument(help="item id")], memory: MemoryOpt, user: UserOpt = None,
        model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Show one of a user's items as JSON (another user's id is 'not found', as an unknown one)."""
    from ..errors import InputError

    row = _reader(memory, model, dtype, device).get(memory_id, user_id=user)
    if row is None:
        raise InputError(f"no item {memory_id!r} for this user")
    typer.echo(json.dumps(row, ensure_ascii=False, indent=2))

@handle_errors
def update(memory_id: Annotated[str, typer.Argument(help="item id")], memory: MemoryOpt, user: UserOpt = None,
           text: Annotated[str | None, typer.Option(help="the new text (encoded again; one chunk at most)")] = None,
           metadata: Annotated[str | None, typer.Option(help="new metadata, a JSON object")] = None,
           model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Replace one of a user's items: a new text and/or new metadata; the id stays."""
    from ..errors import InputError

    meta = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except ValueError as e:
            raise InputError(f"--metadata is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise InputError("--metadata must be a JSON object")
    mem = _open(memory, model, dtype, device)
    receipt = mem.update(memory_id, text=text, metadata=meta, user_id=user)
    mem.save()
    console.print(f"updated {memory_id} (version {receipt.details['version']})", highlight=False)

@handle_errors
def history(memory_id: Annotated[str, typer.Argument(help="item id")], memory: MemoryOpt, user: UserOpt = None,
            model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Show the versions of one of a user's items (add, update, delete, with times) as JSON lines."""
    from ..errors import InputError

    versions = _reader(memory, model, dtype, device).history(memory_id, user_id=user)
    if not versions:
        raise InputError(f"no item {memory_id!r} for this user")
    for v in versions:
        typer.echo(json.dumps(v, ensure_ascii=False))

@handle_errors
def delete(memory_id: Annotated[str, typer.Argument(help="item id, or a source id (all its chunks)")],
           memory: MemoryOpt, user: UserOpt = None,
           model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Delete one of a user's items (or all chunks of one of their sources)."""
    from ..errors import InputError

    mem = _open(memory, model, dtype, device)
    if mem.get(memory_id, user_id=user) is None and not any(
            r.get("source_id") == memory_id for r in mem.items(user_id=user, limit=1 << 30)):
        raise InputError(f"no item or source {memory_id!r} for this user")
    receipt = mem.delete(memory_id)
    mem.save()
    console.print(f"deleted {len(receipt.ids)} item(s)", highlight=False)

@handle_errors
def reset(memory: MemoryOpt, user: UserOpt = None,
          yes: Annotated[bool, typer.Option("--yes", help="confirm: delete every item of this user")] = False,
          model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Delete every item of one user (asks for --yes)."""
    from ..errors import InputError

    if not yes:
        raise InputError("reset deletes every item of the user: add --yes to confirm")
    mem = _open(memory, model, dtype, device)
    receipt = mem.reset(user)
    mem.save()
    console.print(f"deleted {len(receipt.ids)} item(s) of user {user or '(none)'!s}", highlight=False)

@handle_errors
def export(memory: MemoryOpt,
           out: Annotated[Path, typer.Option("--out", help="JSON Lines file to write")],
           user: Annotated[str | None, typer.Option("--user", help="only this user's items (default: all)")]
           = None,
           force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
           model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Write what the memory was built from (texts, ids, owners, metadata) to a portable JSON Lines file."""
    from ..errors import InputError

    if out.exists() and not force:
        raise InputError(f"{out} exists; choose another file or pass --force")
    mem = _reader(memory, model, dtype, device)
    done = mem.export(out, user_id=user, force=force)
    n = done if isinstance(done, int) else done.details["items"]
    console.print(f"exported {n} item(s) to {out}", highlight=False)

@handle_errors
def import_(file: Annotated[Path, typer.Argument(help="export file (nativemem export)")],
            memory: Annotated[Path, typer.Option("--memory", help="memory folder (created if missing)")],
            kind: Annotated[str, typer.Option(help="kind of a new memory")] = "activation",
            model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Encode an export file's items into a memory for this model, all or nothing."""
    import nativemem as nm

    from ..memories.export import read_export

    read_export(file)  # a malformed file fails before the model loads
    mem = nm.open_memory(memory, load(model, dtype, device), kind=kind)
    receipt = mem.import_file(file)
    mem.save()
    for note in receipt.notes:
        console.print(note, highlight=False)

@handle_errors
def reencode(memory: Annotated[Path, typer.Option("--memory", help="activation memory folder to read")],
             out: Annotated[Path, typer.Option("--out", help="new memory folder for --model")],
             model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Move an activation memory to another model: its items are encoded again by --model into --out.

    The old folder is only read (from its catalog: its own model is not needed) and stays as it is.
    """
    from ..memories.activation import reencode_memory

    receipt = reencode_memory(memory, out, load(model, dtype, device))
    for note in receipt.notes:
        console.print(note, highlight=False)
    console.print(f"wrote {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("list")(list_)
    app.command()(get)
    app.command()(update)
    app.command()(history)
    app.command()(delete)
    app.command()(reset)
    app.command()(export)
    app.command("import")(import_)
    app.command()(reencode)
