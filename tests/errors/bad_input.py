"""What the bad-input tests share: the tiny checkpoints' sizes, raw safetensors editing, loading.

Checkpoint defects are made by corrupting tiny checkpoints from `checkpoints.py`
(the low-level ones by writing raw safetensors bytes: an 8-byte little-endian
header length, the JSON header, the data section).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import armorm

PATTERN = [5, 6, 7]  # the tiny checkpoints' gating pattern
VOCAB = 64
MAX_POS = 64
TINY = dict(hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB, max_pos=MAX_POS,
            gating_hidden=8, gating_n_hidden=1)
NORM = "model.norm.weight"  # [32] F32
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [32, 32] F32


# ---------------------------------------------------------------------------- raw safetensors helpers

def st_read(path: Path):
    """(header dict, data section bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_pack(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def st_write(path: Path, header: dict, data: bytes) -> None:
    path.write_bytes(st_pack(header, data))


def st_tensors(path: Path):
    """{name: (dtype, shape, bytes)} of a safetensors file (metadata dropped)."""
    header, data = st_read(path)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def st_build(tensors) -> bytes:
    """A consistent safetensors file from {name: (dtype, shape, bytes)}, offsets laid out in order."""
    header, chunks, off = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        chunks.append(blob)
        off += len(blob)
    return st_pack(header, b"".join(chunks))


def edit_header(path: Path, fn) -> None:
    """Rewrites `path` with fn(header) applied; the data section is kept byte for byte."""
    header, data = st_read(path)
    fn(header)
    st_write(path, header, data)


def load(path, **kw):
    kw.setdefault("gating_pattern", PATTERN)
    kw.setdefault("num_threads", 1)
    return armorm.ArmoRM.from_pretrained(path, **kw)


def edit_config(d: Path, **changes) -> None:
    """Sets keys of d/config.json; a value of `...` deletes the key."""
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def ok_seq(n: int = 8) -> list:
    """A valid token sequence for the tiny checkpoints (pattern at the end)."""
    return [10 + i % 40 for i in range(n - 3)] + PATTERN
