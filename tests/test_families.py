"""Qwen2, Qwen3 and Gemma-2 backbones against transformers (torch CPU), on tiny random checkpoints.

Each family is a set of switches of the one forward pass (armorm/config.py maps
config.json onto them); these tests hold each family to its transformers
class, with the error measure of test_parity.py (normwise per field):
fp32 <= 1e-4; bf16 no more than 1.1x transformers' own bf16 error.

- the ArmoRM head on every family (`<Family>ForRewardModelWithGating`), all
  output fields, sequences of 1 to 700 tokens; Gemma-2 with a sliding window
  (48, and windows that do not divide the kernels' blocks) far shorter than
  the sequences, its attention soft-capping and query_pre_attn_scalar; Qwen
  with use_sliding_window on the upper layers;
- every kernel path this CPU runs (ARMORM_KERNEL), each against transformers;
- `*ForSequenceClassification` with transformers' own pad rule, `*Model`,
  `*ForCausalLM` with tied and untied embeddings;
- packed and padded batches bit-identical to single runs, any thread count;
- that the tests can fail: the same weights with soft-capping, the window or
  the (1 + w) norm offset switched off miss the reference by far more than the
  tolerance;
- Gemma's embedding scale rounded to bf16 for bf16 weights, as transformers does;
- malformed family configs: a CheckpointError naming the key.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

import armorm
from armorm.config import CheckpointError
from checkpoints import (FAMILIES, hf_class, make_armorm, make_backbone, make_causallm, make_seqcls,
                         reference_armorm_head)
from reference import FIELDS, PATTERN, bf16_errors, random_conv, reference, rel_err, runnable_paths

# tiny shapes per family; Gemma-2's window (48) is much shorter than the sequences below
SHAPES = {
    "qwen2": dict(hidden=64, heads=4, kv_heads=2, inter=96, layers=2),
    "qwen3": dict(hidden=64, heads=4, kv_heads=2, head_dim=24, inter=96, layers=2, rope_theta=1000000.0),
    "qwen3_sliding": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=3, use_sliding_window=True,
                          sliding_window=40, max_window_layers=1),
    "gemma2": dict(hidden=48, heads=4, kv_heads=2, head_dim=16, inter=96, layers=3),
    "gemma2_window37": dict(hidden=64, heads=4, kv_heads=1, head_dim=32, inter=128, layers=2, sliding_window=37,
                            query_pre_attn_scalar=32),
    "gemma2_window100": dict(hidden=64, heads=8, kv_heads=2, head_dim=16, inter=128, layers=2, sliding_window=100,
                             attn_logit_softcapping=1.5),
}
FAMILY_OF = {name: name.split("_")[0] for name in SHAPES}
LENGTHS = (3, 4, 17, 64, 65, 130, 257, 600, 700)  # (1 and 2 tokens: test_one_and_two_tokens)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_armorm(root / name, family=FAMILY_OF[name], seed=i, **kw)
            for i, (name, kw) in enumerate(SHAPES.items())}


def seqs_for(seed, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [random_conv(rng, n, 300) for n in lengths]


def assert_parity(out, tiny, seqs, tol=1e-4, what=""):
    for i, ids in enumerate(seqs):
        ref = reference(tiny, ids)
        for f in FIELDS:
            err = rel_err(np.asarray(out[f])[i], ref[f])
            assert err <= tol, f"{what} seq {i} (len {len(ids)}) field {f}: rel err {err:.2e}"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_fp32_parity_lengths_1_to_700(ckpts, name):
    tiny = ckpts[name]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    assert model.architecture == FAMILIES[FAMILY_OF[name]] + "ForRewardModelWithGating"
    assert model.config.family == FAMILY_OF[name]
    seqs = seqs_for(1)
    out = model.score_sequences(seqs)
    assert_parity(out, tiny, seqs, what=name)
    np.testing.assert_array_equal(out.logits, out.score)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma2"])
def test_one_and_two_tokens(ckpts, name):
    """Sequences shorter than the gating pattern: a one-token pattern at the first token."""
    tiny = ckpts[name]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN[:1])
    for ids in (np.array([PATTERN[0]]), np.array([PATTERN[0], 77])):
        out = model(ids)
        with torch.no_grad():
            hs = tiny.backbone(torch.tensor(ids[None])).last_hidden_state[0]
        ref = reference_armorm_head(hs, len(ids) - 1, 0, tiny.head, tiny.head_cfg["temperature"],
                                    tiny.head_cfg["n_hidden"])
        for f in FIELDS:
            assert rel_err(np.asarray(out[f])[0], ref[f].numpy()) <= 1e-4, (name, len(ids), f)


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("name", ["gemma2_window37", "qwen3_sliding"])
def test_every_kernel_path_honours_the_family(monkeypatch, ckpts, name, path):
    """Window, soft-capping, q/k norms on each path this CPU has (fp32 weights: every path is fp32 arithmetic)."""
    monkeypatch.setenv("ARMORM_KERNEL", path)
    tiny = ckpts[name]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    assert model._core.kernel == path
    seqs = seqs_for(2, (3, 16, 17, 37, 38, 64, 65, 150, 333))
    assert_parity(model.score_sequences(seqs), tiny, seqs, what=f"{name}/{path}")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2"])
def test_bf16_error_within_transformers_bf16(tmp_path, family):
    kw = dict(SHAPES[family], hidden=96, inter=160)
    if family == "gemma2":
        kw["sliding_window"] = 64  # (sqrt(96) is not a bf16 number: the embedding scale rounds too)
    tiny = make_armorm(tmp_path / "m", family=family, dtype="bfloat16", seed=5, **kw)
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype=torch.bfloat16)
    assert model.dtype == "bfloat16"
    seqs = seqs_for(6, (50, 200, 450))
    out = model.score_sequences(seqs)
    for f, (ours, theirs) in bf16_errors(out, tiny, seqs).items():
        assert ours <= 1.1 * theirs, f"{family} {f}: armorm bf16 err {ours:.2e} > 1.1 x transformers {theirs:.2e}"


@pytest.mark.parametrize("name", ["qwen3", "gemma2_window100"])
def test_packed_and_padded_batches_equal_single_runs(ckpts, name, monkeypatch, tmp_path):
    monkeypatch.setenv("ARMORM_PARALLEL_MIN_FLOPS", "0")  # tiny model: make every op really use its threads
    tiny = ckpts[name]
    seqs = seqs_for(3, (40, 3, 301, 17, 64, 65, 128, 9, 230))
    models = [armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, num_threads=t) for t in (1, 2, 3)]
    alone = [models[0].score_sequences([s]) for s in seqs]
    for m in models:
        for batched in (m.score_sequences(seqs), m.score_sequences(seqs, batch_tokens=100)):
            for i in range(len(seqs)):
                for f in FIELDS:
                    np.testing.assert_array_equal(np.asarray(batched[f])[i], np.asarray(alone[i][f])[0], err_msg=f)
    # a padded 2-D batch (the ArmoRM pad rule: first pad minus one) and an attention_mask, left-padded
    pad = 299
    padded_model = armorm.ArmoRM.from_pretrained(_edited_copy(tiny.path, tmp_path / "pad", pad_token_id=pad),
                                                 gating_pattern=PATTERN)
    rng = np.random.default_rng(4)
    short = [random_conv(rng, n, 290) for n in (12, 30, 21, 5)]
    L = max(map(len, short))
    right, left, mask = np.full((4, L), pad), np.full((4, L), pad), np.zeros((4, L), np.int64)
    for i, s in enumerate(short):
        right[i, :len(s)] = s
        left[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    unpadded = padded_model.score_sequences(short)
    for f in FIELDS:
        np.testing.assert_array_equal(padded_model(right)[f], unpadded[f])
        np.testing.assert_array_equal(padded_model(left, attention_mask=mask)[f], unpadded[f])


def _edited_copy(src, dst, **changes):
    """The checkpoint at `src` with config.json keys changed (`...`: removed); weights linked."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            os.symlink(p, dst / p.name)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name,change", [
    ("gemma2_window100", dict(attn_logit_softcapping=None)),              # no soft-capping
    ("gemma2", dict(sliding_window=100000)),                             # no window
    ("qwen3_sliding", dict(use_sliding_window=False, layer_types=...)),  # no window
    ("gemma2", dict(query_pre_attn_scalar=16)),                          # the usual 1/sqrt(head_dim) instead
])
def test_the_parity_tests_can_fail(ckpts, tmp_path, name, change):
    """Switching a family feature off on the same weights misses the reference by far more than 1e-4."""
    tiny = ckpts[name]
    d = _edited_copy(tiny.path, tmp_path / "edited", **change)
    seqs = seqs_for(4, (300, 600))
    out = armorm.ArmoRM.from_pretrained(d, gating_pattern=PATTERN).score_sequences(seqs)
    worst = max(rel_err(np.asarray(out["hidden_state"])[i], reference(tiny, s)["hidden_state"])
                for i, s in enumerate(seqs))
    assert worst > 1e-2, f"{name} with {change}: still within {worst:.1e} of the reference"


def test_norm_offset_matters(ckpts, tmp_path):
    """Gemma's (1 + w) norms: reading the same weights as a plain w-scaled norm misses the reference."""
    tiny = ckpts["gemma2"]
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    cfg = dict(model.config.core, norm_offset=0)
    core = armorm._core.Model(armorm.config.weight_files(tiny.path), cfg, "float32", 1)
    seqs = seqs_for(5, (100,))
    toks = np.concatenate(seqs).astype(np.int32)
    res = core.forward(toks, np.array([0, len(toks)]), None, None, ["hidden_state"], 0)
    assert rel_err(res["hidden_state"][0], reference(tiny, seqs[0])["hidden_state"]) > 1e-2
    assert rel_err(model.score_sequences(seqs).hidden_state[0], reference(tiny, seqs[0])["hidden_state"]) <= 1e-4


def test_gemma2_bf16_embedding_scale_is_rounded_like_transformers(tmp_path, monkeypatch):
    """transformers multiplies bf16 embeddings by sqrt(H) cast to bf16 (sqrt(96) = 9.798 -> 9.8125); so does armorm,
    and the fp32 path keeps the exact fp32 scale."""
    monkeypatch.setenv("ARMORM_KERNEL", "portable")  # fp32 arithmetic on the bf16 weights: only the scale differs
    hf = make_backbone(tmp_path / "bb", family="gemma2", dtype="bfloat16", hidden=96, heads=4, kv_heads=2,
                       head_dim=24, inter=128, layers=2)
    seqs = seqs_for(7, (90,))
    ours = armorm.ArmoRM.from_pretrained(tmp_path / "bb", gating_pattern=PATTERN)
    assert ours.dtype == "bfloat16"
    as_bf16 = hf_class("gemma2", "Model").from_pretrained(tmp_path / "bb", dtype=torch.bfloat16).float().eval()
    assert float(as_bf16.embed_tokens.embed_scale) == 9.8125
    with torch.no_grad():
        want = as_bf16(torch.tensor(seqs[0][None])).last_hidden_state[0, -1].numpy()
        exact = hf(torch.tensor(seqs[0][None])).last_hidden_state[0, -1].numpy()  # fp32 scale sqrt(96)
    got = ours.score_sequences(seqs).hidden_state[0]
    assert rel_err(got, want) <= 1e-5
    assert rel_err(exact, want) > 2e-4  # the rounding is visible at this tolerance
    fp32 = armorm.ArmoRM.from_pretrained(tmp_path / "bb", gating_pattern=PATTERN, torch_dtype="float32")
    assert rel_err(fp32.score_sequences(seqs).hidden_state[0], exact) <= 1e-5


@pytest.mark.parametrize("family,dtype", [("qwen2", "float32"), ("qwen3", "float32"), ("gemma2", "float32"),
                                          ("gemma2", "bfloat16"), ("qwen3", "bfloat16")])
def test_sequence_classification(tmp_path, family, dtype):
    """<Family>ForSequenceClassification against transformers' own class and pad rule (last non-pad token);
    Gemma2ForSequenceClassification applies no final logit soft-capping (the reference class does not)."""
    pad = 0
    kw = dict(SHAPES[family], num_labels=3, pad_token_id=pad)
    hf = make_seqcls(tmp_path / "sc", family=family, dtype=dtype, **kw)
    model = armorm.ArmoRM.from_pretrained(tmp_path / "sc")
    assert model.architecture == FAMILIES[family] + "ForSequenceClassification"
    assert model.config.pad_rule == "last_non_pad"
    rng = np.random.default_rng(11)
    seqs = [rng.integers(1, 300, size=n) for n in (7, 45, 120, 333)]
    L = max(map(len, seqs))
    padded = np.full((len(seqs), L), pad)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    with torch.no_grad():
        ref = hf(torch.tensor(padded)).logits.numpy()
    out = model(padded)
    assert out.logits.shape == (len(seqs), 3)
    if dtype == "float32":
        assert rel_err(out.logits, ref) <= 1e-4
    else:
        with torch.no_grad():
            theirs = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor(padded)).logits.float().numpy()
        assert rel_err(out.logits, ref) <= 1.1 * rel_err(theirs, ref)
    np.testing.assert_array_equal(out.score, out.logits[:, 0])
    np.testing.assert_array_equal(model.score_sequences(seqs).logits, out.logits)  # padding changes nothing


@pytest.mark.parametrize("family,tie", [("qwen3", True), ("qwen3", False), ("gemma2", True), ("qwen2", False)])
def test_causallm_and_bare_model_backbones(tmp_path, family, tie):
    """*ForCausalLM (lm_head stored only when untied; read, never computed) and a bare *Model: hidden states."""
    kw = SHAPES[family]
    hf = make_causallm(tmp_path / "lm", family=family, tie=tie, **kw)
    from armorm.safetensors_io import SafetensorsFile
    names = set()
    for f in armorm.config.weight_files(tmp_path / "lm"):
        names |= set(SafetensorsFile(f).keys())
    assert ("lm_head.weight" in names) == (not tie)
    bare = make_backbone(tmp_path / "bb", family=family, seed=3, **kw)
    seqs = seqs_for(8, (20, 99))
    for path, ref_model, arch in ((tmp_path / "lm", hf.model, "ForCausalLM"), (tmp_path / "bb", bare, "Model")):
        model = armorm.ArmoRM.from_pretrained(path, gating_pattern=PATTERN)
        assert model.architecture == FAMILIES[family] + arch
        out = model.score_sequences(seqs)
        assert set(out) == {"hidden_state", "prompt_embedding"}
        for i, s in enumerate(seqs):
            with torch.no_grad():
                hs = ref_model(torch.tensor(s[None])).last_hidden_state[0]
            assert rel_err(out.hidden_state[i], hs[-1].numpy()) <= 1e-4
            p = armorm.model.find_gating_position(s, PATTERN)
            assert rel_err(out.prompt_embedding[i], hs[p].numpy()) <= 1e-4


def test_backbone_only_of_a_family_armorm(ckpts):
    """architecture="LlamaModel" (any family's *Model) keeps the checkpoint's family and drops the head."""
    tiny = ckpts["gemma2"]
    full = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN)
    seqs = seqs_for(9, (60,))
    for arch in ("LlamaModel", "Gemma2Model"):
        bb = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, architecture=arch)
        out = bb.score_sequences(seqs)
        assert set(out) == {"hidden_state", "prompt_embedding"}
        np.testing.assert_array_equal(out.hidden_state, full.score_sequences(seqs).hidden_state)


def test_qwen2_biases_are_required(tmp_path):
    """Qwen2 always has q/k/v biases and never an o bias: a missing one is named; an o bias is unexpected."""
    make_backbone(tmp_path / "q2", family="qwen2", **SHAPES["qwen2"])
    from armorm.safetensors_io import SafetensorsFile, save_file
    f = armorm.config.weight_files(tmp_path / "q2")[0]
    sf = SafetensorsFile(f)
    tensors = {k: sf.read(k) for k in sf.keys()}
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.k_proj.bias"))
    for edit, match in (("drop", rf"missing tensor '{key}'"), ("o_bias", r"unexpected tensor '.*o_proj\.bias'")):
        t = dict(tensors)
        if edit == "drop":
            del t[key]
        else:
            t[key.replace("k_proj", "o_proj")] = np.zeros(SHAPES["qwen2"]["hidden"], np.float32)
        d = tmp_path / edit
        d.mkdir()
        shutil.copy(tmp_path / "q2" / "config.json", d / "config.json")
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=match):
            armorm.ArmoRM.from_pretrained(d, gating_pattern=PATTERN)


# config.json edits that must fail, per family, and the key the error must name
MALFORMED = [
    ("gemma2", dict(query_pre_attn_scalar=...), r"'query_pre_attn_scalar' is required"),
    ("gemma2", dict(query_pre_attn_scalar=None), r"'query_pre_attn_scalar' must be a positive number"),
    ("gemma2", dict(query_pre_attn_scalar=-4), r"'query_pre_attn_scalar' must be positive"),
    ("gemma2", dict(sliding_window=...), r"'sliding_window' is required"),
    ("gemma2", dict(sliding_window=0), r"'sliding_window' must be positive"),
    ("gemma2", dict(attn_logit_softcapping=...), r"'attn_logit_softcapping' is required"),
    ("gemma2", dict(attn_logit_softcapping="50"), r"'attn_logit_softcapping' must be a finite number"),
    ("gemma2", dict(final_logit_softcapping=0), r"'final_logit_softcapping' must be positive or null"),
    ("gemma2", dict(head_dim=...), r"'head_dim' is required for gemma2"),
    ("gemma2", dict(hidden_activation="gelu"), r"hidden_activation 'gelu' is not supported"),
    ("gemma2", dict(use_bidirectional_attention=True), r"'use_bidirectional_attention' is true"),
    ("gemma2", dict(layer_types=["full_attention"]), r"'layer_types' must list"),
    ("gemma2", dict(model_type="llama"), r"model_type 'llama' contradicts architecture 'Gemma2ForRewardModel"),
    ("qwen3", dict(head_dim=...), r"'head_dim' is required for qwen3"),
    ("qwen3", dict(hidden_act="gelu_pytorch_tanh"), r"hidden_act 'gelu_pytorch_tanh' is not supported"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=None), r"'use_sliding_window' is true but 'sliding_window'"),
    ("qwen3", dict(layer_types=["sliding_attention", "full_attention"], use_sliding_window=False),
     r"'layer_types' lists sliding_attention layers but 'use_sliding_window'"),
    ("qwen3", dict(layer_types=["full_attention", "cross_attention"]), r"'layer_types' must list"),
    ("qwen3", dict(attention_bias="yes"), r"'attention_bias' must be true or false"),
    ("qwen3", dict(model_type="qwen2"), r"model_type 'qwen2' contradicts architecture 'Qwen3ForRewardModel"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=-1), r"'sliding_window' is -1; it must be a positive"),
    ("qwen2", dict(max_window_layers="x", use_sliding_window=True, sliding_window=32),
     r"'max_window_layers' must be an integer"),
    ("qwen2", dict(hidden_size=...), r"'hidden_size' is required"),
]


@pytest.mark.parametrize("family,edit,match", MALFORMED)
def test_malformed_family_config_names_the_key(tmp_path_factory, family, edit, match):
    src = _family_armorm(tmp_path_factory, family)
    d = _edited_copy(src, tmp_path_factory.mktemp("bad") / "m", **edit)
    with pytest.raises(CheckpointError, match=match):
        armorm.ArmoRM.from_pretrained(d, gating_pattern=PATTERN)


_FAMILY_DIRS = {}


def _family_armorm(tmp_path_factory, family):
    if family not in _FAMILY_DIRS:
        _FAMILY_DIRS[family] = make_armorm(tmp_path_factory.mktemp(family) / "m", family=family,
                                           **dict(SHAPES[family], layers=2)).path
    return _FAMILY_DIRS[family]
