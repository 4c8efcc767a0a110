"""Parity of armorm's CUDA backend (device_map="cuda") with transformers on the same GPU.

Tiny random checkpoints (tests/checkpoints.py). Error measure as in
test_parity.py: per output field, max |ours - ref| / max |ref| over the whole
batch, where ref is the fp32 computation (transformers fp32 on the GPU, TF32
off) on the same stored weights. The CUDA backend computes in bf16 with fp32
accumulation, so it is held to transformers' own bf16 run on the same GPU:
armorm's error must not exceed transformers' bf16 error by more than 10%.

The checkpoints cover both attention kernels: head_dim 16, 64 and 128 take
the tensor-core kernel, head_dim 24 the portable one; sequence lengths cross
the 64-query tile boundaries. Skipped, with the reason, where
armorm._core.cuda_device_count() is 0 or torch has no CUDA.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from armorm import _core

N_DEV = getattr(_core, "cuda_device_count", lambda: 0)()
pytestmark = pytest.mark.skipif(N_DEV == 0, reason="armorm._core.cuda_device_count() == 0: no CUDA device (or a "
                                                   "CPU-only build); the CUDA parity tests need a GPU")

torch = pytest.importorskip("torch")
if N_DEV and not torch.cuda.is_available():
    pytest.skip("torch has no CUDA here: the transformers reference cannot run on the GPU", allow_module_level=True)

import armorm  # noqa: E402
from checkpoints import make_armorm, make_seqcls, reference_armorm_head  # noqa: E402
from conftest import LLAMA3_ROPE  # noqa: E402

PATTERN = [5, 6, 7]
FIELDS = ["rewards", "gating_output", "score", "hidden_state", "prompt_embedding"]
LENGTHS = [3, 9, 64, 65, 130, 257, 700]  # one token past a tile, several tiles, long enough for the GPU to matter


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_conv(rng, length, vocab):
    ids = rng.integers(10, vocab, size=length)
    g = max(0, length - len(PATTERN) - int(rng.integers(0, max(1, length // 3))))
    ids[g:g + len(PATTERN)] = PATTERN[: length - g]
    return ids


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    # the fp32 reference must be fp32: no TF32 in matmuls or convolutions
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def gpu_reference(tiny, seqs, dtype):
    """transformers on cuda + the docs/model.md head, one sequence per forward, in `dtype`."""
    bb = copy.deepcopy(tiny.backbone).to("cuda", dtype).eval()
    head = {k: v.to("cuda", dtype) for k, v in tiny.head.items()}
    outs = []
    with torch.no_grad():
        for ids in seqs:
            hs = bb(torch.tensor(np.asarray(ids)[None], device="cuda")).last_hidden_state[0]
            p_g = armorm.model.find_gating_position(ids, PATTERN)
            out = reference_armorm_head(hs, len(ids) - 1, p_g, head, tiny.head_cfg["temperature"],
                                        tiny.head_cfg["n_hidden"])
            outs.append({k: v.float().cpu().numpy() for k, v in out.items()})
    del bb
    torch.cuda.empty_cache()
    return {f: np.stack([o[f] for o in outs]) for f in FIELDS}


CKPTS = {
    # name: (storage dtype, config); head_dim = hidden / heads unless given
    "hd16_gqa2_f32": ("float32", dict(hidden=64, heads=4, kv_heads=2)),
    "hd16_gqa4_llama3_bf16": ("bfloat16", dict(hidden=128, heads=8, kv_heads=2, rope_scaling=LLAMA3_ROPE)),
    "hd24_portable_bf16": ("bfloat16", dict(hidden=48, heads=4, kv_heads=1, head_dim=24, rope_theta=500000.0)),
    "hd64_mha_f32": ("float32", dict(hidden=128, heads=2, kv_heads=2, inter=256)),
    "hd128_gqa2_bf16": ("bfloat16", dict(hidden=256, heads=2, kv_heads=1, inter=512, rope_theta=500000.0)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_parity")
    return {name: make_armorm(root / name, dtype=dt, **kw) for name, (dt, kw) in CKPTS.items()}


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(7)
    return [random_conv(rng, n, 300) for n in LENGTHS]


@pytest.mark.parametrize("name", sorted(CKPTS))
def test_cuda_error_within_transformers_bf16_error(ckpts, seqs, name):
    tiny = ckpts[name]
    model = armorm.ArmoRM.from_pretrained(tiny.path, device_map="cuda", gating_pattern=PATTERN)
    try:
        assert model.device == "cuda:0"
        ours = model.score_sequences(seqs)
    finally:
        model.close()
    ref = gpu_reference(tiny, seqs, torch.float32)
    theirs = gpu_reference(tiny, seqs, torch.bfloat16)
    report = {}
    for f in FIELDS:
        e_ours, e_theirs = rel_err(ours[f], ref[f]), rel_err(theirs[f], ref[f])
        report[f] = (e_ours, e_theirs)
    bad = {f: v for f, v in report.items() if not v[0] <= 1.1 * v[1] + 1e-7}
    assert not bad, f"armorm error > 1.1 x transformers bf16 error (ours, theirs): {bad}; all: {report}"


def test_cuda_batching_does_not_change_a_sequence(ckpts, seqs):
    tiny = ckpts["hd128_gqa2_bf16"]
    model = armorm.ArmoRM.from_pretrained(tiny.path, device_map="cuda", gating_pattern=PATTERN)
    try:
        together = model.score_sequences(seqs)
        alone = [model.score_sequences([s]) for s in seqs]
    finally:
        model.close()
    theirs = gpu_reference(tiny, seqs, torch.bfloat16)
    ref = gpu_reference(tiny, seqs, torch.float32)
    for f in FIELDS:
        solo = np.concatenate([a[f] for a in alone])
        # cuBLAS may pick other kernels for other row counts: equal up to rounding, inside the bf16 error
        assert rel_err(together[f], solo) <= max(rel_err(theirs[f], ref[f]), 1e-6), f


def test_cuda_matches_cpu_backend_fp32(ckpts, seqs):
    """The same checkpoint on the CPU backend (fp32) and on the GPU (bf16): within bf16 rounding."""
    tiny = ckpts["hd16_gqa2_f32"]
    cpu = armorm.ArmoRM.from_pretrained(tiny.path, device_map="cpu", gating_pattern=PATTERN, torch_dtype="float32")
    gpu = armorm.ArmoRM.from_pretrained(tiny.path, device_map="cuda", gating_pattern=PATTERN)
    try:
        a, b = cpu.score_sequences(seqs), gpu.score_sequences(seqs)
    finally:
        cpu.close()
        gpu.close()
    theirs = gpu_reference(tiny, seqs, torch.bfloat16)
    for f in FIELDS:
        assert rel_err(b[f], a[f]) <= 1.1 * rel_err(theirs[f], a[f]) + 1e-7, f


def test_cuda_seqcls_logits(tmp_path, seqs):
    hf = make_seqcls(tmp_path / "seqcls", dtype="bfloat16", num_labels=3)
    model = armorm.ArmoRM.from_pretrained(tmp_path / "seqcls", device_map="cuda")
    try:
        ours = model.score_sequences(seqs, fields=["logits", "score"])
    finally:
        model.close()
    refs, theirs = [], []
    for dt, acc in ((torch.float32, refs), (torch.bfloat16, theirs)):
        m = copy.deepcopy(hf).to("cuda", dt).eval()
        with torch.no_grad():
            for ids in seqs:
                acc.append(m(torch.tensor(np.asarray(ids)[None], device="cuda")).logits[0].float().cpu().numpy())
        del m
    ref, th = np.stack(refs), np.stack(theirs)
    assert rel_err(ours["logits"], ref) <= 1.1 * rel_err(th, ref) + 1e-7
    np.testing.assert_array_equal(ours["score"], ours["logits"][:, 0])


def test_cuda_bad_device_index_is_a_clear_error(ckpts):
    with pytest.raises(RuntimeError, match=r"cuda:99.*CUDA device"):
        armorm.ArmoRM.from_pretrained(ckpts["hd16_gqa2_f32"].path, device_map="cuda:99", gating_pattern=PATTERN)


def test_cuda_invalid_batch_is_a_value_error(ckpts):
    model = armorm.ArmoRM.from_pretrained(ckpts["hd16_gqa2_f32"].path, device_map="cuda", gating_pattern=PATTERN)
    try:
        with pytest.raises(ValueError, match="outside the embedding"):
            model.score_sequences([[5, 6, 7, 100000]])
    finally:
        model.close()
