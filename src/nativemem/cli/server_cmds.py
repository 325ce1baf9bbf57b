"""CLI commands around the HTTP server: `serve` and the `reliability` suite.

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


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    from .main import DeviceOpt, DtypeOpt, ModelOpt, _handle_errors, _quiet_libraries, console

    @app.command()
    @_handle_errors
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
              log_level: Annotated[str, typer.Option(help="uvicorn log level: critical | error | warning | info "
                                                     "| debug")] = "info",
              model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = "cpu") -> None:
        """Serve the model with per-user memory: an OpenAI-compatible API (/v1/chat/completions, /v1/models,
        /v1/memories, /health)."""
        _quiet_libraries()
        from ..server.app import ServerSettings
        from ..server.run import serve as run_server

        settings = ServerSettings(max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s)
        run_server(memory, model=model, host=host, port=port, api_keys=api_keys, no_auth=no_auth,
                   settings=settings, dtype=dtype, device=device, log_level=log_level)
