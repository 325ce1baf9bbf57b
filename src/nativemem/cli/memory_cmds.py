"""CLI commands that write, search and transform memories (`add`, `fuse`, ...).

They parse input and call the Python API; no model logic here. Registered onto the main app by
:func:`register`.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
