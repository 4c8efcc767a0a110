"""armorm._core.gemm: op(a) @ op(b) with bf16-rounded operands and fp32 sums (training's GEMM).

Reference: float64 NumPy products of the operands rounded to bf16 by torch
(`.to(torch.bfloat16)`), so the only difference allowed is fp32 summation
error, bounded by the classical (K+1) u sum|products| (u = 2^-24).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from armorm import _core

PATHS = ["portable"] + ([_core.gemm_kernel()] if _core.gemm_kernel() != "portable" else [])


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


def bf16_round64(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def reference(a: np.ndarray, b: np.ndarray, ta: bool, tb: bool) -> np.ndarray:
    A = bf16_round64(a if a.dtype == np.float32 else (a.astype(np.uint32) << 16).view(np.float32))
    B = bf16_round64(b if b.dtype == np.float32 else (b.astype(np.uint32) << 16).view(np.float32))
    return (A.T if ta else A) @ (B.T if tb else B)


def operands(rng, M, N, K, ta, tb, dtype):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    if dtype == "bf16":
        a, b = bf16_bits(a), bf16_bits(b)
    return a, b


SHAPES = [(1, 1, 1), (13, 33, 65), (12, 32, 32), (100, 70, 31), (257, 129, 1025), (30, 17, 2)]


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gemm_matches_bf16_reference(kernel, ta, tb, dtype):
    rng = np.random.default_rng(hash((kernel, ta, tb, dtype)) % 2**32)
    for M, N, K in SHAPES:
        a, b = operands(rng, M, N, K, ta, tb, dtype)
        c = _core.gemm(a, b, trans_a=ta, trans_b=tb, num_threads=2, kernel=kernel)
        ref = reference(a, b, ta, tb)
        assert c.shape == (M, N) and c.dtype == np.float32
        # K exact products summed in fp32 in any order: |error| <= (K+1) 2^-24 sum|products| (a dropped
        # or doubled product breaks it)
        scale = np.abs(reference(np.abs(a) if dtype == "f32" else a & 0x7FFF,
                                 np.abs(b) if dtype == "f32" else b & 0x7FFF, ta, tb))
        assert np.all(np.abs(c - ref) <= 2.0 ** -24 * (K + 1) * scale), (M, N, K)


def test_gemm_rounds_fp32_operands_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bf16 values: it must round to 1 (even), 1 + 3 * 2^-8 to 1 + 2^-6
    a = np.array([[1 + 2 ** -8, 1 + 3 * 2 ** -8]], dtype=np.float32)
    for kernel in PATHS:
        c = _core.gemm(a, np.eye(2, dtype=np.float32), kernel=kernel)
        assert c.tolist() == [[1.0, 1 + 2 ** -6]], kernel


@pytest.mark.parametrize("kernel", PATHS)
def test_gemm_accumulate_and_out(kernel):
    rng = np.random.default_rng(1)
    a, b = operands(rng, 40, 50, 300, True, False, "bf16")
    out = rng.standard_normal((40, 50)).astype(np.float32)
    start = out.copy()
    r = _core.gemm(a, b, trans_a=True, out=out, accumulate=True, kernel=kernel)
    assert r is out
    ref = start + reference(a, b, True, False)
    assert np.allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    r = _core.gemm(a, b, trans_a=True, out=out, kernel=kernel)
    assert np.allclose(out, reference(a, b, True, False), rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gemm_bit_identical_across_threads_and_runs():
    rng = np.random.default_rng(2)
    for ta, tb in itertools.product([False, True], repeat=2):
        a, b = operands(rng, 300, 200, 700, ta, tb, "f32")
        c1 = _core.gemm(a, b, trans_a=ta, trans_b=tb, num_threads=1)
        c2 = _core.gemm(a, b, trans_a=ta, trans_b=tb, num_threads=2)
        c3 = _core.gemm(a, b, trans_a=ta, trans_b=tb, num_threads=3)
        assert np.array_equal(c1, c2) and np.array_equal(c1, c3)


def test_gemm_rows_do_not_depend_on_the_batch():
    # a row of op(a) gives the same output whatever other rows are multiplied with it
    rng = np.random.default_rng(3)
    a, b = operands(rng, 64, 48, 513, False, True, "f32")
    full = _core.gemm(a, b, trans_b=True, num_threads=2)
    part = _core.gemm(np.ascontiguousarray(a[5:18]), b, trans_b=True, num_threads=2)
    assert np.array_equal(full[5:18], part)


def test_gemm_empty_sizes():
    z = _core.gemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32))
    assert z.shape == (3, 4) and not z.any()
    out = np.ones((3, 4), np.float32)
    _core.gemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), out=out, accumulate=True)
    assert (out == 1).all()
    assert _core.gemm(np.zeros((0, 5), np.float32), np.zeros((5, 4), np.float32)).shape == (0, 4)


def test_gemm_bad_inputs():
    f = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="inner sizes differ"):
        _core.gemm(f, f)
    with pytest.raises(TypeError, match="float32 or uint16"):
        _core.gemm(f.astype(np.float64), f.T.copy())
    with pytest.raises(TypeError, match="NumPy array"):
        _core.gemm([[1.0]], f)
    with pytest.raises(ValueError, match="2-D"):
        _core.gemm(np.zeros(3, np.float32), f)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.gemm(f.T, f)
    with pytest.raises(ValueError, match="shape \\(3, 3\\)"):
        _core.gemm(f, f, trans_b=True, out=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="share memory"):
        big = np.zeros((4, 4), np.float32)
        _core.gemm(big, big, out=big)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        _core.gemm(f, f, trans_b=True, accumulate=True)
    with pytest.raises(ValueError, match="num_threads"):
        _core.gemm(f, f, trans_b=True, num_threads=-1)
    with pytest.raises(ValueError, match="kernel"):
        _core.gemm(f, f, trans_b=True, kernel="cuda")
    ro = np.zeros((3, 3), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _core.gemm(f, f, trans_b=True, out=ro)
