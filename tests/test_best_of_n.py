"""Shared prefixes (best-of-N): a prompt computed once gives every response exactly what scoring it alone gives.

Every comparison is np.array_equal (bit for bit) against scoring each full
sequence alone with sharing off, on every kernel path this CPU runs
(ARMORM_KERNEL=portable|avx2|avx512|avx512bf16; the others skip, naming the
path), for fp32 and bf16 weights. That sharing happened is checked on token
counts (`stats`, or the rows the core was given), never on timings.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import armorm
from armorm import ArmoRMPipeline
from armorm.model import GatingPatternError
from armorm.prefix import plan_batches
from checkpoints import make_armorm, make_seqcls
from reference import ALL_PATHS, PATTERN, runnable_paths

PATHS = runnable_paths()
PATH_PARAMS = [pytest.param(p, marks=pytest.mark.skipif(p not in PATHS, reason=f"this CPU cannot run the {p} "
                                                                                 "kernel path"))
               for p in ALL_PATHS]
VOCAB = 300


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("best_of_n")
    # GQA with 4 query heads per KV head (the avx512 task's row layout), head_dim 16; max_pos for 3000-token prompts
    kw = dict(heads=8, kv_heads=2, hidden=128, head_dim=16, inter=160, layers=2, max_pos=4096)
    out = {dt: make_armorm(root / f"armorm-{dt}", dtype=dt, **kw) for dt in ("float32", "bfloat16")}
    # families whose attention differs: Gemma-2 (sliding window 37 on every other layer, soft-capping), Qwen3
    # (q/k norms, a window on the upper layers); windows not multiples of the 16-query or 64-key blocks
    fam = dict(heads=4, kv_heads=2, hidden=64, head_dim=32, inter=96, layers=3)
    out["gemma2"] = make_armorm(root / "gemma2", family="gemma2", sliding_window=37, **fam)
    out["qwen3"] = make_armorm(root / "qwen3", family="qwen3", use_sliding_window=True, sliding_window=45,
                               max_window_layers=1, **fam)
    return out


def load(monkeypatch, path, tiny_path, **kw):
    monkeypatch.setenv("ARMORM_KERNEL", path)
    m = armorm.ArmoRM.from_pretrained(tiny_path, gating_pattern=PATTERN, num_threads=2, **kw)
    assert m._core.kernel == path
    return m


def ids(rng, n):
    return rng.integers(10, VOCAB, size=n).astype(np.int32)


def prompt(rng, n):
    """n tokens ending with the gating pattern (the final assistant header)."""
    p = ids(rng, n)
    p[-len(PATTERN):] = PATTERN
    return p


def alone(model, seqs, **kw):
    """Every field of every sequence, each scored by itself with sharing off."""
    outs = [model.score_sequences([s], share_prefixes=False, **kw) for s in seqs]
    return {f: np.concatenate([o[f] for o in outs]) for f in outs[0]}


def assert_same_as_alone(model, seqs, expect_computed=None, share=True, **kw):
    stats = {}
    together = model.score_sequences(seqs, share_prefixes=share, stats=stats, **kw)
    ref = alone(model, seqs, **{k: v for k, v in kw.items() if k == "fields"})
    assert set(together) == set(ref)
    for f in ref:
        assert together[f].dtype == ref[f].dtype
        assert np.array_equal(together[f], ref[f]), f"{f} differs from scoring alone"
    if expect_computed is not None:
        assert stats["tokens_computed"] == expect_computed, stats
    return stats


# ----------------------------------------------------------------------------- equality, every path and dtype


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 2, 8, 33])
def test_n_responses_equal_scoring_alone(monkeypatch, ckpts, path, dtype, n):
    rng = np.random.default_rng(n)
    model = load(monkeypatch, path, ckpts[dtype].path)
    P = prompt(rng, 150)
    # response lengths cross the 16-query and 64-key blocks; the first is 1 token
    lens = [1] + [int(x) for x in rng.integers(1, 90, size=n - 1)]
    seqs = [np.concatenate([P, ids(rng, k)]) for k in lens]
    shared = n >= 2
    expect = P.size + sum(lens) if shared else P.size + lens[0]
    stats = assert_same_as_alone(model, seqs, expect_computed=expect)
    assert stats["tokens_in"] == n * P.size + sum(lens)
    assert stats["shared_prefixes"] == (1 if shared else 0)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_prefix_of_several_thousand_tokens(monkeypatch, ckpts, path):
    rng = np.random.default_rng(3)
    model = load(monkeypatch, path, ckpts["bfloat16"].path)
    P = prompt(rng, 3000)
    lens = [1, 40, 77]
    seqs = [np.concatenate([P, ids(rng, k)]) for k in lens]
    assert_same_as_alone(model, seqs, expect_computed=P.size + sum(lens), batch_tokens=4096)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_token_prefix(monkeypatch, ckpts, path, dtype):
    rng = np.random.default_rng(4)
    model = load(monkeypatch, path, ckpts[dtype].path)
    seqs = []
    for i, k in enumerate((0, 1, 20, 70)):  # the gating pattern in each continuation, which start differently
        c = np.concatenate([[100 + i], PATTERN, ids(rng, k)]).astype(np.int32)
        seqs.append(np.concatenate([[7], c]).astype(np.int32))
    assert_same_as_alone(model, seqs, expect_computed=1 + sum(s.size - 1 for s in seqs), share=1)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_groups_mixed_with_ungrouped_sequences(monkeypatch, ckpts, path, dtype):
    rng = np.random.default_rng(5)
    model = load(monkeypatch, path, ckpts[dtype].path)
    A, B = prompt(rng, 60), prompt(rng, 130)
    group_a = [np.concatenate([A, ids(rng, k)]) for k in (5, 33)]
    group_b = [np.concatenate([B, ids(rng, k)]) for k in (1, 64, 17)]
    plain = [prompt(rng, k) for k in (3, 80, 200)]
    seqs = [plain[0], group_b[0], group_a[0], plain[1], group_b[1], group_a[1], plain[2], group_b[2]]
    expect = sum(p.size for p in plain) + A.size + 5 + 33 + B.size + 1 + 64 + 17
    assert_same_as_alone(model, seqs, expect_computed=expect)
    # the same under a budget that splits the groups across core calls
    assert_same_as_alone(model, seqs, batch_tokens=150)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gating_row_in_a_continuation_multi_turn(monkeypatch, ckpts, path, dtype):
    """A shared earlier turn (its assistant header included); each continuation holds the final header."""
    rng = np.random.default_rng(6)
    model = load(monkeypatch, path, ckpts[dtype].path)
    history = np.concatenate([prompt(rng, 50), ids(rng, 30)])  # first turn, answered
    seqs = []
    for k in (4, 25, 60):
        turn = np.concatenate([ids(rng, k), PATTERN, ids(rng, 1 + k % 7)]).astype(np.int32)
        seqs.append(np.concatenate([history, turn]))
    gpos = model.gating_positions(seqs)
    assert all(g >= history.size for g in gpos)
    assert_same_as_alone(model, seqs, expect_computed=history.size + sum(s.size - history.size for s in seqs))


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sequence_that_is_a_prefix_of_another_and_identical_sequences(monkeypatch, ckpts, path, dtype):
    rng = np.random.default_rng(7)
    model = load(monkeypatch, path, ckpts[dtype].path)
    P = prompt(rng, 90)
    long = np.concatenate([P, ids(rng, 50)])
    seqs = [long, long[:100].copy(), P.copy(), long.copy(), P.copy(), long[:95].copy()]
    # shared: long[:89] once (capped one short of P); then each keeps what follows
    stats = assert_same_as_alone(model, seqs)
    assert stats["tokens_computed"] < stats["tokens_in"] // 2, stats


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_two_levels_and_reward_positions_inside_the_prefix(monkeypatch, ckpts, path):
    """A system prompt shared by two prompts, each shared by its responses; reward rows read through prefixes."""
    rng = np.random.default_rng(8)
    model = load(monkeypatch, path, ckpts["float32"].path)
    system = ids(rng, 40)
    prompts = [np.concatenate([system, prompt(rng, 30 + 20 * i)]) for i in range(2)]
    seqs = [np.concatenate([p, ids(rng, k)]) for p in prompts for k in (3, 50, 9)]
    stats = assert_same_as_alone(model, seqs)
    assert stats["shared_prefixes"] == 3  # the system prompt, then each prompt
    rpos = [int(rng.integers(0, s.size)) for s in seqs]  # anywhere, often inside a shared prefix
    together = model.score_sequences(seqs, reward_pos=rpos)
    ref = [model.score_sequences([s], reward_pos=[r], share_prefixes=False) for s, r in zip(seqs, rpos)]
    for f in together:
        assert np.array_equal(together[f], np.concatenate([r[f] for r in ref])), f


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_families_with_sliding_windows(monkeypatch, ckpts, path, family):
    """Windows that reach back across a prefix's end, or not at all, read the same keys as alone."""
    rng = np.random.default_rng(14)
    model = load(monkeypatch, path, ckpts[family].path)
    system = ids(rng, 30)
    seqs = []
    for n in (70, 20):  # a prompt longer than the windows, one shorter
        p = np.concatenate([system, prompt(rng, n)])
        seqs += [np.concatenate([p, ids(rng, k)]) for k in (1, 15, 40, 90)]
    seqs.append(prompt(rng, 60))
    stats = assert_same_as_alone(model, seqs)
    assert stats["shared_prefixes"] == 3, stats


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sequence_classification(monkeypatch, tmp_path, path, dtype):
    make_seqcls(tmp_path / "seqcls", dtype=dtype, num_labels=3, heads=4, kv_heads=2, hidden=64, inter=96)
    monkeypatch.setenv("ARMORM_KERNEL", path)
    model = armorm.ArmoRM.from_pretrained(tmp_path / "seqcls")
    assert model.architecture == "LlamaForSequenceClassification"
    rng = np.random.default_rng(9)
    P = ids(rng, 100)
    seqs = [np.concatenate([P, ids(rng, k)]) for k in (1, 30, 70)] + [ids(rng, 20)]
    assert_same_as_alone(model, seqs, expect_computed=100 + 101 + 20)


def test_missing_gating_pattern_is_still_an_error(ckpts):
    model = armorm.ArmoRM.from_pretrained(ckpts["float32"].path, gating_pattern=PATTERN)
    rng = np.random.default_rng(10)
    P = prompt(rng, 40)
    bad = np.concatenate([ids(rng, 40), [1, 2]]).astype(np.int32)  # no pattern anywhere
    with pytest.raises(GatingPatternError, match="sequence 2: the gating pattern"):
        model.score_sequences([np.concatenate([P, ids(rng, 5)]), np.concatenate([P, ids(rng, 9)]), bad])


# ----------------------------------------------------------------------------- the core's batch description


def test_core_parent_checks(ckpts):
    model = armorm.ArmoRM.from_pretrained(ckpts["float32"].path, gating_pattern=PATTERN)
    core = model._core
    toks = np.arange(10, 20, dtype=np.int32)
    cu = np.array([0, 4, 10], dtype=np.int64)
    for parent in ([0, -1], [-1, 1], [-1, 5], [-2, -1]):
        with pytest.raises(ValueError, match="parent .* must be -1 or an earlier sequence"):
            core.forward(toks, cu, None, None, ["hidden_state"], parent=np.array(parent))
    with pytest.raises(ValueError, match="parent must have B entries"):
        core.forward(toks, cu, None, None, ["hidden_state"], parent=np.array([-1]))
    # positions are checked against the full sequence: 4 + 6 tokens
    core.forward(toks, cu, np.array([3, 9]), np.array([0, 2]), ["hidden_state"], parent=np.array([-1, 0]))
    with pytest.raises(ValueError, match="sequence 1: reward position 10 outside its 10 tokens"):
        core.forward(toks, cu, np.array([3, 10]), None, ["hidden_state"], parent=np.array([-1, 0]))
    # the full length counts against max_position_embeddings
    long = np.full(4096, 11, dtype=np.int32)
    with pytest.raises(ValueError, match="sequence 1 has 4097 tokens; the model allows at most 4096"):
        core.forward(np.concatenate([long, [12]]).astype(np.int32), np.array([0, 4096, 4097]), None, None,
                     ["hidden_state"], parent=np.array([-1, 0]))
    with pytest.raises(ValueError, match=r"sequence 1, position 8: token id 999 is outside the embedding"):
        bad = toks.copy()
        bad[8] = 999
        core.forward(bad, cu, None, None, ["hidden_state"], parent=np.array([-1, 0]))
    # groups: a prefix must be in the group of its continuations; budgets never split one from them
    with pytest.raises(ValueError, match="sequence 1 continues sequence 0 of an earlier group"):
        core.forward(toks, cu, None, None, ["hidden_state"], parent=np.array([-1, 0]), groups=np.array([1, 2]))
    with pytest.raises(ValueError, match="groups must end at the batch's 2 sequences"):
        core.forward(toks, cu, None, None, ["hidden_state"], groups=np.array([1]))
    whole = core.forward(toks, cu, None, None, ["hidden_state"], parent=np.array([-1, 0]))
    split = core.forward(toks, cu, None, None, ["hidden_state"], parent=np.array([-1, 0]), batch_tokens=4)
    assert np.array_equal(whole["hidden_state"], split["hidden_state"])


def test_core_parent_is_the_full_sequence(ckpts):
    """Direct: sequence 1 continuing 0 and 2 continuing 1 give rows of the full sequences, all_hidden included."""
    model = armorm.ArmoRM.from_pretrained(ckpts["float32"].path, gating_pattern=PATTERN)
    rng = np.random.default_rng(11)
    a, b, c = ids(rng, 70), ids(rng, 20), ids(rng, 9)
    toks = np.concatenate([a, b, c])
    cu = np.array([0, 70, 90, 99], dtype=np.int64)
    got = model._core.forward(toks, cu, None, None, ["hidden_state", "all_hidden"], parent=np.array([-1, 0, 1]))
    full = np.concatenate([a, b, c])
    ref = model._core.forward(full, np.array([0, 99]), None, None, ["hidden_state", "all_hidden"])
    assert np.array_equal(got["all_hidden"], ref["all_hidden"])  # rows 0..98 are positions 0..98 here
    assert np.array_equal(got["hidden_state"][2], ref["hidden_state"][0])
    assert np.array_equal(got["hidden_state"][1], ref["all_hidden"][89])
    assert np.array_equal(got["hidden_state"][0], ref["all_hidden"][69])


# ----------------------------------------------------------------------------- planning and packing


def test_plan_counts_a_prefix_once_and_keeps_groups_together():
    rng = np.random.default_rng(12)
    P = ids(rng, 100)
    group = [np.concatenate([P, ids(rng, 10)]) for _ in range(4)]  # 140 tokens computed
    other = [ids(rng, 90) for _ in range(3)]
    seqs = [other[0], *group, other[1], other[2]]
    plan = plan_batches(seqs, budget=200)
    assert plan.tokens_in == 90 * 3 + 110 * 4 and plan.tokens_computed == 90 * 3 + 140
    homes = [b for b in plan.batches if any(s in b.sequences for s in (1, 2, 3, 4))]
    assert len(homes) == 1 and sorted(homes[0].sequences.tolist())[:4] == [1, 2, 3, 4]
    for b in plan.batches:
        assert b.tokens.size <= 200
    # a group larger than the budget is split, each part carrying its prefix; nothing is lost
    plan = plan_batches(seqs, budget=125)
    scored = sorted(s for b in plan.batches for s in b.sequences.tolist())
    assert scored == list(range(7))
    # sharing off: the given order, one segment per sequence, as packing always did
    plan = plan_batches(seqs, budget=200, min_shared=0)
    assert [b.sequences.tolist() for b in plan.batches] == [[0, 1], [2], [3], [4, 5], [6]]
    assert all(b.parent is None for b in plan.batches)


def test_short_common_prefixes_are_not_shared_by_default():
    rng = np.random.default_rng(13)
    head = ids(rng, 8)  # shorter than DEFAULT_MIN_SHARED
    seqs = [np.concatenate([head, ids(rng, 30)]) for _ in range(3)]
    assert plan_batches(seqs, budget=1000).shared_segments == 0
    assert plan_batches(seqs, budget=1000, min_shared=8).shared_segments == 1


# ----------------------------------------------------------------------------- every entry point shares


class RecordingCore:
    """Wraps a _core.Model and records the tokens of every forward call."""

    def __init__(self, core):
        self._inner = core
        self.tokens = []

    def forward(self, tokens, *args, **kw):
        self.tokens.append(len(tokens))
        return self._inner.forward(tokens, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """armorm's toy model with its byte-level tokenizer and toy datasets."""
    from armorm.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("toy") / "tiny", datasets=True)


def messages(prompt_text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt_text}]


def test_call_pipeline_and_explicit_apis_share(toy):
    rm = ArmoRMPipeline(toy, device_map="cpu", torch_dtype="float32")
    model = rm.model
    rec = model._core = RecordingCore(model._core)
    prompt_msgs = messages("Name three colours of the rainbow, please.")
    answers = ["Red.", "Red, orange and yellow.", "Blue, green and violet, as in the rainbow."]
    convs = [prompt_msgs + [{"role": "assistant", "content": a}] for a in answers]
    seqs = rm.encode(convs)
    total = sum(s.size for s in seqs)
    ref = {f: np.concatenate([model.score_sequences([s], share_prefixes=False)[f] for s in seqs])
           for f in ("score", "rewards", "gating_output", "prompt_embedding", "hidden_state")}
    rec.tokens.clear()

    def check(out, what):
        for f in ref:
            assert np.array_equal(np.asarray(out[f]), ref[f]), (what, f)
        assert sum(rec.tokens) < total, (what, rec.tokens, total)
        rec.tokens.clear()

    check(rm.score_batch(convs), "score_batch")
    check(rm.score_responses(prompt_msgs, answers), "pipeline.score_responses")
    check(model([s.tolist() for s in seqs]), "model(list)")
    gp = int(model.gating_positions(seqs[:1])[0])
    check(model.score_responses(seqs[0][:gp + 5], [s[gp + 5:] for s in seqs]), "model.score_responses")
    with pytest.raises(ValueError, match="ends with an assistant message"):
        rm.score_responses(convs[0], answers)
    with pytest.raises(ValueError, match="responses is empty"):
        rm.score_responses(prompt_msgs, [])
    with pytest.raises(TypeError, match="response 1 must be a string"):
        rm.score_responses(prompt_msgs, ["a", 3])


def test_cli_score_shares(toy, tmp_path, monkeypatch):
    from armorm import cli
    rows = [{"id": i, "messages": messages("Say hello to the team today.") + [{"role": "assistant", "content": a}]}
            for i, a in enumerate(["Hello!", "Hello, team.", "Hi all, hello from me."])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    orig = armorm.ArmoRM.score_sequences

    def spy(self, seqs, *a, **kw):
        kw["stats"] = st = {}
        out = orig(self, seqs, *a, **kw)
        seen.append(st)
        return out

    monkeypatch.setattr(armorm.ArmoRM, "score_sequences", spy)
    assert cli.main(["score", "--model", str(toy), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                     "--dtype", "float32"]) == 0
    assert len(seen) == 1 and seen[0]["tokens_computed"] < seen[0]["tokens_in"]
    scores = [json.loads(x)["score"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    rm = ArmoRMPipeline(toy, device_map="cpu", torch_dtype="float32")
    alone_scores = [float(rm.model.score_sequences([s], share_prefixes=False)["score"][0])
                    for s in rm.encode([r["messages"] for r in rows])]
    assert scores == alone_scores


def test_rewardbench_and_prepare_stage2_share(toy, tmp_path):
    from armorm.train import stage2
    from armorm.train.rewardbench import scores_from_model
    from armorm.safetensors_io import SafetensorsFile
    data = toy / "data"
    model = armorm.ArmoRM.from_pretrained(toy, torch_dtype="float32")
    rec = model._core = RecordingCore(model._core)
    subsets, c, r = scores_from_model(model, str(data / "rewardbench.jsonl"))
    shared_tokens = sum(rec.tokens)
    rec.tokens.clear()
    model.min_shared_prefix = 0
    subsets0, c0, r0 = scores_from_model(model, str(data / "rewardbench.jsonl"))
    assert subsets == subsets0 and np.array_equal(c, c0) and np.array_equal(r, r0)
    assert shared_tokens < sum(rec.tokens)
    rec.tokens.clear()

    files = {}
    for share in (16, 0):
        model.min_shared_prefix = share
        files[share] = stage2.prepare(model, str(data / "pairs.jsonl"), str(tmp_path / f"pairs{share}"),
                                      torch_dtype="float32", embeddings_dtype="float32", quiet=True)
        files[share, "tokens"] = sum(rec.tokens)
        rec.tokens.clear()
    assert files[16, "tokens"] < files[0, "tokens"]
    a, b = SafetensorsFile(files[16]), SafetensorsFile(files[0])
    for name in ("embeddings", "prompt_embeddings", "row_index"):
        assert np.array_equal(a.read(name), b.read(name)), name


def test_benchmark_script_runs(tmp_path):
    """benchmarks/best_of_n.py end to end on a tiny shape (no transformers), so the real run does not find its bugs."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "best_of_n.py"), "--shape", "tiny",
                          "--prompt-len", "40", "--response-len", "8", "--n", "2,4", "--pairs", "3", "--threads", "1",
                          "--skip-hf", "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| best-of-") or line.startswith("| pairs")]
    assert len(rows) == 3, res.stdout
    works = [float(r.split("|")[4].strip().rstrip("x")) for r in rows]
    # prompt 40 + N x 8 computed for N x 48 tokens
    assert works[0] == pytest.approx(96 / 56, abs=0.01) and works[1] == pytest.approx(192 / 72, abs=0.01), rows
