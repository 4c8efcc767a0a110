"""Stage 2 (debiasing + gating network), RewardBench arithmetic and checkpoint assembly.

The hand-written backward pass is checked against finite differences
(float64) and one AdamW step against a torch reimplementation (torch is a
test dependency only); the debiasing against scipy's spearmanr; RewardBench
sections against hand-computed numbers from docs/rewardbench.md's table; and the whole
flow (prepare-stage2 -> train-stage1 -> train-stage2 -> assemble -> load)
on a tiny random backbone with the real Llama-3 tokenizer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import armorm
from armorm import cli
from armorm.data import DatasetError
from armorm.safetensors_io import SafetensorsFile, load_file, save_file
from armorm.train import rewardbench as rb
from armorm.train import stage1, stage2
from armorm.train.stage2 import (GatingConfig, bt_loss_and_grad, debias_penalties, init_gating,
                                 reward_transform_matrix, train_gating)
from checkpoints import make_backbone
from test_stage1 import OBJ, make_records, write_jsonl

# the gating network's matmul backends this CPU uses ("core" needs AVX512_BF16)
BACKENDS = ["numpy"] + (["core"] if armorm._core.gemm_kernel() != "portable" else [])


# ----------------------------------------------------------------------------- gradients


def _small(dtype=np.float64, H=7, D=5, K=4, n_hidden=3, seed=0):
    cfg = GatingConfig(hidden_dim=D, n_hidden=n_hidden)
    rng = np.random.default_rng(seed)
    p = init_gating(H, K, cfg, rng, dtype=dtype)
    p["gating.logit_scale"][0] = 1.3
    for k in p:  # larger weights so the softmax is not flat
        p[k] *= 3
    x = rng.standard_normal((9, H)).astype(dtype)
    delta = rng.standard_normal((9, K)).astype(dtype)
    masks = [(rng.random((9, D)) >= 0.2).astype(dtype) for _ in range(n_hidden)]
    return cfg, p, x, delta, masks


@pytest.mark.parametrize("use_masks", [False, True])
def test_backward_matches_finite_differences(use_masks):
    cfg, p, x, delta, masks = _small()
    m = masks if use_masks else None
    ks = 1 / 0.8 if use_masks else 1.0
    T = 2.0
    _, grads, _ = bt_loss_and_grad(p, x, delta, cfg.n_hidden, T, m, ks)
    eps = 1e-6
    for name, val in p.items():
        num = np.zeros_like(val)
        for i in np.ndindex(val.shape):
            old = val[i]
            val[i] = old + eps
            lp, _, _ = bt_loss_and_grad(p, x, delta, cfg.n_hidden, T, m, ks, want_grad=False)
            val[i] = old - eps
            lm, _, _ = bt_loss_and_grad(p, x, delta, cfg.n_hidden, T, m, ks, want_grad=False)
            val[i] = old
            num[i] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(grads[name], num, rtol=1e-5, atol=1e-8, err_msg=name)


def test_one_training_step_equals_torch():
    torch = pytest.importorskip("torch")
    cfg, p, x, delta, masks = _small(np.float64, H=11, D=6, K=5)
    T, lr = 10.0, 1e-3
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p.items()}
    opt_t = torch.optim.AdamW(list(tp.values()), lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    opt_n = stage2.AdamW(p, lr, (0.9, 0.999), 1e-8, 0.0)
    for step in range(3):
        rate = stage2.cosine_lr(lr, step, 5)
        for group in opt_t.param_groups:
            group["lr"] = rate
        h = torch.tensor(x)
        for j in range(cfg.n_hidden + 1):
            h = h @ tp[f"gating.layers.{j}.weight"].T + tp[f"gating.layers.{j}.bias"]
            if j < cfg.n_hidden:
                h = torch.nn.functional.relu(h) * torch.tensor(masks[j]) / 0.8
        g = torch.softmax(h / T, dim=1) * tp["gating.logit_scale"]
        d = (g * torch.tensor(delta)).sum(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(d, torch.ones_like(d))
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()
        lval, grads, _ = bt_loss_and_grad(p, x, delta, cfg.n_hidden, T, masks, 1 / 0.8)
        assert lval == pytest.approx(loss.item(), rel=1e-12)
        opt_n.step(p, grads, rate)
        for k in p:
            np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


def test_fused_adamw_equals_torch_float32():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p = {"w": rng.standard_normal((37, 29)).astype(np.float32), "b": rng.standard_normal(70001).astype(np.float32)}
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p.items()}
    opt_t = torch.optim.AdamW(list(tp.values()), lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    opt_c = stage2.AdamW(p, 1e-2, (0.8, 0.99), 1e-6, 0.05, fused=True, num_threads=2)
    for step in range(4):
        rate = stage2.cosine_lr(1e-2, step, 6)
        for group in opt_t.param_groups:
            group["lr"] = rate
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) * (step + 1) for k, v in p.items()}
        for k in p:
            tp[k].grad = torch.tensor(grads[k])
        opt_t.step()
        opt_c.step(p, grads, rate)
        for k in p:  # float32 arithmetic in both; a few ulps apart at most
            np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
            np.testing.assert_allclose(opt_c.v[k], opt_t.state[tp[k]]["exp_avg_sq"].numpy(), rtol=1e-5, err_msg=k)


@pytest.mark.skipif("core" not in BACKENDS, reason="this CPU has no AVX512_BF16: the core backend is not used")
def test_core_backend_gradients_match_float64_to_bf16_precision():
    cfg, p, x, delta, masks = _small(np.float64, H=96, D=48, K=6)
    x = np.concatenate([x] * 8)  # batch 72
    delta = np.concatenate([delta] * 8)
    masks = [np.concatenate([m] * 8) for m in masks]
    l64, g64, _ = bt_loss_and_grad(p, x, delta, cfg.n_hidden, 10.0, masks, 1 / 0.8)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    mm = stage2.matmul_backend("core")
    l32, g32, _ = bt_loss_and_grad(p32, x.astype(np.float32), delta.astype(np.float32), cfg.n_hidden, 10.0,
                                   [m.astype(np.float32) for m in masks], 1 / 0.8, mm=mm)
    assert l32 == pytest.approx(l64, rel=1e-2)
    for k in g64:  # bf16 operands (8-bit mantissa): ~0.4% per rounding, a few layers deep
        err = np.linalg.norm(g32[k] - g64[k]) / np.linalg.norm(g64[k])
        assert err < 3e-2, (k, err)


def test_matmul_backend_names():
    assert stage2.matmul_backend("numpy").name == "numpy"
    assert stage2.matmul_backend("auto").name == ("core-bf16" if "core" in BACKENDS else "numpy")
    with pytest.raises(ValueError, match="backend"):
        stage2.matmul_backend("torch")


def test_training_is_deterministic_per_seed():
    rng = np.random.default_rng(1)
    P = rng.standard_normal((300, 8)).astype(np.float32)
    delta = rng.standard_normal((300, 3)).astype(np.float32)
    cfg = GatingConfig(hidden_dim=8, steps=5, batch_size=32)
    a, _, _ = train_gating(P, delta, cfg)
    b, _, _ = train_gating(P, delta, cfg)
    c, _, _ = train_gating(P, delta, GatingConfig(hidden_dim=8, steps=5, batch_size=32, seed=1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- planted gating


def planted(n=6000, H=16, K=4, seed=0):
    """Prompts from K clusters; cluster c's preferences follow objective c (plus a little of the rest)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((K, H)) * 3
    c = rng.integers(0, K, n)
    P = (centers[c] + rng.standard_normal((n, H))).astype(np.float32)
    mix = np.full((K, K), 0.05) + np.eye(K) * 0.8
    ra, rb_ = rng.standard_normal((n, K)), rng.standard_normal((n, K))
    u = np.einsum("nk,nk->n", mix[c], ra - rb_)
    prefer_a = rng.random(n) < 1 / (1 + np.exp(-4 * u))  # Bradley-Terry draws
    chosen = np.where(prefer_a[:, None], ra, rb_)
    rejected = np.where(prefer_a[:, None], rb_, ra)
    rule = np.einsum("nk,nk->n", mix[c], chosen - rejected) > 0
    return P, (chosen - rejected).astype(np.float32), rule


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_gating_is_learned_and_the_public_formulation_cannot(backend):
    from sklearn.linear_model import LogisticRegression
    P, delta, rule = planted()
    cfg = GatingConfig(hidden_dim=64, steps=600, batch_size=256, lr=3e-3, eval_every=0, backend=backend)
    params, rep, _ = train_gating(P, delta, cfg)
    assert rep["matmul"] == stage2.matmul_backend(backend).name
    tr, va = stage1.train_test_split_indices(len(P), 0.2, 0)
    rule_acc = rule[va].mean()
    d = stage2.evaluate_d(params, P, delta, va, cfg.n_hidden, cfg.temperature, mm=stage2.matmul_backend(backend))
    acc = stage2.pair_accuracy(d)
    assert acc == pytest.approx(rep["val_accuracy"])
    # best single fixed weighting: a logistic regression on the reward differences (both orientations)
    X = np.concatenate([delta[tr], -delta[tr]])
    y = np.concatenate([np.ones(tr.size), np.zeros(tr.size)])
    w = LogisticRegression(fit_intercept=False).fit(X, y).coef_[0]
    fixed = max(stage2.pair_accuracy(delta[va] @ w),
                max(stage2.pair_accuracy(delta[va][:, k]) for k in range(delta.shape[1])))
    print(f"planted gating ({backend}): rule {rule_acc:.3f}, trained {acc:.3f}, best fixed weighting {fixed:.3f}")
    assert acc >= rule_acc - 0.03
    assert acc >= fixed + 0.10
    # the public script: softmax over the chosen/rejected axis of a [B, 2, K] output -> every weight 0.5 * scale
    h = np.stack([P[va], P[va]], axis=1)  # [B, 2, H]: chosen and rejected prompt embeddings
    for j in range(cfg.n_hidden + 1):
        h = h @ params[f"gating.layers.{j}.weight"].T + params[f"gating.layers.{j}.bias"]
        if j < cfg.n_hidden:
            h = np.maximum(h, 0)
    logits = h / cfg.temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # softmax over dim 1: the pair axis
    wrong = e / e.sum(axis=1, keepdims=True) * params["gating.logit_scale"][0]
    assert np.allclose(wrong, 0.5 * params["gating.logit_scale"][0])
    acc_wrong = stage2.pair_accuracy(np.einsum("nk,nk->n", wrong[:, 0], delta[va]))
    assert acc_wrong <= fixed + 1e-9 and acc_wrong < acc - 0.10


# ----------------------------------------------------------------------------- debiasing


def test_rankdata_matches_scipy():
    from scipy.stats import rankdata
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(50), rng.integers(0, 5, 80).astype(float), np.array([1.0]), np.zeros(4)):
        np.testing.assert_allclose(stage2.rankdata(x), rankdata(x))


def test_debias_penalties_match_scipy_spearman():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(3)
    M, K, v = 2000, 7, 4
    verb = rng.standard_normal(M)
    R = rng.standard_normal((M, K)) * 0.5
    for i, c in enumerate([0.0, 0.2, 0.5, 0.9, 0, 2.5, -0.3]):
        R[:, i] += c * verb
    R[:, v] = verb
    R[:, 0] = np.round(R[:, 0], 1)  # ties
    lam, corrs = debias_penalties(R, v, 0.03)
    want = np.ones(K)
    for i in range(K):
        if i == v:
            continue
        for g in stage2.PENALTY_GRID:
            if spearmanr(R[:, i] - g * R[:, v], R[:, v])[0] <= 0.03:
                want[i] = g
                break
    np.testing.assert_array_equal(lam, want)
    assert lam[5] == 1.0 and corrs[5] is None  # never reaches the threshold within the grid
    assert lam[6] == 0.0
    T = reward_transform_matrix(lam, v)
    T_want = np.eye(K)
    T_want[v, :] -= want
    np.testing.assert_array_equal(T, T_want)
    r = rng.standard_normal(K)
    adj = r @ T
    for i in range(K):
        assert adj[i] == pytest.approx(r[i] - want[i] * r[v] if i != v else 0.0)
    assert stage2.PENALTY_GRID[:9] == [0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2]
    assert stage2.PENALTY_GRID[-1] == 0.95 and len(stage2.PENALTY_GRID) == 24


# ----------------------------------------------------------------------------- RewardBench arithmetic


def test_rewardbench_published_armorm_row():
    res = rb.section_scores({}, 74.3)
    assert res["score"] is None
    sec = {"Chat": 96.9, "Chat Hard": 76.8, "Safety": 92.2, "Reasoning": 97.3}
    score = (2 * sum(sec.values()) + 74.3) / 9
    assert round(score, 1) == 89.0
    # through the function: one subset per section at the section's value
    acc = {"alpacaeval-easy": 0.969, "mt-bench-hard": 0.768, "donotanswer": 0.922, "math-prm": 0.973}
    res = rb.section_scores(acc, 74.3)
    assert res["sections"]["Chat"] == pytest.approx(96.9)
    assert round(res["score"], 1) == 89.0
    assert res["score"] == pytest.approx(score)


def test_rewardbench_sections_hand_computed():
    acc = {s: 1.0 for s in rb.EXAMPLE_COUNTS}
    acc.update({"alpacaeval-easy": 0.5, "mt-bench-easy": 0.0})        # Chat: (50 + 95 + 95 + 0 + 40) / 358
    acc.update({"xstest-should-refuse": 0.5, "xstest-should-respond": 0.9})  # Safety
    acc.update({"math-prm": 0.8, "hep-go": 0.5})                      # Reasoning
    res = rb.section_scores(acc, {"anthropic_helpful": 0.6, "anthropic_hhh": 0.8, "shp": 0.5, "summarize": 0.7})
    chat = 100 * (50 + 95 + 95 + 0 + 40) / 358
    safety = 100 * (100 + 100 + 0.5 * 154 + 0.9 * 250 + 136) / 740
    reasoning = 100 * (0.8 * 984 + 164 * 5 + 0.5 * 164) / 1968
    assert res["sections"]["Chat"] == pytest.approx(chat)
    assert res["sections"]["Chat Hard"] == pytest.approx(100.0)
    assert res["sections"]["Safety"] == pytest.approx(safety)
    assert res["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert res["prior_sets"] == pytest.approx(65.0)
    assert res["score_4"] == pytest.approx((chat + 100 + safety + reasoning) / 4)
    assert res["score"] == pytest.approx((2 * (chat + 100 + safety + reasoning) + 65) / 9)


def test_rewardbench_rows_ties_are_wrong_and_table(tmp_path, capsys):
    subsets = ["alpacaeval-easy"] * 4 + ["hep-go"] * 2
    c = [1.0, 2.0, 3.0, 0.5, 1.0, 1.0]
    r = [0.0, 2.0, 4.0, 0.0, 0.0, 1.0]
    res = rb.evaluate_scores(subsets, c, r)
    assert res["subsets"]["alpacaeval-easy"] == {"accuracy": 0.5, "correct": 2, "count": 4}
    assert res["subsets"]["hep-go"]["accuracy"] == 0.5
    assert res["sections"]["Chat"] == pytest.approx(50.0)
    assert res["sections"]["Chat Hard"] is None and res["score_4"] is None
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(json.dumps({"subset": s, "chosen_score": a, "rejected_score": b})
                              for s, a, b in zip(subsets, c, r)))
    assert cli.main(["eval-rewardbench", "--scores", str(path), "--output", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    assert head[:3] == ["Score", "Chat", "Chat"] and "Prior" in head
    assert json.loads((tmp_path / "r.json").read_text())["sections"]["Chat"] == pytest.approx(50.0)
    path.write_text('{"subset": "x"}\n')
    assert cli.main(["eval-rewardbench", "--scores", str(path)]) == 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("stage2") / "tiny-backbone"
    make_backbone(d, vocab=128257, pad_token_id=128256, hidden=24, heads=4, kv_heads=2, inter=40, layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama3_dir / f, d / f)
    return d


SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-go"]


def pair_records(n, seed=0):
    recs = make_records(n, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, r in enumerate(recs):
        a = r["messages"][-1]["content"]
        b = " ".join(rng.choice(a.split() + ["no", "maybe"], 6))
        if i % 2:
            out.append({"prompt": r["messages"][-2]["content"], "chosen": a, "rejected": b, "id": 1000 + i,
                        "subset": SUBSETS[i % len(SUBSETS)]})
        else:
            out.append({"chosen": r["messages"], "rejected": r["messages"][:-1] + [{"role": "assistant",
                                                                                    "content": b}],
                        "id": 1000 + i, "subset": SUBSETS[i % len(SUBSETS)]})
    return out


def test_end_to_end_prepare_train_assemble_load(tiny2, tmp_path, capsys):
    data1 = write_jsonl(tmp_path / "mo.jsonl", make_records(60))
    pairs = pair_records(40)
    pairs[3]["chosen"] = "word " * 300  # over --seq-len: skipped and counted
    data2 = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    e1 = stage1.prepare(str(tiny2), str(data1), str(tmp_path / "e1"), objectives=OBJ, chunk_rows=16,
                        num_threads=1, progress=False, embeddings_dtype="float32", torch_dtype="float32")
    reg = tmp_path / "regression.safetensors"
    assert cli.main(["train-stage1", "--embeddings", e1, "--output", str(reg), "--no-progress"]) == 0
    out2 = tmp_path / "e2"
    for shard in (1, 2):
        assert cli.main(["prepare-stage2", "--model", str(tiny2), "--dataset", str(data2), "--output", str(out2),
                         "--seq-len", "200", "--n-shards", "2", "--shard-idx", str(shard), "--chunk-rows", "7",
                         "--embeddings-dtype", "float32", "--dtype", "float32", "--threads", "1",
                         "--no-progress"]) == 0
    files = sorted(out2.glob("*.safetensors"))
    assert [f.name for f in files] == ["pairs-00001-of-00002.safetensors", "pairs-00002-of-00002.safetensors"]
    fs = [SafetensorsFile(f) for f in files]
    assert sum(int(f.metadata["skipped"]) for f in fs) == 1
    assert sum(f.info("embeddings").shape[0] for f in fs) == 39
    assert fs[0].info("embeddings").shape[1:] == (2, 24) and fs[0].info("prompt_embeddings").shape[1:] == (2, 24)
    ids = np.concatenate([f.read("id") for f in fs])
    assert sorted(ids.tolist()) == sorted(1000 + i for i in range(40) if i != 3)
    pe = np.concatenate([load_file(f)["prompt_embeddings"] for f in files])
    np.testing.assert_allclose(pe[:, 0], pe[:, 1], atol=1e-5)  # same prefix under causal attention
    # rerunning is a no-op (complete); the output matches a direct model run
    assert stage2.prepare(str(tiny2), str(data2), str(out2), seq_len=200, n_shards=2, shard_idx=1, chunk_rows=7,
                          embeddings_dtype="float32", torch_dtype="float32", quiet=True) == str(files[0])

    gate = tmp_path / "gating.safetensors"
    assert cli.main(["train-stage2", "--preference", str(out2 / "*.safetensors"), "--regression", str(reg),
                     "--output", str(gate), "--hidden-dim", "16", "--steps", "30", "--batch-size", "16",
                     "--eval-every", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "lambda" in out
    g = SafetensorsFile(gate)
    assert set(g.keys()) == {"reward_transform_matrix", "gating.logit_scale"} | {
        f"gating.layers.{j}.{w}" for j in range(4) for w in ("weight", "bias")}
    assert g.info("gating.layers.0.weight").shape == (16, 24) and g.info("gating.layers.3.weight").shape == (5, 16)
    rep = json.loads((tmp_path / "gating.json").read_text())
    assert rep["pairs"] == 39 and len(rep["penalties"]) == 5

    ckpt = tmp_path / "armorm-ckpt"
    assert cli.main(["assemble", "--backbone", str(tiny2), "--regression", str(reg), "--gating", str(gate),
                     "--output", str(ckpt)]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForRewardModelWithGating"]
    assert cfg["num_objectives"] == 5 and cfg["gating_hidden_dim"] == 16 and cfg["gating_n_hidden"] == 3
    assert (ckpt / "tokenizer.json").is_file()
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(k.startswith("model.") for k in idx if idx[k] != "model-armorm-head.safetensors")
    model = armorm.ArmoRM.from_pretrained(ckpt, num_threads=1, torch_dtype="float32")
    src = [p for i, p in enumerate(pairs) if i != 3]
    convs = []
    for i, p in enumerate(src):
        ch, rj = stage2.pair_conversations(p, f"row {i}")
        convs += [ch, rj]
    seqs = armorm.tokenizer.format_conversations(model.tokenizer, convs)
    got = np.asarray(model.score_sequences(seqs, fields=["score"])["score"]).reshape(-1, 2)
    # the parts: the head computed from the prepared embeddings, the regression and the gating files
    subsets, c, r = rb.scores_from_embeddings(str(out2 / "*.safetensors"), str(reg), str(gate))
    rows = np.concatenate([f.read("row_index") for f in fs])
    order = {int(x): j for j, x in enumerate(rows)}
    keep_rows = [i for i in range(40) if i != 3]
    want = np.array([[c[order[i]], r[order[i]]] for i in keep_rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert subsets[order[0]] == SUBSETS[0]
    # RewardBench evaluation, from the parts and end to end from the checkpoint: the same accuracies
    assert cli.main(["eval-rewardbench", "--embeddings", str(out2 / "*.safetensors"), "--regression", str(reg),
                     "--gating", str(gate), "--output", str(tmp_path / "rb1.json")]) == 0
    short = tmp_path / "rb.jsonl"
    write_jsonl(short, src)
    assert cli.main(["eval-rewardbench", "--model", str(ckpt), "--dataset", str(short), "--split", "train",
                     "--dtype", "float32", "--threads", "1", "--output", str(tmp_path / "rb2.json")]) == 0
    a = json.loads((tmp_path / "rb1.json").read_text())
    b = json.loads((tmp_path / "rb2.json").read_text())
    assert {k: v["correct"] for k, v in a["subsets"].items()} == {k: v["correct"] for k, v in b["subsets"].items()}
    model.close()
    # assembling again needs --overwrite
    assert cli.main(["assemble", "--backbone", str(tiny2), "--regression", str(reg), "--gating", str(gate),
                     "--output", str(ckpt)]) == 2


def test_assemble_links_prefixed_backbone_files(tiny2, tmp_path):
    """A backbone whose files already use model.* names is hard-linked, not rewritten."""
    from armorm.train.assemble import assemble
    src = tmp_path / "prefixed"
    src.mkdir()
    t = load_file(tiny2 / "model.safetensors")
    save_file({"model." + k: v for k, v in t.items()}, src / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny2 / f, src / f)
    rng = np.random.default_rng(0)
    save_file({"regression_layer.weight": rng.standard_normal((3, 24)).astype(np.float32)}, tmp_path / "w.st")
    cfg = GatingConfig(hidden_dim=8, n_hidden=2)
    stage2.save_gating(tmp_path / "g.st", init_gating(24, 3, cfg, rng), np.eye(3), cfg)
    res = assemble(src, tmp_path / "w.st", tmp_path / "g.st", tmp_path / "out")
    assert res["files"]["model.safetensors"] in ("linked", "copied")
    m = armorm.ArmoRM.from_pretrained(tmp_path / "out", num_threads=1)
    assert m.architecture == "LlamaForRewardModelWithGating"
    m.close()


# ----------------------------------------------------------------------------- bad input


def test_bad_pairs_are_named(tiny2, tmp_path):
    base = pair_records(4)
    cases = [
        ({"prompt": "hi", "chosen": "a"}, "no 'rejected' side"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
         "gating pattern"),
        ({"chosen": "a", "rejected": "b"}, "needs a string 'prompt'"),
    ]
    for bad, match in cases:
        data = write_jsonl(tmp_path / "bad.jsonl", base[:2] + [dict(bad, id=1)] + base[2:])
        with pytest.raises(DatasetError, match=match) as ei:
            stage2.prepare(str(tiny2), str(data), str(tmp_path / "o"), seed=None, torch_dtype="float32",
                           num_threads=1, quiet=True, restart=True, overwrite=True)
        assert "bad.jsonl line" in str(ei.value)


def _pair_file(path, N=20, H=6, nan=False):
    rng = np.random.default_rng(0)
    e = rng.standard_normal((N, 2, H)).astype(np.float32)
    pe = np.repeat(rng.standard_normal((N, 1, H)).astype(np.float32), 2, axis=1)
    if nan:
        pe[7, 0, 2] = np.nan
    save_file({"embeddings": e, "prompt_embeddings": pe, "row_index": np.arange(N)}, path)


def test_bad_shapes_and_nan(tmp_path):
    _pair_file(tmp_path / "p.safetensors")
    save_file({"regression_layer.weight": np.ones((5, 8), np.float32)}, tmp_path / "w8.safetensors")
    with pytest.raises(ValueError, match="hidden size 6.*regression weight is \\[5, 8\\]"):
        stage2.train(tmp_path / "p.safetensors", tmp_path / "w8.safetensors")
    _pair_file(tmp_path / "n.safetensors", nan=True)
    save_file({"regression_layer.weight": np.ones((5, 6), np.float32)}, tmp_path / "w6.safetensors")
    with pytest.raises(ValueError, match="pair 7: the prompt embedding has a NaN"):
        stage2.train(tmp_path / "n.safetensors", tmp_path / "w6.safetensors")
    save_file({"embeddings": np.zeros((4, 6), np.float32)}, tmp_path / "s1.safetensors")
    with pytest.raises(ValueError, match="prepare-stage2"):
        stage2.train(tmp_path / "s1.safetensors", tmp_path / "w6.safetensors")
    res = stage2.train(tmp_path / "p.safetensors", tmp_path / "w6.safetensors", tmp_path / "g.safetensors",
                       config=GatingConfig(hidden_dim=4, steps=3, batch_size=8))
    assert res.transform.shape == (5, 5)
    with pytest.raises(ValueError, match="objectives"):
        save_file({"regression_layer.weight": np.ones((3, 6), np.float32)}, tmp_path / "w3.safetensors")
        rb.scores_from_embeddings(str(tmp_path / "p.safetensors"), str(tmp_path / "w3.safetensors"),
                                  str(tmp_path / "g.safetensors"))


def test_prepare_resume_after_interruption(tiny2, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(30))
    kw = dict(seq_len=400, chunk_rows=7, embeddings_dtype="float32", torch_dtype="float32", num_threads=1,
              quiet=True)
    full = stage2.prepare(str(tiny2), str(data), str(tmp_path / "full"), progress=False, **kw)

    def interrupt(done, total, *rest):
        if done >= 15:
            raise KeyboardInterrupt("simulated")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        stage2.prepare(str(tiny2), str(data), str(out), progress=interrupt, **kw)
    assert not list(out.glob("*.safetensors"))  # nothing but the hidden work folder
    partial = [p for p in out.iterdir() if p.name.startswith(".")]
    assert partial, "no resumable work was kept"
    seen = []
    path = stage2.prepare(str(tiny2), str(data), str(out), progress=lambda d, *r: seen.append(d), **kw)
    assert seen and seen[0] >= 14  # finished chunks were not recomputed
    assert Path(path).read_bytes() == Path(full).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
