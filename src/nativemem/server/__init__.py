"""OpenAI-compatible HTTP server with per-user native memory (``nativemem serve``).

:func:`create_app` builds the FastAPI app; :func:`serve` loads a model and memory folder and runs it with
uvicorn; :class:`ServerThread` runs one inside this process (tests, the reliability suite).
"""

from .app import ServerSettings, create_app
from .auth import KeyRing, load_api_keys
from .run import ServerThread, serve

__all__ = ["create_app", "ServerSettings", "KeyRing", "load_api_keys", "serve", "ServerThread"]
