"""What every CLI command shares: the consoles, the model options, error handling and model loading."""

from __future__ import annotations

import functools
import os
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["console", "err_console", "ModelOpt", "DtypeOpt", "DeviceOpt", "quiet_libraries", "handle_errors",
           "load", "split_list"]

console = Console(stderr=False)
err_console = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF model id (local cache), model folder, "
                                              ".gguf file, gemma3-270m (after `make gemma`), or random:NAME (or "
                                              "random:NAME@SEED): a published shape with random weights, for timing at real shapes (e.g. "
                                              "random:llama-3.1-8b; random:tiny, llama-3.2-1b/3b, qwen2.5-1.5b/7b; "
                                              "see `nativemem info --model random:NAME`); default: "
                                              "SmolLM2-135M-Instruct (offline)")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 | auto (float32 on CPU)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto")]


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def handle_errors(fn):
    """Turn nativemem's own errors into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..errors import NativememError

        try:
            return fn(*args, **kwargs)
        except NativememError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except FileNotFoundError as e:
            err_console.print(f"[bold red]error:[/] file not found: {e.filename or e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def load(model: str | None, dtype: str | None, device: str):
    quiet_libraries()
    import nativemem as nm

    with console.status("loading model…"):
        return nm.load_model(model, dtype=dtype, device=device)


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
