"""The reference outputs and error measures the parity tests share (test_parity.py, test_kernels.py).

`reference(tiny, ids)`: one sequence through transformers' backbone plus the
ArmoRM head written out in torch (checkpoints.reference_armorm_head), in
fp32 or bf16. `rel_err`: the normwise error max |a - b| / max |b|.
`bf16_errors`: armorm's and transformers' bf16 errors against the fp32
computation on the same bf16 weights. `random_conv`: random ids with the tiny
checkpoints' gating pattern.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import armorm
from checkpoints import make_armorm, reference_armorm_head

PATTERN = [5, 6, 7]  # tiny checkpoints' gating pattern (the real one is tested with the real tokenizer)
FIELDS = ["rewards", "gating_output", "score", "hidden_state", "prompt_embedding"]


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_conv(rng, length, vocab, gating_at=None):
    ids = rng.integers(10, vocab, size=length)
    g = gating_at if gating_at is not None else max(0, length - len(PATTERN) - rng.integers(0, max(1, length // 3)))
    ids[g:g + len(PATTERN)] = PATTERN[: length - g]
    return ids


def reference(tiny, ids, dtype=torch.float32):
    """Reference outputs for one sequence, from transformers + the docs/model.md head, in `dtype`."""
    # a copy: .to(bfloat16) also rounds the RoPE frequency buffer, for good
    bb = copy.deepcopy(tiny.backbone).to(dtype) if dtype != torch.float32 else tiny.backbone
    head = {k: v.to(dtype) for k, v in tiny.head.items()}
    with torch.no_grad():
        hs = bb(torch.tensor(np.asarray(ids)[None])).last_hidden_state[0]
        p_g = armorm.model.find_gating_position(ids, PATTERN)
        out = reference_armorm_head(hs, len(ids) - 1, p_g, head, tiny.head_cfg["temperature"],
                                    tiny.head_cfg["n_hidden"])
    return {k: v.float().numpy() for k, v in out.items()}


def bf16_errors(out, tiny, seqs):
    """{field: (armorm's error, transformers bf16's error)} against the fp32 computation on the same
    bf16 weights, each normwise over the whole batch: max |diff| / max |reference| over all sequences."""
    refs = [reference(tiny, s) for s in seqs]
    theirs = [reference(tiny, s, torch.bfloat16) for s in seqs]
    errs = {}
    for f in FIELDS:
        ref = np.stack([r[f] for r in refs])
        ours = np.stack([np.asarray(out[f])[i] for i in range(len(seqs))])
        errs[f] = (rel_err(ours, ref), rel_err(np.stack([t[f] for t in theirs]), ref))
    return errs


# --------------------------------------------------------------------------- kernel paths

ALL_PATHS = ["portable", "avx2", "avx512", "avx512bf16"]


def runnable_paths():
    """The paths this CPU runs: loading with a path it lacks raises ValueError naming ARMORM_KERNEL."""
    return [p for p in ALL_PATHS if _probe(p)]


_probe_cache = {}


def _probe(path):
    if path not in _probe_cache:
        old = os.environ.get("ARMORM_KERNEL")
        os.environ["ARMORM_KERNEL"] = path
        try:
            with tempfile.TemporaryDirectory() as d:
                tiny = make_armorm(Path(d) / "m", layers=1, hidden=16, heads=2, kv_heads=1, inter=16, vocab=20)
                try:
                    m = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
                    _probe_cache[path] = m._core.kernel == path
                    m.close()
                except ValueError as e:
                    assert "ARMORM_KERNEL" in str(e)
                    _probe_cache[path] = False
        finally:
            if old is None:
                os.environ.pop("ARMORM_KERNEL", None)
            else:
                os.environ["ARMORM_KERNEL"] = old
    return _probe_cache[path]
