"""Prepacked weights (docs/model.md, 'Prepacked weights'): the projection matrices held in the GEMM kernel's layout.

- Prepacked and packed-per-call give the same bits, for every output field,
  on every kernel path this CPU runs (ARMORM_KERNEL=portable|avx2|avx512|
  avx512bf16; the others skip, naming the path): fp32 checkpoints (auto),
  bf16 / f16 weights forced onto an fp32 kernel (prepack=True: converted on
  the way through the strip buffer), fp32 converted to bf16 at load, tensors
  at odd addresses; batch shapes that cross the kernels' token tiles and
  token blocks, k blocks and panel tails; 1 and 2 threads; the Qwen2, Qwen3
  and Gemma-2 families; shared-prefix batches (best-of-N).
- `prepacked_bytes` is the size of the layout computed here: whole panels of
  nw output columns, k rounded up to 16 steps.
- The auto rule: prepacked where the packed layout takes no more bytes per
  element than the held dtype (fp32 on any SIMD path, bf16 on avx512bf16),
  not bf16 or f16 weights on an fp32 kernel, never on the portable path
  (where prepack=True is an error) nor with prepack=False.
- NaN/inf in a packed matrix is still refused, counted exactly.
- Source pages: after a prepacked load the checkpoint's matrix pages are no
  longer mapped, and peak RSS never holds the packed copy and its source
  together (fresh processes, /proc/self/status; Linux only).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import armorm
from armorm.config import load_config
from checkpoints import make_armorm, make_backbone, make_seqcls
from reference import ALL_PATHS, PATTERN, random_conv, runnable_paths
from test_loading import load_rss, misalign, put_nonfinite

PATHS = runnable_paths()
PATH_PARAMS = [pytest.param(p, marks=pytest.mark.skipif(p not in PATHS, reason=f"this CPU cannot run the {p} "
                                                                                 "kernel path"))
               for p in ALL_PATHS]
SIMD_PARAMS = [p for p in PATH_PARAMS if p.values[0] != "portable"]
VOCAB = 300
ALL_FIELDS = ["rewards", "gating_output", "score", "logits", "hidden_state", "prompt_embedding", "all_hidden"]
#: output columns per packed panel of each SIMD path's kernels (csrc/cpu/matmul_avx2.c, matmul_avx512.c)
PANEL = {"avx2": 16, "avx512": 32, "avx512bf16": 32}
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
#: shapes with panel tails (rows not multiples of 16 or 32), several k blocks (down_proj: K = 600 > 512, not a
#: multiple of 256 or 512) and more tokens than a token block (1024)
SHAPE = dict(hidden=96, heads=4, kv_heads=2, head_dim=24, inter=600, layers=2, max_pos=2048)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepack")
    out = {dt: make_armorm(root / dt, dtype=dt, vocab=VOCAB, **SHAPE) for dt in ("float32", "bfloat16", "float16")}
    fam = dict(heads=4, kv_heads=2, hidden=64, head_dim=32, inter=96, layers=3, vocab=VOCAB)
    out["qwen2"] = make_armorm(root / "qwen2", family="qwen2", **fam)  # q/k/v biases
    out["qwen3"] = make_armorm(root / "qwen3", family="qwen3", use_sliding_window=True, sliding_window=45,
                               max_window_layers=1, **fam)
    out["gemma2"] = make_armorm(root / "gemma2", family="gemma2", sliding_window=37, **fam)
    return out


def load(monkeypatch, path, ckpt, prepack, threads=2, **kw):
    monkeypatch.setenv("ARMORM_KERNEL", path)
    m = armorm.ArmoRM.from_pretrained(ckpt, gating_pattern=PATTERN, num_threads=threads, prepack=prepack, **kw)
    assert m._core.kernel == path
    return m


def expected_bytes(cfg, path: str, held: str) -> int:
    """Bytes of every projection matrix packed for `path`'s kernel on weights held in `held`."""
    nw = PANEL[path]
    kstep = 2 if path == "avx512bf16" and held == "bfloat16" else 1
    H, I = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    QD, KD = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mats = [(QD, H), (KD, H), (KD, H), (H, QD), (I, H), (I, H), (H, I)]
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    per_layer = sum(cdiv(rows, nw) * cdiv(cdiv(cols, kstep), 16) * 16 * nw * 4 for rows, cols in mats)
    return per_layer * cfg.num_hidden_layers


def batches(rng):
    """Batch shapes: one short request, a mixed batch crossing token tiles, one sequence past a token block."""
    return [[random_conv(rng, 16, VOCAB)],
            [random_conv(rng, n, VOCAB) for n in (3, 5, 7, 12, 13, 37, 130)],
            [random_conv(rng, 1100, VOCAB)]]


def assert_identical(a, b, fields=None):
    for f in fields or a:
        assert np.array_equal(np.asarray(a[f]), np.asarray(b[f])), f"{f} differs"


def score_all(model, seqs, **kw):
    fields = [f for f in ALL_FIELDS if f in model._core.fields]
    return model.score_sequences(seqs, fields=fields, **kw)


# ----------------------------------------------------------------------------- same bits, every path


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_prepacked_bit_identical(monkeypatch, ckpts, path, threads):
    tiny = ckpts["float32"]
    off = load(monkeypatch, path, tiny.path, False, threads)
    auto = load(monkeypatch, path, tiny.path, None, threads)
    assert not off._core.prepacked and off.prepacked_bytes == 0
    if path == "portable":  # nothing to pack: the portable code reads the weights as held
        assert not auto._core.prepacked and auto.prepacked_bytes == 0
    else:
        assert auto._core.prepacked and auto.prepacked_bytes == expected_bytes(tiny.config, path, "float32")
    for seqs in batches(np.random.default_rng(threads)):
        a, b = score_all(off, seqs), score_all(auto, seqs)
        assert set(a) == set(ALL_FIELDS)
        assert_identical(a, b)


@pytest.mark.parametrize("path", SIMD_PARAMS)
@pytest.mark.parametrize("stored,held", [("bfloat16", None), ("float16", None), ("float32", "bfloat16"),
                                         ("float32", "float16"), ("bfloat16", "float32")])
def test_forced_and_converted_prepack_bit_identical(monkeypatch, ckpts, path, stored, held):
    """prepack=True on every dtype, including those auto leaves alone; conversion at load fused with the packing."""
    tiny = ckpts[stored]
    kw = {} if held is None else {"torch_dtype": held}
    off = load(monkeypatch, path, tiny.path, False, **kw)
    on = load(monkeypatch, path, tiny.path, True, **kw)
    assert on.prepacked_bytes == expected_bytes(tiny.config, path, held or stored)
    rng = np.random.default_rng(5)
    for seqs in batches(rng)[:2]:
        assert_identical(score_all(off, seqs), score_all(on, seqs))


@pytest.mark.parametrize("path", SIMD_PARAMS)
@pytest.mark.parametrize("stored,held", [("float32", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_misaligned_tensors_prepacked(monkeypatch, tmp_path, ckpts, path, stored, held):
    """Every tensor at an odd address: packed through the strip buffer, same bits."""
    tiny = ckpts[stored]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((tiny.path / "config.json").read_text())
    (odd / "model.safetensors").write_bytes((tiny.path / "model.safetensors").read_bytes())
    misalign(odd / "model.safetensors")
    kw = {} if held is None else {"torch_dtype": held}
    want = score_all(load(monkeypatch, path, tiny.path, False, **kw), batches(np.random.default_rng(6))[1])
    got = load(monkeypatch, path, odd, True, **kw)
    assert got._core.prepacked
    assert_identical(want, score_all(got, batches(np.random.default_rng(6))[1]))


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2"])
def test_families_prepacked_bit_identical(monkeypatch, ckpts, path, family):
    tiny = ckpts[family]
    off = load(monkeypatch, path, tiny.path, False)
    auto = load(monkeypatch, path, tiny.path, None)
    assert auto._core.prepacked == (path != "portable")
    if path != "portable":
        assert auto.prepacked_bytes == expected_bytes(tiny.config, path, "float32")
    seqs = batches(np.random.default_rng(7))[1] + [random_conv(np.random.default_rng(8), 300, VOCAB)]
    assert_identical(score_all(off, seqs), score_all(auto, seqs))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_shared_prefixes_unaffected(monkeypatch, ckpts, path):
    """Best-of-N batches (a prompt computed once) give the same bits prepacked, and equal scoring alone."""
    tiny = ckpts["float32"]
    off = load(monkeypatch, path, tiny.path, False)
    auto = load(monkeypatch, path, tiny.path, None)
    rng = np.random.default_rng(9)
    prompt = random_conv(rng, 150, VOCAB, gating_at=145)
    seqs = [np.concatenate([prompt, rng.integers(10, VOCAB, size=k)]) for k in (1, 20, 77, 3)]
    stats = {}
    together = auto.score_sequences(seqs, share_prefixes=True, stats=stats)
    assert stats["shared_prefixes"] == 1 and stats["tokens_computed"] == 150 + 101, stats
    assert_identical(together, off.score_sequences(seqs, share_prefixes=True))
    for i, s in enumerate(seqs):
        alone = auto.score_sequences([s], share_prefixes=False)
        for f in alone:
            assert np.array_equal(together[f][i], alone[f][0]), f


@pytest.mark.parametrize("path", SIMD_PARAMS)
def test_sequence_classification_and_backbone(monkeypatch, tmp_path, path):
    make_seqcls(tmp_path / "seqcls", num_labels=3, heads=4, kv_heads=2, hidden=64, inter=96)
    make_backbone(tmp_path / "bb", heads=4, kv_heads=2, hidden=64, inter=96)
    rng = np.random.default_rng(10)
    seqs = [random_conv(rng, n, VOCAB) for n in (3, 40, 17)]
    for d in ("seqcls", "bb"):
        off = load(monkeypatch, path, tmp_path / d, False)
        on = load(monkeypatch, path, tmp_path / d, None)
        assert on._core.prepacked
        assert_identical(score_all(off, seqs), score_all(on, seqs))


# ----------------------------------------------------------------------------- when it applies


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("stored,held", [("float32", None), ("bfloat16", None), ("float16", None),
                                         ("float32", "bfloat16"), ("bfloat16", "float32")])
def test_auto_rule(monkeypatch, ckpts, path, stored, held):
    """Auto: prepacked exactly where the packed bytes per element do not exceed the held dtype's."""
    held_dtype = held or stored
    m = load(monkeypatch, path, ckpts[stored].path, None, **({} if held is None else {"torch_dtype": held}))
    assert m.dtype == held_dtype
    packed_elem = 0 if path == "portable" else 2 if path == "avx512bf16" and held_dtype == "bfloat16" else 4
    applies = packed_elem and packed_elem <= ELEM[held_dtype]
    assert m._core.prepacked == bool(applies)
    assert m.prepacked_bytes == (expected_bytes(ckpts[stored].config, path, held_dtype) if applies else 0)
    assert load(monkeypatch, path, ckpts[stored].path, False).prepacked_bytes == 0


def test_prepack_true_on_the_portable_path_is_an_error(monkeypatch, ckpts):
    with pytest.raises(ValueError, match="prepack: the portable kernel path"):
        load(monkeypatch, "portable", ckpts["float32"].path, True)


def test_core_prepack_value_checked(ckpts):
    tiny = ckpts["float32"]
    cfg = dict(load_config(tiny.path).core, prepack=2)
    with pytest.raises(ValueError, match=r"prepack must be -1 \(auto\), 0 or 1, got 2"):
        armorm._core.Model([str(tiny.path / "model.safetensors")], cfg, "auto", 1)


def test_closed_model(ckpts):
    m = armorm.ArmoRM.from_pretrained(ckpts["float32"].path, gating_pattern=PATTERN)
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.prepacked_bytes


# ----------------------------------------------------------------------------- the load pass


@pytest.mark.parametrize("path", SIMD_PARAMS)
@pytest.mark.parametrize("stored,held", [("float32", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_nonfinite_in_a_packed_matrix_is_counted(monkeypatch, tmp_path, path, stored, held):
    kw = {} if held is None else {"torch_dtype": held}
    tiny = make_armorm(tmp_path / "m", dtype=stored, vocab=VOCAB, **SHAPE)
    name = "model.layers.1.mlp.down_proj.weight"
    f = tiny.path / "model.safetensors"
    n = tiny.config.hidden_size * tiny.config.intermediate_size
    positions = [0, 1, n // 3, n // 2 + 7, n - 1]
    put_nonfinite(f, name, getattr(torch, stored), positions, [float("nan"), float("inf"), float("-inf")] * 2)
    with pytest.raises(armorm.CheckpointError, match=rf"{name.replace('.', '[.]')}' holds 5 NaN/inf values"):
        load(monkeypatch, path, tiny.path, True, **kw)
    assert load(monkeypatch, path, tiny.path, True, check_finite=False, **kw)._core.prepacked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("path", SIMD_PARAMS)
def test_source_pages_released(monkeypatch, tmp_path, path):
    """fp32 matrices of 134 MB: prepacked, their pages leave the mapping and never sit next to the packed copy."""
    d = tmp_path / "m"
    make_backbone(d, dtype="float32", hidden=512, heads=8, kv_heads=2, inter=2048, layers=8, vocab=1000)
    size = (d / "model.safetensors").stat().st_size
    monkeypatch.setenv("ARMORM_KERNEL", path)  # (the child's environment)
    off = load_rss(d, prepack=False)
    on = load_rss(d, prepack=None)
    packed = on["prepacked_bytes"]
    assert off["prepacked_bytes"] == 0 and packed > 0.9 * size
    # held as stored, the scanned pages stay mapped; prepacked, only the small tensors' pages may
    assert off["after"]["RssFile"] - off["before"]["RssFile"] > 0.9 * size
    assert on["after"]["RssFile"] - on["before"]["RssFile"] < 8 * 2**20
    assert on["after"]["RssAnon"] - on["before"]["RssAnon"] > 0.9 * packed
    # peak: the packed copy plus a few chunks in flight, far from packed + source
    assert on["after"]["VmHWM"] - on["before"]["VmHWM"] < packed + 48 * 2**20


@pytest.mark.parametrize("path", SIMD_PARAMS)
def test_pipeline_passes_prepack(monkeypatch, tmp_path, path):
    from armorm.tiny import make_tiny_model
    d = make_tiny_model(tmp_path / "toy")  # with a tokenizer, as a pipeline needs
    monkeypatch.setenv("ARMORM_KERNEL", path)
    for prepack, packed in ((False, False), (None, True)):
        rm = armorm.ArmoRMPipeline(str(d), prepack=prepack, torch_dtype="float32")
        assert (rm.model.prepacked_bytes > 0) == packed
        rm.model.close()


def test_batch_jobs_do_not_prepack_the_library_does(monkeypatch, tmp_path):
    """Who prepacks (docs/model.md): the one-run batch jobs (CLI scoring, the evaluations, the preparations,
    Ray's actors) load with PREPACK_FOR_BATCH_JOBS (off); the library's default is auto, which prepacks the
    toy model's fp32 weights on a SIMD kernel path."""
    import json
    from armorm.cli import main as cli_main
    from armorm.model import PREPACK_FOR_BATCH_JOBS
    from armorm.tiny import make_tiny_model
    assert PREPACK_FOR_BATCH_JOBS is False
    toy = make_tiny_model(tmp_path / "tiny", datasets=True)
    data = toy / "data"
    loads = []
    original = armorm.ArmoRM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        m = original(cls, *a, **kw)
        loads.append((kw.get("prepack", "not given"), m.prepacked_bytes))
        return m

    monkeypatch.setattr(armorm.ArmoRM, "from_pretrained", classmethod(spy))
    rb2 = tmp_path / "rb2.jsonl"
    with open(rb2, "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": str(i), "subset": "Math", "prompt": f"What is {i} + 1?",
                                "chosen": [str(i + 1)], "rejected": ["7", "8", "9"], "num_correct": 1,
                                "total_completions": 4}) + "\n")
    commands = [
        ["score", "--model", toy],
        ["score", "--model", toy, "--input", data / "stage1.jsonl", "--output", tmp_path / "scores.jsonl"],
        ["prepare-stage1", "--model", toy, "--dataset", data / "stage1.jsonl", "--output", tmp_path / "s1"],
        ["prepare-stage2", "--model", toy, "--dataset", data / "pairs.jsonl", "--output", tmp_path / "s2"],
        ["eval-rewardbench", "--model", toy, "--dataset", data / "rewardbench.jsonl"],
        ["eval-rewardbench2", "--model", toy, "--dataset", rb2],
        ["prepare-rewardbench2", "--model", toy, "--dataset", rb2, "--output", tmp_path / "rb2"],
    ]
    for cmd in commands:
        loads.clear()
        assert cli_main([str(c) for c in cmd]) == 0, cmd
        assert loads and all(p is False and n == 0 for p, n in loads), (cmd, loads)
    try:
        import armorm.ray as aray
    except ImportError:
        aray = None
    if aray is not None:  # the actors' classes, constructed here as an actor constructs them
        loads.clear()
        aray.Scorer(toy, num_threads=1, dtype="float32")
        aray.Embedder(str(toy), str(data / "stage1.jsonl"), stage=1, num_threads=1, torch_dtype="float32")
        assert len(loads) == 2 and all(p is False and n == 0 for p, n in loads), loads
    loads.clear()
    pipe = armorm.ArmoRMPipeline(str(toy))
    simd = pipe.model._core.kernel != "portable"
    assert loads == [(None, pipe.model.prepacked_bytes)] and (pipe.model.prepacked_bytes > 0) == simd
