"""CLI commands around the servers: `serve` (HTTP), `mcp` (Model Context Protocol) and the `reliability` suite.

They parse options and call :mod:`nativemem.server`; no model or HTTP logic here. :func:`register` adds
them to the main app (``nativemem.cli.main``).

Examples::

    echo '{"sk-alice-...": "alice"}' > keys.json
    nativemem serve --memory notes.mem --api-keys keys.json --port 8000
    nativemem reliability --size small --out results/reliability
"""

# no `from __future__ import annotations`: typer reads the annotations (see activation_cmds.py)
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, console, handle_errors, load, quiet_libraries


@handle_errors
def mcp(memory: Annotated[Path, typer.Option("--memory", help="activation memory folder (created if missing)")],
        user: Annotated[str | None, typer.Option(help="the user whose memories the tools act on")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="cap on the tokens of `ask`")] = 128,
        model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Serve one user's memory to an agent over the Model Context Protocol (stdio): tools add, search, list,
    delete and ask."""
    import contextlib
    import sys

    quiet_libraries()
    import nativemem as nm

    from ..mcp_server import build_server

    with contextlib.redirect_stdout(sys.stderr):  # standard output carries the protocol only
        lm = nm.load_model(model, dtype=dtype, device=device)
        mem = nm.open_memory(memory, lm, kind="activation")
        if mem.kind != "activation":
            from ..errors import InputError

            raise InputError(f"{memory} is a {mem.kind} memory; the MCP server needs an activation memory")
    build_server(lm, mem, user_id=user, max_new_tokens=max_new_tokens).run("stdio")

@handle_errors
def serve(memory: Annotated[Path, typer.Option("--memory", help="activation memory folder (created if "
                                               "missing)")],
          host: Annotated[str, typer.Option(help="address to bind; loopback by default")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0 = any free port; the log "
                                            "line 'Uvicorn running on' names it)")] = 8000,
          api_keys: Annotated[Path | None, typer.Option("--api-keys", help="JSON file {\"KEY\": \"USER_ID\"}; "
                                                        "default: $NATIVEMEM_API_KEYS_FILE")] = None,
          no_auth: Annotated[bool, typer.Option("--no-auth", help="no keys: every request is the anonymous "
                                                "user (loopback only)")] = False,
          max_body_bytes: Annotated[int, typer.Option(min=1024, help="larger request bodies get 413")] =
          8 << 20,
          request_timeout_s: Annotated[float, typer.Option(min=0.001, help="seconds a request may wait for "
                                                           "the model and generate (then 503/504)")] = 300.0,
          write_turn_chunks: Annotated[int, typer.Option(min=1, help="chunks an add encodes per turn on the "
                                                         "model; other requests are served between turns")] = 2,
          batch_size: Annotated[int, typer.Option(min=1, help="chats decoded together in one forward per "
                                                  "step (1: one chat at a time)")] = 32,
          log_level: Annotated[str, typer.Option(help="uvicorn log level: critical | error | warning | info "
                                                 "| debug")] = "info",
          access_log: Annotated[bool, typer.Option(help="log one line per request (never headers or "
                                                   "bodies)")] = True,
          redis: Annotated[str | None, typer.Option("--redis", help="redis://host:port/db: the memory lives in this "
                                                    "Redis, so servers started with the same URL and model "
                                                    "serve the same memory (replicas)")] = None,
          model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Serve the model with per-user memory: an OpenAI-compatible API (/v1/chat/completions, /v1/models,
    /v1/memories, /health)."""
    quiet_libraries()
    from ..server.app import ServerSettings
    from ..server.run import serve as run_server

    settings = ServerSettings(max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s,
                              write_turn_chunks=write_turn_chunks, batch_size=batch_size)
    run_server(memory, model=model, host=host, port=port, api_keys=api_keys, no_auth=no_auth,
               settings=settings, dtype=dtype, device=device, log_level=log_level,
               access_log=access_log, redis_url=redis)

@handle_errors
def reliability(size: Annotated[str, typer.Option(help="small (CI: 2 kills, 400 requests, 3 s of load, 150 "
                                                  "fuzz inputs) | full (20 kills, 10,000 requests, 60 s, "
                                                  "3,000 inputs)")] = "small",
                out: Annotated[Path, typer.Option(help="folder for reliability.json (and its work/ folder)")] =
                Path("results/reliability"),
                parts: Annotated[str, typer.Option(help="comma-separated: durability, isolation, load, fuzz, "
                                                   "ttft, damage, stall, poison, concurrency, replicas "
                                                   "(two servers on one Redis; not in the default)")] =
                "durability,isolation,load,fuzz,ttft,damage,stall,poison,concurrency",
                seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
                redis: Annotated[str | None, typer.Option("--redis", help="replicas: redis://host:port/db to use "
                                                          "(default: a redis-server started on loopback)")] = None,
                model: ModelOpt = None) -> None:
    """Reliability and security suite against real `nativemem serve` subprocesses: SIGKILL durability,
    cross-user isolation, 50-client load, fuzzing of every endpoint, TTFT over HTTP, damaged files and repair,
    another user's latency during a long add and a consolidation (stall), unrelated answers beside poisoned
    memories (poison), chat throughput and latency at 1, 8 and 32 clients, one chat at a time against
    batched decoding (concurrency), two replicas sharing a memory through Redis while one is killed (replicas)."""
    import json

    quiet_libraries()
    from ..errors import InputError
    from ..testing.reliability import PARTS, run_suite

    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise InputError(f"unknown parts {unknown}; use some of {', '.join(PARTS)}")
    res = run_suite(out, size=size, model=model, parts=chosen, seed=seed, redis_url=redis,
                    log=lambda m: console.print(m, highlight=False, markup=False))
    summary = {k: v for k, v in res.items() if k in PARTS}
    console.print(json.dumps(summary, indent=2), highlight=False, markup=False)
    console.print(f"{'PASSED' if res['passed'] else 'FAILED'}: wrote {out / 'reliability.json'} "
                  f"in {res['elapsed_s']} s", highlight=False, markup=False)
    if not res["passed"]:
        raise typer.Exit(1)

@handle_errors
def consolidate(memory: Annotated[Path, typer.Option("--memory", help="activation memory folder to read")],
                into: Annotated[str, typer.Option(help="side_ffn | pkm")],
                out: Annotated[Path, typer.Option(help="target memory folder (created, or grown if it "
                                                  "exists)")],
                user: Annotated[str | None, typer.Option(help="whose memories (default: the anonymous "
                                                         "user's)")] = None,
                option: Annotated[list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE config "
                                                                 "field of a new target memory")] = None,
                model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
    """Move a user's activation memories into a parametric memory (side_ffn or pkm); prints recall of the
    stored sentences without retrieval, before and after."""
    import nativemem as nm

    from ..consolidate import consolidate as run_consolidation
    from ..errors import InputError
    from .memory_cmds import parse_options

    if into not in ("side_ffn", "pkm"):
        raise InputError(f"--into must be side_ffn or pkm, not {into!r}")
    if not (memory / "memory_config.json").is_file():
        raise InputError(f"{memory} is not a memory folder")
    config = parse_options(option)
    lm = load(model, dtype, device)
    source = nm.open_memory(memory, lm, kind="activation")
    target = nm.open_memory(out, lm, kind=into, **config)
    with console.status(f"consolidating into {into}…"):
        receipt = run_consolidation(source, target, user_id=user)
    if not receipt.did_nothing:
        target.save(out)
    console.print(str(receipt), highlight=False)
    for note in receipt.notes:
        console.print(f"note: {note}", highlight=False)
    b, a = receipt.details.get("before"), receipt.details.get("after")
    if b and a:
        console.print(f"mean NLL of the stored sentences: {b['mean_nll']:.4f} before, {a['mean_nll']:.4f} after",
                      highlight=False)
        console.print(f"saved {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(mcp)
    app.command()(serve)
    app.command()(reliability)
    app.command()(consolidate)
