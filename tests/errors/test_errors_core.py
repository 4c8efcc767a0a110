"""Bad calls of the core's Model directly (armorm._core): batch layout, positions,
fields, token ids, constructor arguments; and the output plan it reports.
"""
from __future__ import annotations

import numpy as np
import pytest

from armorm import _core
from checkpoints import make_seqcls
from bad_input import NORM, VOCAB, load, ok_seq


# ---- the core's Model directly

def _tok(*ids):
    return np.array(ids, dtype=np.int32)


@pytest.mark.parametrize("cu,exc,match", [
    ([0, 2], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([1, 3], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([0, 4], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([0, 2, 2, 3], ValueError, r"sequence 1 is empty \(cu_seqlens must be strictly increasing\)"),
    ([0, 3, 1, 3], ValueError, r"sequence 1 is empty \(cu_seqlens must be strictly increasing\)"),
    ([0], ValueError, r"cu_seqlens must hold B\+1 offsets with B >= 1"),
    (np.zeros(0, dtype=np.int64), ValueError, r"cu_seqlens must hold B\+1 offsets with B >= 1"),
    ([[0, 3]], TypeError, r"cu_seqlens must be a 1-D integer array"),
    ([0, 1.5, 3], TypeError, r"cu_seqlens must be a 1-D integer array"),
    ("abc", TypeError, r"cu_seqlens must be a 1-D integer array"),
])
def test_core_forward_inconsistent_cu_seqlens(model, cu, exc, match):
    with pytest.raises(exc, match=match):
        model._core.forward(_tok(5, 6, 7), cu if isinstance(cu, (str, np.ndarray)) else np.array(cu),
                            fields=["hidden_state"])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(gating_pos=[5]), ValueError, r"sequence 0: gating position 5 outside its 3 tokens"),
    (dict(gating_pos=[0, 0]), ValueError, r"gating_pos must have B entries"),
    (dict(reward_pos=[-1], gating_pos=[0]), ValueError, r"sequence 0: reward position -1 outside its 3 tokens"),
    (dict(reward_pos=[0, 1], gating_pos=[0]), ValueError, r"reward_pos must have B entries"),
    (dict(), ValueError, r"gating positions are required for the ArmoRM head"),
    (dict(fields=["prompt_embedding"]), ValueError, r"field 'prompt_embedding' is not available"),
    (dict(gating_pos=[0], fields=["bogus"]), ValueError, r"field 'bogus' is not available for "
                                                          r"LlamaForRewardModelWithGating; available: rewards"),
    (dict(gating_pos=[0], fields=5), TypeError, r"fields must be a sequence of str"),
])
def test_core_forward_bad_positions_and_fields(model, kw, exc, match):
    with pytest.raises(exc, match=match):
        model._core.forward(_tok(5, 6, 7), np.array([0, 3]), **kw)


def test_core_forward_bad_tokens(model):
    cu = np.array([0, 3])
    with pytest.raises(ValueError, match=rf"sequence 0, position 2: token id {VOCAB} is outside the embedding"):
        model._core.forward(_tok(5, 6, VOCAB), cu, gating_pos=[0])
    with pytest.raises(ValueError, match=r"sequence 1, position 0: token id -4 is outside the embedding"):
        model._core.forward(_tok(5, 6, -4), np.array([0, 2, 3]), gating_pos=[0, 0])
    # int64 ids beyond int32 must not wrap around into valid ids (2**32 would become 0)
    with pytest.raises(ValueError, match=r"tokens\[2\]: token id 4294967296 is outside the embedding"):
        model._core.forward(np.array([5, 6, 2**32]), cu, gating_pos=[0])
    with pytest.raises(TypeError, match=r"tokens must be a 1-D integer array"):
        model._core.forward(np.array([5.0, 6.5, 7.0]), cu, gating_pos=[0])
    with pytest.raises(TypeError, match=r"tokens must be a 1-D integer array"):
        model._core.forward(np.array([[5, 6, 7]]), cu, gating_pos=[0])


def test_core_plans_the_fields(base, model, tmp_path):
    """The model description decides the fields; Python reads it (no table of its own)."""
    core = model._core
    assert core.fields == ("rewards", "gating_output", "score", "logits", "hidden_state", "prompt_embedding",
                           "all_hidden")
    assert core.plan() == (core.fields[:-1], True)  # default: all but all_hidden
    assert core.plan(["hidden_state"]) == (("hidden_state",), False)
    assert core.plan(["score"]) == (("score",), True)  # the ArmoRM head reads the gating position
    assert core.plan(["logits", "hidden_state"]) == (("logits", "hidden_state"), True)
    with pytest.raises(TypeError, match="fields must be a sequence of str"):
        core.plan("score")
    sc_dir = tmp_path / "sc"
    make_seqcls(sc_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(sc_dir) as sc:
        assert sc._core.fields == ("score", "logits", "hidden_state", "all_hidden")
        assert sc._core.plan() == (("score", "logits", "hidden_state"), False)
    with load(base, architecture="LlamaModel") as bb:
        assert bb._core.fields == ("hidden_state", "prompt_embedding", "all_hidden")


def test_core_forward_groups_match_one_call(model):
    """batch_tokens splits a call into packed groups; every row is what one group gives."""
    seqs = [np.array(ok_seq(n), dtype=np.int32) for n in (9, 30, 4, 17, 12)]
    toks = np.concatenate(seqs)
    cu = np.concatenate([[0], np.cumsum([s.size for s in seqs])]).astype(np.int64)
    gp = np.array([s.size - 3 for s in seqs], dtype=np.int64)
    fields = ["score", "logits", "hidden_state", "all_hidden"]
    whole = model._core.forward(toks, cu, None, gp, fields)
    calls = []
    grouped = model._core.forward(toks, cu, None, gp, fields, batch_tokens=32,
                                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (4, 5), (5, 5)]  # groups [9] [30] [4 17] [12]: at most 32 tokens each
    assert list(grouped) == fields
    for f in fields:
        np.testing.assert_array_equal(grouped[f], whole[f])
    np.testing.assert_array_equal(whole["logits"], whole["score"])  # ArmoRM: logits is the score
    assert whole["all_hidden"].shape == (toks.size, 32)

    def stop(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        model._core.forward(toks, cu, None, gp, fields, batch_tokens=32, progress=stop)
    with pytest.raises(TypeError, match="progress must be callable"):
        model._core.forward(toks, cu, None, gp, fields, progress=5)


def test_core_model_bad_constructor_arguments(base, model):
    files = [str(base / "model.safetensors")]
    cfg = dict(model.config.core)
    with pytest.raises(ValueError, match=r"dtype must be auto, float32, bfloat16 or float16, got 'int4'"):
        _core.Model(files, cfg, "int4", 1)
    with pytest.raises(ValueError, match=r"num_threads must be in 1\.\.1024, got 0"):
        _core.Model(files, cfg, "float32", 0)
    with pytest.raises(ValueError, match=r"paths must name 1\.\.100000 files"):
        _core.Model([], cfg, "float32", 1)
    with pytest.raises(TypeError, match=r"config must be a dict"):
        _core.Model(files, [1], "float32", 1)
    with pytest.raises(KeyError, match=r"config is missing 'hidden_size'"):
        _core.Model(files, {k: v for k, v in cfg.items() if k != "hidden_size"}, "float32", 1)
    with pytest.raises(TypeError, match=r"config 'hidden_size' must be a number"):
        _core.Model(files, dict(cfg, hidden_size="32"), "float32", 1)
    for bad in (1e300, 32.5, float("nan"), float("inf"), 2**40):
        with pytest.raises(ValueError, match=r"config 'hidden_size' must be an integer in the int32 range, got "
                                             r"(1e\+300|32\.5|nan|inf|1\.09951e\+12)"):
            _core.Model(files, dict(cfg, hidden_size=bad), "float32", 1)
    with pytest.raises(ValueError, match=r"config: arch / rope_type out of range"):
        _core.Model(files, dict(cfg, arch=9), "float32", 1)
    with pytest.raises(ValueError, match=r"nope\.safetensors: cannot open"):
        _core.Model([str(base / "nope.safetensors")], cfg, "float32", 1)
    with pytest.raises(TypeError, match=r"paths must be a sequence of str"):
        _core.Model(5, cfg, "float32", 1)
    m = _core.Model(files, cfg, "float32", 1)
    with pytest.raises(KeyError, match=r"no tensor named 'nope'"):
        m.tensor("nope")
    with pytest.raises(RuntimeError, match=r"Model already initialised"):
        m.__init__(files, cfg, "float32", 1)
    m.close()
    with pytest.raises(RuntimeError, match=r"model is closed"):
        m.forward(_tok(5, 6, 7), np.array([0, 3]))
    with pytest.raises(RuntimeError, match=r"model is closed"):
        m.tensor(NORM)
