"""Finding a model: a local directory, or a Hugging Face hub id.

A hub id is looked up in the local Hugging Face cache first and downloaded
with `huggingface_hub` only when that package is installed and the network
allows. Only weights (safetensors), JSON and tokenizer files are fetched: no
Python file from a model repository is ever downloaded or run.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "RLHFlow/ArmoRM-Llama3-8B-v0.1"
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor reachable on the hub."""


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Returns a local directory holding the model `name_or_path`.

    Raises ModelNotFoundError with the reason and what to do instead.
    """
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        return p
    s = str(name_or_path)
    if p.exists():
        raise ModelNotFoundError(f"{s} is a file, not a model directory")
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise ModelNotFoundError(f"model directory {s} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{s} is not a local directory, and huggingface_hub is not installed to fetch it from the hub "
            "(pip install huggingface_hub), so pass a local model directory instead") from None
    try:
        return Path(snapshot_download(s, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached: try the network
    try:
        return Path(snapshot_download(s, allow_patterns=_PATTERNS))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ModelNotFoundError(
            f"{s} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {msg[:200]}); download it where the hub is reachable and pass "
            "the local model directory instead") from None
