"""Shared fixtures: tiny random checkpoints and the real Llama-3 tokenizer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

def test_cache_root() -> Path:
    root = Path(os.environ.get("ARMORM_TEST_CACHE", Path.home() / ".cache" / "armorm-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


test_cache_root.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """A directory with the real Llama-3 tokenizer (built from llama-models' tiktoken file)."""
    from llama3_tokenizer import llama3_tokenizer_dir
    return Path(llama3_tokenizer_dir(test_cache_root()))
