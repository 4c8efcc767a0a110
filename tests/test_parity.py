"""Parity of armorm's forward pass with transformers (torch CPU) on tiny random checkpoints.

Error measure: for each output field, max |armorm - reference| / max |reference|
over the whole field (normwise, so fields near zero do not blow up the ratio).
fp32 checkpoints: <= 1e-4. bf16 checkpoints: armorm's error against the fp32
computation on the same bf16 weights must not exceed transformers' own bf16
run's error by more than 10%, both measured normwise over the whole batch (per
sequence, the scalar score can sit near zero and turn rounding noise into
ratios above 100% for either side). On CPUs with AVX512_BF16 the default path
rounds activations to bf16 for the matmuls (as transformers bf16 does), so this
bound is what it is held to.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import armorm
from checkpoints import make_armorm, make_backbone, make_seqcls, reference_armorm_head
from conftest import LLAMA3_ROPE

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


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {
        "gqa1": make_armorm(root / "gqa1", heads=4, kv_heads=4),
        "gqa2": make_armorm(root / "gqa2", heads=4, kv_heads=2, shards=3),
        "gqa4": make_armorm(root / "gqa4", heads=8, kv_heads=2, hidden=64, head_dim=16, rope_scaling=LLAMA3_ROPE),
        "hd": make_armorm(root / "hd", heads=4, kv_heads=1, hidden=48, head_dim=24, rope_theta=500000.0),
    }


@pytest.mark.parametrize("name", ["gqa1", "gqa2", "gqa4", "hd"])
def test_fp32_parity_all_fields(ckpts, name):
    tiny = ckpts[name]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    rng = np.random.default_rng(1)
    seqs = [random_conv(rng, n, 300) for n in (5, 37, 130, 611)]
    out = model.score_sequences(seqs)
    for i, ids in enumerate(seqs):
        ref = reference(tiny, ids)
        for f in FIELDS:
            err = rel_err(np.asarray(out[f])[i], ref[f])
            assert err <= 1e-4, f"{name} seq {i} (len {len(ids)}) field {f}: rel err {err:.2e}"
        assert out.logits[i] == out.score[i]


def test_lengths_1_to_600(tmp_path):
    tiny = make_armorm(tmp_path / "m", heads=4, kv_heads=2, rope_scaling=LLAMA3_ROPE)
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 256, 400, 600, 700):
        ids = rng.integers(10, 300, size=n)
        ids[0] = PATTERN[0]
        model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN[:1])
        out = model(ids)
        with torch.no_grad():
            hs = tiny.backbone(torch.tensor(ids[None])).last_hidden_state[0]
        ref = reference_armorm_head(hs, n - 1, 0, tiny.head, 10.0, 3)
        for f in FIELDS:
            err = rel_err(np.asarray(out[f])[0], ref[f].numpy())
            assert err <= 1e-4, f"len {n} field {f}: rel err {err:.2e}"


def test_batch_equals_one_by_one(ckpts):
    tiny = ckpts["gqa2"]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    rng = np.random.default_rng(3)
    seqs = [random_conv(rng, n, 300) for n in (40, 3, 301, 17, 64, 65, 128, 9)]
    batched = model.score_sequences(seqs)
    small_batches = model.score_sequences(seqs, batch_tokens=100)  # different groupings
    for i, s in enumerate(seqs):
        alone = model.score_sequences([s])
        for f in FIELDS:
            # packing is exact: same bits whatever the batch
            np.testing.assert_array_equal(np.asarray(batched[f])[i], np.asarray(alone[f])[0], err_msg=f)
            np.testing.assert_array_equal(np.asarray(small_batches[f])[i], np.asarray(alone[f])[0], err_msg=f)


def test_thread_counts_agree(ckpts, monkeypatch):
    monkeypatch.setenv("ARMORM_PARALLEL_MIN_FLOPS", "0")  # tiny model: make every op really use its threads
    tiny = ckpts["gqa4"]
    rng = np.random.default_rng(4)
    seqs = [random_conv(rng, n, 300) for n in (70, 33)]
    outs = [armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, num_threads=t).score_sequences(seqs)
            for t in (1, 2, 3)]
    for o in outs[1:]:
        for f in FIELDS:
            np.testing.assert_array_equal(np.asarray(o[f]), np.asarray(outs[0][f]))


def test_padded_2d_equals_unpadded(tmp_path):
    pad = 299
    tiny = make_armorm(tmp_path / "m", pad_token_id=pad)
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    rng = np.random.default_rng(5)
    seqs = [random_conv(rng, n, 290) for n in (12, 30, 21)]
    L = max(map(len, seqs))
    right = np.full((3, L), pad)
    left = np.full((3, L), pad)
    mask_left = np.zeros((3, L), dtype=np.int64)
    for i, s in enumerate(seqs):
        right[i, :len(s)] = s
        left[i, L - len(s):] = s
        mask_left[i, L - len(s):] = 1
    unpadded = model.score_sequences(seqs)
    by_pad_rule = model(right)
    by_mask = model(left, attention_mask=mask_left)
    by_torch = model(torch.tensor(right))
    assert isinstance(by_torch.score, torch.Tensor)
    for f in FIELDS:
        np.testing.assert_array_equal(by_pad_rule[f], unpadded[f])
        np.testing.assert_array_equal(by_mask[f], unpadded[f])
        np.testing.assert_array_equal(by_torch[f].numpy(), unpadded[f])
    # and the right-padded batch matches the reference's own padded forward (pad rule: first pad - 1)
    with torch.no_grad():
        hs = tiny.backbone(torch.tensor(right)).last_hidden_state
    for i, s in enumerate(seqs):
        p_g = armorm.model.find_gating_position(s, PATTERN)
        ref = reference_armorm_head(hs[i], len(s) - 1, p_g, tiny.head, 10.0, 3)
        assert rel_err(by_pad_rule.score[i], ref["score"].numpy()) <= 1e-4


@pytest.mark.parametrize("shards", [1, 2])
def test_bf16_error_within_transformers_bf16(tmp_path, shards):
    tiny = make_armorm(tmp_path / "m", dtype="bfloat16", shards=shards, heads=4, kv_heads=2, hidden=96,
                       inter=160, layers=3)
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype=torch.bfloat16)
    assert model.dtype == "bfloat16"
    rng = np.random.default_rng(6)
    seqs = [random_conv(rng, n, 300) for n in (50, 200, 450)]
    out = model.score_sequences(seqs)
    for f, (ours, theirs) in bf16_errors(out, tiny, seqs).items():
        assert ours <= 1.1 * theirs, f"{f}: armorm bf16 err {ours:.2e} > 1.1 x transformers bf16 err {theirs:.2e}"


def test_fp32_checkpoint_held_in_bf16_matches_bf16_checkpoint(tmp_path):
    a = make_armorm(tmp_path / "f32", dtype="float32", seed=9)
    b = make_armorm(tmp_path / "bf16", dtype="bfloat16", seed=9)
    seqs = [random_conv(np.random.default_rng(7), 80, 300)]
    converted = armorm.ArmoRM.from_pretrained(a.path, gating_pattern=PATTERN, torch_dtype="bfloat16")
    stored = armorm.ArmoRM.from_pretrained(b.path, gating_pattern=PATTERN)
    assert stored.dtype == "bfloat16" and converted.dtype == "bfloat16"
    # backbone rounding is identical; the head stays fp32 in the converted model, so compare loosely there
    np.testing.assert_array_equal(converted.score_sequences(seqs).hidden_state, stored.score_sequences(seqs).hidden_state)


def test_f16_checkpoint(tmp_path):
    tiny = make_armorm(tmp_path / "m", dtype="float16")
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    assert model.dtype == "float16"
    ids = random_conv(np.random.default_rng(8), 90, 300)
    out = model(ids)
    ref = reference(tiny, ids)
    for f in FIELDS:
        assert rel_err(np.asarray(out[f])[0], ref[f]) <= 1e-4, f


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_backbone_save_pretrained(tmp_path, max_shard_size):
    hf = make_backbone(tmp_path / "bb", max_shard_size=max_shard_size, heads=4, kv_heads=2)
    if max_shard_size:
        assert (tmp_path / "bb" / "model.safetensors.index.json").exists()
    model = armorm.ArmoRM.from_pretrained(tmp_path / "bb", gating_pattern=PATTERN)
    assert model.architecture == "LlamaModel"
    rng = np.random.default_rng(9)
    seqs = [random_conv(rng, n, 300) for n in (20, 99)]
    out = model.score_sequences(seqs)
    assert set(out) == {"hidden_state", "prompt_embedding"}
    for i, s in enumerate(seqs):
        with torch.no_grad():
            hs = hf(torch.tensor(s[None])).last_hidden_state[0]
        assert rel_err(out.hidden_state[i], hs[-1].numpy()) <= 1e-4
        p = armorm.model.find_gating_position(s, PATTERN)
        assert rel_err(out.prompt_embedding[i], hs[p].numpy()) <= 1e-4


def test_armorm_checkpoint_as_backbone(ckpts):
    tiny = ckpts["gqa1"]
    full = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    bb = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, architecture="LlamaModel")
    seqs = [random_conv(np.random.default_rng(10), 60, 300)]
    out = bb.score_sequences(seqs)
    assert set(out) == {"hidden_state", "prompt_embedding"}
    np.testing.assert_array_equal(out.hidden_state, full.score_sequences(seqs).hidden_state)


@pytest.mark.parametrize("num_labels,dtype", [(1, "float32"), (3, "float32"), (1, "bfloat16")])
def test_sequence_classification(tmp_path, num_labels, dtype):
    pad = 0
    hf = make_seqcls(tmp_path / "sc", num_labels=num_labels, dtype=dtype, pad_token_id=pad, heads=4, kv_heads=1)
    model = armorm.ArmoRM.from_pretrained(tmp_path / "sc")
    assert model.architecture == "LlamaForSequenceClassification"
    rng = np.random.default_rng(11)
    seqs = [rng.integers(1, 300, size=n) for n in (7, 45, 120)]
    L = max(map(len, seqs))
    padded = np.full((3, L), pad)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    with torch.no_grad():
        ref = hf(torch.tensor(padded)).logits.numpy()  # transformers' own class and pad rule
    out = model(padded)
    assert out.logits.shape == (3, num_labels)
    if dtype == "float32":
        assert rel_err(out.logits, ref) <= 1e-4
    else:  # bf16: fp32 reference on the same rounded weights; bound by transformers' own bf16 error
        with torch.no_grad():
            theirs = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor(padded)).logits.float().numpy()
        assert rel_err(out.logits, ref) <= 1.1 * rel_err(theirs, ref)
    np.testing.assert_array_equal(out.score, out.logits[:, 0])
