"""Test helper: build a real Llama-3 tokenizer directory from Meta's tiktoken file.

The Llama-3 BPE ranks ship on PyPI inside the ``llama-models`` wheel
(``llama_models/llama3/tokenizer.model``: one ``<base64 token bytes> <rank>``
line per token, 128000 of them). This module downloads that wheel with pip,
converts the ranks into a Hugging Face ``tokenizer.json`` laid out like the one
of ``meta-llama/Meta-Llama-3-8B-Instruct`` (byte-level BPE with the Llama-3
split regex, 256 special tokens at 128000..128255, a post-processor that
prepends ``<|begin_of_text|>``), and writes ``tokenizer_config.json`` (with the
Llama-3 Instruct chat template) and ``special_tokens_map.json`` next to it.

The result is cached under ``cache_root`` and built once. Any failure (no
network, no wheel, a changed file) raises: tests that depend on it must error,
never skip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
    "llama3_tokenizer_dir",
    "load_llama3_ranks",
]

# sha256 of Meta's Llama-3 tiktoken file (the same file as in the
# Meta-Llama-3-8B-Instruct release, original/tokenizer.model).
LLAMA3_TOKENIZER_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

# Pre-tokenizer split regex of Llama 3 (tiktoken ``pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 256 special tokens, ids 128000..128255, named as in the original Llama 3
# release (Llama 3.1 renamed some reserved slots; the ids used here are the same).
LLAMA3_SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]

# Chat template of meta-llama/Meta-Llama-3-8B-Instruct (tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_WHEEL_MEMBER = "llama_models/llama3/tokenizer.model"
_BUILD_VERSION = "v1"  # bump to invalidate cached builds after changing this file


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte maps to one printable character.

    Printable Latin-1 bytes map to themselves; the remaining ones (control
    characters, space, and a few others) map, in byte order, to code points
    256, 257, ...
    """
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_llama3_ranks(model_file: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``<base64> <rank>`` per line) into a rank table."""
    ranks: dict[bytes, int] = {}
    with open(model_file, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
            except ValueError as exc:  # pragma: no cover - corrupt download
                raise ValueError(f"{model_file}:{lineno}: not a tiktoken rank line") from exc
    return ranks


def _ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into byte-level BPE vocab and an ordered merge list.

    Every way of splitting a multi-byte token into two tokens that both exist
    becomes a merge; merges are ordered by the rank of the token they produce,
    then by the ranks of the two halves. This is how the published Llama-3
    ``tokenizer.json`` was derived (it has 280147 merges).
    """
    table = _byte_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    found: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                found.append((rank, lr, rr, left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    merges = [(as_text(m[3]), as_text(m[4])) for m in found]
    return vocab, merges


def _build_tokenizer_json(ranks: dict[bytes, int], out_file: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    n_base = len(ranks)
    if sorted(ranks.values()) != list(range(n_base)):
        raise ValueError("tiktoken ranks are not a permutation of 0..N-1")
    vocab, merges = _ranks_to_vocab_merges(ranks)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    for i, t in enumerate(LLAMA3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != n_base + i:
            raise AssertionError(f"special token {t} got id {tok.token_to_id(t)}, expected {n_base + i}")
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, n_base)],
            ),
        ]
    )
    tok.save(str(out_file))


def _tokenizer_config() -> dict:
    added = {
        str(128000 + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry("<|begin_of_text|>"), "eos_token": entry("<|eot_id|>")}


def _find_or_download_wheel(wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(wheel_dir.glob("llama_models-*.whl"))
    if not found:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "-d", str(wheel_dir), "llama-models",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(wheel_dir.glob("llama_models-*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                "could not download the llama-models wheel (needed for the Llama-3 tokenizer):\n"
                f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
            )
    return found[-1]


def _extract_model_file(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        member = _WHEEL_MEMBER if _WHEEL_MEMBER in names else None
        if member is None:
            cands = [n for n in names if n.endswith("llama3/tokenizer.model")]
            if not cands:
                raise RuntimeError(f"{wheel} has no llama3/tokenizer.model")
            member = cands[0]
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != LLAMA3_TOKENIZER_MODEL_SHA256:
        raise RuntimeError(f"{wheel}:{member} has sha256 {digest}, expected the Llama-3 file {LLAMA3_TOKENIZER_MODEL_SHA256}")
    dest.write_bytes(data)
    return dest


def llama3_tokenizer_dir(cache_root: str | os.PathLike) -> Path:
    """Return a directory holding a Llama-3-8B-Instruct style tokenizer.

    Files: ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` and the source ``tokenizer.model`` (tiktoken
    ranks). Built once under ``cache_root`` (the wheel is downloaded into
    ``cache_root/wheels`` if not there yet); later calls return the cached
    directory.

    Raises:
        RuntimeError: the wheel could not be downloaded or has an unexpected file.
    """
    cache_root = Path(cache_root).expanduser()
    out = cache_root / f"llama3-tokenizer-{_BUILD_VERSION}"
    if (out / ".complete").is_file():
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    wheel = _find_or_download_wheel(cache_root / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=".llama3-tok-", dir=cache_root))
    tmp.chmod(0o755)
    try:
        model_file = _extract_model_file(wheel, tmp / "tokenizer.model")
        ranks = load_llama3_ranks(model_file)
        _build_tokenizer_json(ranks, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False))
        (tmp / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(), indent=2))
        (tmp / ".complete").write_text("ok\n")
        if out.exists():  # a stale or half-written directory
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            # another process won the race; use its result
            if not (out / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":  # pragma: no cover
    root = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ARMORM_TEST_CACHE", "~/.cache/armorm-tests")
    print(llama3_tokenizer_dir(root))
