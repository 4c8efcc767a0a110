"""GPU throughput: armorm's CUDA backend against transformers on an 8B-shaped ArmoRM.

Builds a random Llama-3-8B-shaped ArmoRM checkpoint (bf16, 32 layers, hidden
4096, GQA 32/8, MLP 14336, vocab 128257, the 19-objective gating head) on
the GPU, saves it as safetensors shards, and times, on one RewardBench-like
set of conversations (token ids, lengths uniform in 100..2000, the Llama-3
assistant header inside each):

  armorm            device_map="cuda", packed variable-length batches
  hf-single         transformers LlamaModel (sdpa) + the head, one conversation
                    per forward: the model card's pipeline
  hf-padded-8       transformers, right-padded batches of 8 with an attention mask (sdpa)

Throughput counts real tokens only. MFU = model FLOPs / time / peak, with
model FLOPs = 2 * (matmul parameters) per token + 2 * layers * heads * head_dim
* L * (L + 1) per sequence of L tokens (causal attention), against the H100
SXM's 989 TFLOP/s dense bf16 and against a cuBLAS bf16 GEMM measured here.
The table is printed last; --json writes the numbers too.

Run by benchmarks/gpu_check.sh; alone: python benchmarks/gpu_bench.py [--n 128]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H100_PEAK = 989e12
GATING_PATTERN = [128009, 128006, 78191, 128007, 271]  # <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n

SHAPE = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128257,
             max_pos=8192, theta=500000.0, K=19, D=1024, n_hidden=3)
# --smoke: the same code on a tiny shape, on the CPU, to check the script where there is no GPU
SMOKE_SHAPE = dict(SHAPE, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, head_dim=16, D=32)
DEV = "cuda"


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def matmul_params(s) -> int:
    H, I, QD, KD = s["hidden"], s["inter"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return s["layers"] * (H * (QD + 2 * KD) + QD * H + 3 * H * I)


def model_flops(lengths, s) -> float:
    P = matmul_params(s)
    attn = 2.0 * s["layers"] * s["heads"] * s["head_dim"]
    return float(sum(2.0 * P * L + attn * L * (L + 1) for L in lengths))


def workload(n: int, seed: int = 0):
    """n conversations of 100..2000 tokens; the assistant header sits where the response starts."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        L = int(rng.integers(100, 2001))
        ids = rng.integers(1000, 128000, size=L).astype(np.int32)
        g = int(rng.integers(L // 4, L - len(GATING_PATTERN)))  # prompt / response split
        ids[g:g + len(GATING_PATTERN)] = GATING_PATTERN
        seqs.append(ids)
    return seqs


def gating_positions(seqs):
    out = []
    pat = np.array(GATING_PATTERN, dtype=np.int32)
    for ids in seqs:
        hits = [i for i in range(len(ids) - len(pat) + 1) if ids[i] == pat[0] and np.array_equal(ids[i:i + len(pat)], pat)]
        out.append(hits[-1])
    return out


def build_hf_model(s):
    """LlamaModel in bf16 on the GPU (random init, as transformers initialises), plus the head."""
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                      vocab_size=s["vocab"], max_position_embeddings=s["max_pos"], rms_norm_eps=1e-5,
                      rope_theta=s["theta"], tie_word_embeddings=False, initializer_range=0.02,
                      attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaModel(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=DEV).manual_seed(1)
    H, K, D = s["hidden"], s["K"], s["D"]
    dims = [H] + [D] * s["n_hidden"] + [K]

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(torch.bfloat16)

    head = {"regression_layer.weight": rnd(K, H, scale=0.02),
            "reward_transform_matrix": (torch.eye(K, device=DEV) + 0.1 * torch.randn(K, K, generator=g, device=DEV)
                                        ).to(torch.bfloat16),
            "gating.logit_scale": torch.tensor([1.5], device=DEV, dtype=torch.bfloat16)}
    for j in range(s["n_hidden"] + 1):
        head[f"gating.layers.{j}.weight"] = rnd(dims[j + 1], dims[j], scale=1.0 / dims[j] ** 0.5)
        head[f"gating.layers.{j}.bias"] = rnd(dims[j + 1], scale=0.05)
    return model, head


def save_checkpoint(model, head, path: Path, s, shards: int = 4) -> None:
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if "rotary" not in k}
    tensors.update(head)
    names = sorted(tensors)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].detach().contiguous().cpu() for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForRewardModelWithGating"], "model_type": "llama", "hidden_size": s["hidden"],
           "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
           "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "vocab_size": s["vocab"],
           "max_position_embeddings": s["max_pos"], "rms_norm_eps": 1e-5, "rope_theta": s["theta"],
           "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "pad_token_id": 128256, "num_objectives": s["K"],
           "gating_hidden_dim": s["D"], "gating_n_hidden": s["n_hidden"], "gating_temperature": 10.0}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


def hf_head(hidden, prompt, head, n_hidden):
    """The ArmoRM head on (B, H) states, in the model's dtype, as the released code runs it."""
    rewards = hidden @ head["regression_layer.weight"].T
    x = prompt
    for j in range(n_hidden + 1):
        x = x @ head[f"gating.layers.{j}.weight"].T + head[f"gating.layers.{j}.bias"]
        if j < n_hidden:
            x = torch.relu(x)
    gating = torch.softmax(x / 10.0, dim=-1) * head["gating.logit_scale"][0]
    score = (gating * (rewards @ head["reward_transform_matrix"])).sum(-1)
    return score


def run_hf_single(model, head, seqs, gpos, n_hidden):
    scores = []
    with torch.no_grad():
        for ids, g in zip(seqs, gpos):
            x = torch.from_numpy(ids.astype(np.int64))[None].to(DEV)
            hs = model(input_ids=x).last_hidden_state[0]
            scores.append(hf_head(hs[-1:], hs[g:g + 1], head, n_hidden).float().cpu())
    return torch.cat(scores).numpy()


def run_hf_padded(model, head, seqs, gpos, n_hidden, bs=8):
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), bs):
            grp = seqs[i:i + bs]
            L = max(len(s) for s in grp)
            ids = np.zeros((len(grp), L), dtype=np.int64)
            mask = np.zeros((len(grp), L), dtype=np.int64)
            for j, s in enumerate(grp):
                ids[j, :len(s)] = s
                mask[j, :len(s)] = 1
            hs = model(input_ids=torch.from_numpy(ids).to(DEV),
                       attention_mask=torch.from_numpy(mask).to(DEV)).last_hidden_state
            rows = torch.arange(len(grp), device=DEV)
            last = torch.tensor([len(s) - 1 for s in grp], device=DEV)
            gp = torch.tensor(gpos[i:i + bs], device=DEV)
            scores.append(hf_head(hs[rows, last], hs[rows, gp], head, n_hidden).float().cpu())
    return torch.cat(scores).numpy()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args):
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def cublas_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="conversations in the timed set")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="armorm's max_batch_tokens")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks this script without a GPU")
    args = ap.parse_args()

    global DEV
    import armorm
    t_start = time.perf_counter()
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    if args.smoke:
        DEV = "cpu"
        dev, peak = "cpu (smoke run)", float("nan")
    else:
        dev = torch.cuda.get_device_name(0)
        log(f"device {dev}; measuring the cuBLAS bf16 peak")
        peak = cublas_peak()
        log(f"cuBLAS bf16 8192^3: {peak / 1e12:.0f} TFLOP/s")
    log("building the model")
    model, head = build_hf_model(shape)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    ck = Path(tmp.name)
    t0 = time.perf_counter()
    save_checkpoint(model, head, ck, shape)
    log(f"checkpoint written in {time.perf_counter() - t0:.1f} s")

    seqs = workload(args.n)
    gpos = gating_positions(seqs)
    lengths = [len(s) for s in seqs]
    flops = model_flops(lengths, shape)
    ntok = sum(lengths)
    results = {}

    if DEV == "cuda":
        torch.cuda.empty_cache()  # cudaMemGetInfo in armorm's check sees what torch's cache holds as used
    t0 = time.perf_counter()
    am = armorm.ArmoRM.from_pretrained(ck, device_map=DEV, gating_pattern=GATING_PATTERN,
                                       max_batch_tokens=args.batch_tokens)
    load_s = time.perf_counter() - t0
    log(f"armorm loaded in {load_s:.1f} s; warm-up")
    am.score_sequences(seqs[:8])
    out, secs = timed(am.score_sequences, seqs)
    ours = np.asarray(out["score"])
    results["armorm"] = secs
    log(f"armorm: {ntok / secs:.0f} tokens/s")
    am.close()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    max_diff = None
    if not args.skip_hf:
        nh = shape["n_hidden"]
        run_hf_single(model, head, seqs[:4], gpos[:4], nh)  # warm-up
        theirs, secs = timed(run_hf_single, model, head, seqs, gpos, nh)
        results["hf-single"] = secs
        log(f"hf one per forward: {ntok / secs:.0f} tokens/s")
        run_hf_padded(model, head, seqs[:8], gpos[:8], nh)
        _, secs = timed(run_hf_padded, model, head, seqs, gpos, nh)
        results["hf-padded-8"] = secs
        log(f"hf padded batches of 8: {ntok / secs:.0f} tokens/s")
        # sanity at scale: armorm vs transformers bf16 on the same weights
        max_diff = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))

    rows = []
    for name, secs in results.items():
        tps = ntok / secs
        rows.append({"system": name, "seconds": secs, "tokens_per_s": tps,
                     "mfu_989": flops / secs / H100_PEAK, "mfu_measured": flops / secs / peak,
                     "speedup_of_armorm": results["armorm"] and secs / results["armorm"]})
    summary = {"device": dev, "conversations": args.n, "tokens": ntok, "model_tflop": flops / 1e12,
               "cublas_peak_tflops": peak / 1e12, "armorm_load_s": load_s, "armorm_batch_tokens": args.batch_tokens,
               "score_rel_diff_vs_hf_bf16": max_diff, "rows": rows, "wall_s": time.perf_counter() - t_start}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))

    print()
    print(f"GPU benchmark: {dev}; {'tiny' if args.smoke else '8B'}-shaped ArmoRM (bf16), {args.n} conversations, {ntok} tokens "
          f"(100..2000 each), {flops / 1e12:.0f} TFLOP of model FLOPs")
    print(f"cuBLAS bf16 GEMM peak measured: {peak / 1e12:.0f} TFLOP/s; armorm load + upload: {load_s:.1f} s; "
          f"armorm score vs transformers bf16: max rel diff {max_diff if max_diff is None else f'{max_diff:.2e}'}")
    print(f"{'system':<14} {'tokens/s':>10} {'seconds':>8} {'MFU/989':>8} {'MFU/cuBLAS':>10} {'armorm x':>9}")
    for r in rows:
        print(f"{r['system']:<14} {r['tokens_per_s']:>10.0f} {r['seconds']:>8.2f} {100 * r['mfu_989']:>7.1f}% "
              f"{100 * r['mfu_measured']:>9.1f}% {r['speedup_of_armorm']:>8.2f}x")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
