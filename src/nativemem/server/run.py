"""Running the server: :func:`serve` (what ``nativemem serve`` calls) and :class:`ServerThread` (a live
uvicorn on loopback inside this process, for tests and the reliability suite)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import InputError
from .app import ServerSettings, create_app
from .auth import load_api_keys

__all__ = ["serve", "ServerThread", "is_loopback", "KEEP_ALIVE_S"]

# idle seconds before the server closes a keep-alive connection. uvicorn's default (5 s) loses a race with
# clients that reuse a connection after a pause: their next request meets a closing socket ("connection
# reset"). 75 s is nginx's default.
KEEP_ALIVE_S = 75


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(memory: str | os.PathLike, *, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_keys: str | os.PathLike | None = None, no_auth: bool = False, settings: ServerSettings | None = None,
          dtype: str | None = None, device: str = "cpu", log_level: str = "info", access_log: bool = True,
          redis_url: str | None = None) -> None:
    """Load the model and the memory folder (an activation memory; created if missing), then serve until stopped.

    ``redis_url``: the memory lives in that Redis (``backend="redis"``), so that several servers (replicas) started
    with the same URL and model serve the same memory (:mod:`nativemem.memories.activation.shared`).

    Raises:
        InputError: no API keys without ``no_auth``, ``no_auth`` off loopback, a bad key file or folder, a folder
            whose memory does not live in ``redis_url``.
        StoreUnavailableError: the Redis cannot be reached.
    """
    import uvicorn

    import nativemem as nm

    settings = settings or ServerSettings()
    keys = load_api_keys(api_keys)
    if keys is not None and no_auth:
        raise InputError("--no-auth and API keys exclude each other")
    if keys is None and not no_auth:
        raise InputError("no API keys: pass --api-keys FILE (a JSON object {\"KEY\": \"USER_ID\"}) or set "
                         "NATIVEMEM_API_KEYS_FILE; --no-auth serves one anonymous user on loopback")
    if no_auth and not is_loopback(host):
        raise InputError(f"--no-auth is allowed only on a loopback address, not {host!r}")
    settings.anonymous = no_auth
    path = Path(memory)
    if path.exists() and not path.is_dir():
        raise InputError(f"--memory {path} is not a folder")
    lm = nm.load_model(model, dtype=dtype, device=device)
    if getattr(getattr(lm, "device", None), "type", None) == "cuda":
        # cuDNN's attention kernel builds an execution plan for every new prompt length (measured ~60 ms per
        # length on an H200, docs/benchmarks.md); a server sees a new length with nearly every request
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    mem = _open(path, lm, redis_url)
    app = create_app(keys=keys, settings=settings, lm=lm, memory=mem)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5, server_header=False)


def _open(path: Path, lm, redis_url: str | None):
    """The folder's activation memory (created if missing, in ``redis_url`` when given), its store opened, so an
    unreachable Redis stops the start with a clear error."""
    import nativemem as nm
    from ..memories.base import MEMORY_CONFIG_NAME, read_memory_config

    exists = (path / MEMORY_CONFIG_NAME).is_file()
    if redis_url and exists:
        cfg = read_memory_config(path).get("config", {})
        if cfg.get("backend") != "redis" or cfg.get("redis_url") != redis_url:
            raise InputError(f"--redis: the memory in {path} does not live in this Redis (backend "
                             f"{cfg.get('backend')!r}); give each replica a new folder, or a copy of another's")
    options = {"backend": "redis", "redis_url": redis_url} if redis_url and not exists else {}
    mem = nm.open_memory(path, lm, kind="activation", **options)
    _ = mem.store
    return mem


class ServerThread:
    """A uvicorn server for ``app`` on a free loopback port, run in a background thread.

    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=2, server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="nativemem-server", daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        sock: socket.socket = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
