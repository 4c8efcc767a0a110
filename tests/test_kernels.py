"""Every matmul/attention kernel path this CPU can run, forced with ARMORM_KERNEL.

Paths: portable (plain C), avx2 (fp32 FMA), avx512 (fp32 FMA), avx512bf16
(vdpbf16ps for bf16 weights, activations rounded to bf16; fp32 FMA otherwise).
For each one:
  - fp32 and f16 checkpoints, and bf16 ones on the fp32-arithmetic paths: every
    output field within 1e-5 (normwise) of the forced portable path;
  - bf16 checkpoints on avx512bf16: error against the fp32 computation on the
    same weights no more than 1.1x transformers' own bf16 error (as in
    test_parity.py);
  - a sequence's outputs are bit-identical scored alone, in a batch, in other
    batchings, and with 1, 2 or 3 threads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import armorm
from armorm import _core
from checkpoints import LLAMA3_ROPE, make_armorm
from reference import ALL_PATHS, FIELDS, PATTERN, bf16_errors, random_conv, rel_err, runnable_paths

PATHS = runnable_paths()
SIMD_PATHS = [p for p in PATHS if p != "portable"]


def load(monkeypatch, path, tiny, **kw):
    monkeypatch.setenv("ARMORM_KERNEL", path)
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, **kw)
    assert model._core.kernel == path
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    shapes = {
        # GQA 4 query heads per KV head, head_dim 16, llama3 rope
        "gqa": dict(heads=8, kv_heads=2, hidden=128, head_dim=16, inter=200, layers=2, rope_scaling=LLAMA3_ROPE),
        # odd sizes: head_dim 24 (not a multiple of 16), hidden 48, intermediate 100
        "odd": dict(heads=2, kv_heads=1, hidden=48, head_dim=24, inter=100, layers=2, rope_theta=500000.0),
        # head_dim 80 (two passes over the head dims, the second partial)
        "hd80": dict(heads=2, kv_heads=2, hidden=160, head_dim=80, inter=96, layers=1),
    }
    out = {}
    for name, kw in shapes.items():
        for dtype in ("float32", "bfloat16", "float16"):
            out[name, dtype] = make_armorm(root / f"{name}-{dtype}", dtype=dtype, **kw)
    return out


def seqs_for(seed):
    rng = np.random.default_rng(seed)
    # lengths around the tile sizes: 12-token GEMM tiles, 16-query blocks, 64-key blocks
    return [random_conv(rng, n, 300) for n in (3, 11, 13, 16, 17, 64, 65, 150)]


def test_default_is_the_best_path(monkeypatch, ckpts):
    tiny = ckpts["odd", "float32"]
    monkeypatch.delenv("ARMORM_KERNEL", raising=False)
    assert armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)._core.kernel == PATHS[-1]
    monkeypatch.setenv("ARMORM_KERNEL", "auto")
    assert armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)._core.kernel == PATHS[-1]


def test_unknown_path_is_an_error(monkeypatch, ckpts):
    monkeypatch.setenv("ARMORM_KERNEL", "avx1024")
    with pytest.raises(ValueError, match="ARMORM_KERNEL=avx1024 is not a kernel path"):
        armorm.ArmoRM.from_pretrained(ckpts["odd", "float32"].path, gating_pattern=PATTERN)


@pytest.mark.skipif(len(PATHS) == len(ALL_PATHS), reason="this CPU runs every path")
def test_path_the_cpu_lacks_is_an_error(monkeypatch, ckpts):
    missing = [p for p in ALL_PATHS if p not in PATHS][-1]
    monkeypatch.setenv("ARMORM_KERNEL", missing)
    with pytest.raises(ValueError, match="lacks the instructions"):
        armorm.ArmoRM.from_pretrained(ckpts["odd", "float32"].path, gating_pattern=PATTERN)


@pytest.mark.parametrize("path", SIMD_PATHS)
@pytest.mark.parametrize("name", ["gqa", "odd", "hd80"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_parity_with_portable(monkeypatch, ckpts, path, name, dtype):
    tiny = ckpts[name, dtype]
    seqs = seqs_for(1)
    ours = load(monkeypatch, path, tiny).score_sequences(seqs)
    if path == "avx512bf16" and dtype == "bfloat16":
        # activations rounded to bf16 for the matmuls: held to transformers bf16's error
        for f, (err, theirs) in bf16_errors(ours, tiny, seqs).items():
            assert err <= 1.1 * theirs, f"{f}: {path} bf16 err {err:.2e} > 1.1 x transformers bf16 err {theirs:.2e}"
        return
    ref = load(monkeypatch, "portable", tiny).score_sequences(seqs)
    for f in FIELDS:
        err = rel_err(ours[f], ref[f])
        assert err <= 1e-5, f"{path} {name} {dtype} field {f}: rel err {err:.2e} against portable"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_and_thread_bit_identity(monkeypatch, ckpts, path, dtype):
    tiny = ckpts["gqa", dtype]
    seqs = seqs_for(2)
    monkeypatch.setenv("ARMORM_PARALLEL_MIN_FLOPS", "0")  # tiny model: make every op really use its threads
    model = load(monkeypatch, path, tiny, num_threads=2)
    batched = model.score_sequences(seqs)
    regrouped = model.score_sequences(seqs, batch_tokens=70)
    for i, s in enumerate(seqs):
        alone = model.score_sequences([s])
        for f in FIELDS:
            np.testing.assert_array_equal(np.asarray(batched[f])[i], np.asarray(alone[f])[0], err_msg=f"{path} {f}")
            np.testing.assert_array_equal(np.asarray(regrouped[f])[i], np.asarray(alone[f])[0], err_msg=f"{path} {f}")
    for nt in (1, 3):
        other = load(monkeypatch, path, tiny, num_threads=nt).score_sequences(seqs)
        for f in FIELDS:
            np.testing.assert_array_equal(np.asarray(other[f]), np.asarray(batched[f]),
                                          err_msg=f"{path} {nt} threads {f}")


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_long_sequence_against_transformers(monkeypatch, ckpts, path):
    """Many key blocks and query blocks, fp32: each path stays within test_parity's 1e-4 of transformers."""
    tiny = ckpts["gqa", "float32"]
    ids = random_conv(np.random.default_rng(3), 700, 300)
    out = load(monkeypatch, path, tiny)(ids)
    with torch.no_grad():
        hs = tiny.backbone(torch.tensor(ids[None])).last_hidden_state[0]
    assert rel_err(np.asarray(out.hidden_state)[0], hs[-1].numpy()) <= 1e-4


def test_kernel_attribute_is_read_only(monkeypatch, ckpts):
    model = load(monkeypatch, "portable", ckpts["odd", "float32"])
    with pytest.raises(AttributeError):
        model._core.kernel = "avx512"
    model.close()
    with pytest.raises(RuntimeError):
        model._core.kernel
    assert isinstance(_core.Model.kernel.__doc__, str)
