"""CPU prefill throughput: armorm vs transformers (torch CPU) vs llama.cpp, same checkpoint, same tokens.

    python benchmarks/cpu_prefill.py [--shape NAME] [--seqs N] [--seq-len L] [--threads N] [--reps R]
    python benchmarks/cpu_prefill.py --shape 1b --prepare-only   # generate + convert, time nothing

Shapes: Llama small / medium / 1b (Llama-3.2-1B), and the other families at the
size of a model people use: qwen3-0.6b (Qwen3-0.6B: q/k norms, head_dim 128,
tied embeddings) and gemma2-2b (Gemma-2-2B: head_dim 256, (1 + w) pre- and
post-norms, GeGLU, soft-capping, sliding window 4096 on alternate layers).
transformers runs each family's own class, with sdpa attention (Gemma-2:
eager, the only one its class supports with soft-capping).

Generates a random checkpoint of the named shape (bf16 and fp32 unless
--dtypes says; cached under --cache-dir, default ~/.cache/armorm-bench, ~7.5 GB
for 1b, 5.2 GB for gemma2-2b in bf16, plus as much again for the GGUF files),
scores the same packed token ids with armorm, with
transformers' forward (no padding: one sequence per forward call, which
favours it) and with llama.cpp (one llama_decode of the whole sequence from an
empty KV cache, last-token logits only: pure prompt processing; the GGUF is
converted from the same checkpoint by llama.cpp's own converter, bf16 -> bf16,
fp32 -> f32; see benchmarks/llamacpp.py), and prints median tokens/s and the
ratios. One process, one machine, the same thread count for all three.

llama.cpp is skipped, with the reason printed, when llama-cpp-python is not
installed (`python benchmarks/llamacpp.py build` compiles it) or the shape's
vocabulary is not Llama-3's (the GGUF needs a real tokenizer). Its run is
checked: llama.cpp's own prompt-eval counters must count every token and agree
with the wall clock, and its last-token logits must match those implied by
armorm's final hidden state (logits = E h with the tied embedding E).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benchmarks/llamacpp.py)

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate, vocab (+ family, head_dim, the family's config keys)
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, inter=1536, vocab=32000),
    "medium": dict(hidden=1024, layers=8, heads=16, kv_heads=4, inter=3584, vocab=32000),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256),
    "qwen3-0.6b": dict(family="qwen3", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, inter=3072,
                       vocab=151936, extra=dict(tie_word_embeddings=True, max_position_embeddings=40960,
                                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "gemma2-2b": dict(family="gemma2", hidden=2304, layers=26, heads=8, kv_heads=4, head_dim=256, inter=9216,
                      vocab=256000, extra=dict(query_pre_attn_scalar=256, sliding_window=4096,
                                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                               max_position_embeddings=8192, tie_word_embeddings=True)),
}
PREFIX = {"llama": "Llama", "qwen3": "Qwen3", "gemma2": "Gemma2"}
LLAMA3_VOCAB = 128256
# llama.cpp's last-token logits vs E @ (armorm's hidden state): the least cosine similarity accepted
MIN_LOGITS_COSINE = 0.999


def _config_matches(d: Path, shape: dict) -> bool:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                intermediate_size=shape["inter"], vocab_size=shape["vocab"],
                model_type=shape.get("family", "llama"))
    return all(cfg.get(k) == v for k, v in want.items())


def hf_class(shape: dict, suffix: str):
    """transformers' class of the shape's family: hf_class(shape, "Model")."""
    import transformers
    return getattr(transformers, PREFIX[shape.get("family", "llama")] + suffix)


def make_checkpoint(root: Path, shape: dict, dtype: str) -> Path:
    """A random checkpoint of `shape` (its family's *Model) in `dtype` under `root` (seed 0; reused when present)."""
    import torch
    family = shape.get("family", "llama")
    d = root / f"{family}-{dtype}"
    if (d / "config.json").exists() and _config_matches(d, shape):
        return d
    print(f"generating {d}", flush=True)
    torch.manual_seed(0)
    kw = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
              num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
              intermediate_size=shape["inter"], vocab_size=shape["vocab"], max_position_embeddings=8192,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if "head_dim" in shape:
        kw["head_dim"] = shape["head_dim"]
    kw.update(shape.get("extra", {}))
    cfg = hf_class(shape, "Config")(**kw)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in `dtype`: never a whole fp32 copy of a bf16 model
    try:
        with torch.device("cpu"):
            model = hf_class(shape, "Model")(cfg)
    finally:
        torch.set_default_dtype(old)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def timeit(fn, reps: int, warmup: bool = True) -> float:
    """Median seconds of `reps` calls of fn, after one untimed call when `warmup`."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def embedding_matrix(d: Path) -> np.ndarray:
    """The checkpoint's token embedding [vocab, hidden] as float32 (llama.cpp ties the LM head to it)."""
    import torch
    from safetensors import safe_open
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                if k.endswith("embed_tokens.weight"):
                    return st.get_tensor(k).to(torch.float32).numpy()
    raise KeyError(f"no embed_tokens.weight in {d}")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llamacpp-reps", type=int, default=None, help="timed reps for llama.cpp (default: --reps)")
    ap.add_argument("--llamacpp", choices=("auto", "off"), default="auto",
                    help="auto: time llama.cpp when llama-cpp-python is installed")
    ap.add_argument("--llamacpp-flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash-attention setting (auto is llama.cpp's own default)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("ARMORM_BENCH_CACHE", Path.home() / ".cache" / "armorm-bench")),
                    help="where generated checkpoints and their GGUF files are kept")
    ap.add_argument("--prepare-only", action="store_true",
                    help="generate the checkpoints (and GGUF files), then exit without timing")
    args = ap.parse_args()
    if args.reps < 1 or args.seqs < 1 or args.seq_len < 1 or args.threads < 1:
        ap.error("--reps, --seqs, --seq-len and --threads must be >= 1")
    lreps = args.reps if args.llamacpp_reps is None else args.llamacpp_reps
    if lreps < 1:
        ap.error("--llamacpp-reps must be >= 1")

    import torch

    shape = SHAPES[args.shape]
    family = shape.get("family", "llama")
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma-2's class has no sdpa (soft-capping)
    dtypes = args.dtypes.split(",")
    root = args.cache_dir / args.shape
    root.mkdir(parents=True, exist_ok=True)

    lc, lc_why = (None, "--llamacpp off") if args.llamacpp == "off" else llamacpp.available()
    if lc is not None and family != "llama":
        lc, lc_why = None, f"shape {args.shape} is {family}: the GGUF conversion here handles Llama-3 only"
    if lc is not None and shape["vocab"] != LLAMA3_VOCAB:
        lc, lc_why = None, (f"shape {args.shape} has vocab {shape['vocab']}; the GGUF conversion needs the "
                            f"Llama-3 tokenizer ({LLAMA3_VOCAB} tokens): use --shape 1b")
    lc_version = lc.__version__ if lc is not None else None

    if args.prepare_only:
        for dtype in dtypes:
            d = make_checkpoint(root, shape, dtype)
            if lc is not None:
                llamacpp.convert(d, dtype, args.cache_dir, lc_version)
        print("prepared" + ("" if lc is not None else f"; llama.cpp skipped: {lc_why}"))
        return 0

    import armorm
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, shape["vocab"], size=args.seq_len).astype(np.int32) for _ in range(args.seqs)]
    ntok = sum(len(s) for s in seqs)
    rows, notes = [], []
    for dtype in dtypes:
        d = make_checkpoint(root, shape, dtype)
        gguf = llamacpp.convert(d, dtype, args.cache_dir, lc_version) if lc is not None else None

        ours = armorm.ArmoRM.from_pretrained(d, num_threads=args.threads)
        t_ours = timeit(lambda: ours.score_sequences(seqs, fields=["hidden_state"]), args.reps)
        h_ours = np.asarray(ours.score_sequences(seqs[:1], fields=["hidden_state"]).hidden_state,
                            dtype=np.float64)[0]
        ours.close()
        ours = None  # free before the next competitor loads

        hf = hf_class(shape, "Model").from_pretrained(d, dtype=getattr(torch, dtype), attn_implementation=attn).eval()

        def run_hf():
            with torch.no_grad():
                for s in seqs:
                    hf(torch.from_numpy(s.astype(np.int64))[None])
        t_hf = timeit(run_hf, args.reps)
        with torch.no_grad():
            h_hf = hf(torch.from_numpy(seqs[0].astype(np.int64))[None]).last_hidden_state[0, -1]
        h_hf = h_hf.to(torch.float64).numpy()
        hf = None
        gc.collect()

        t_lc = None
        if lc is not None:
            m = llamacpp.LlamaCppPrefill(lc, gguf, args.seq_len, args.threads, args.llamacpp_flash_attn)
            try:
                def run_lc():
                    for s in seqs:
                        m.prefill(s)
                run_lc()  # warm-up
                m.perf_reset()
                times = []
                for _ in range(lreps):
                    t = time.perf_counter()
                    run_lc()
                    times.append(time.perf_counter() - t)
                t_lc = statistics.median(times)
                perf_s, perf_n = m.perf()
                # the work really happened: llama.cpp counted every prompt token, and its own clock agrees
                if perf_n != lreps * ntok:
                    raise RuntimeError(f"llama.cpp counted {perf_n} prompt tokens, expected {lreps * ntok}")
                wall = sum(times)
                if not 0.9 * wall <= perf_s <= 1.01 * wall:
                    raise RuntimeError(f"llama.cpp's prompt-eval time {perf_s:.2f} s disagrees with "
                                       f"the wall clock {wall:.2f} s")
                logits = m.last_logits(seqs[0])
                desc = m.desc
            finally:
                m.close()
            if not np.all(np.isfinite(logits)):
                raise RuntimeError("llama.cpp returned non-finite logits")
            emb = embedding_matrix(d)
            ref_ours = (emb @ h_ours.astype(np.float32)).astype(np.float64)
            ref_hf = (emb @ h_hf.astype(np.float32)).astype(np.float64)
            del emb
            cos = cosine(logits, ref_ours)
            notes.append(f"{dtype}: llama.cpp model '{desc}', {gguf.name}; prompt-eval counters: {perf_n} tokens "
                         f"in {perf_s:.2f} s (wall {wall:.2f} s, {perf_s / wall:.3f}); last-token logits of "
                         f"seq 0 vs E@h(armorm): cosine {cos:.6f}, rel err {rel_err(logits, ref_ours):.2e}, "
                         f"argmax {'same' if logits.argmax() == ref_ours.argmax() else 'DIFFERENT'} "
                         f"(transformers E@h vs armorm: rel err {rel_err(ref_hf, ref_ours):.2e})")
            if cos < MIN_LOGITS_COSINE:
                raise RuntimeError(f"llama.cpp's logits do not match armorm's model (cosine {cos:.6f} < "
                                   f"{MIN_LOGITS_COSINE}): the GGUF is not the same model")
        rows.append((dtype, ntok / t_ours, ntok / t_hf, None if t_lc is None else ntok / t_lc))
        gc.collect()

    print(f"\nshape {args.shape} {shape}, {args.seqs} x {args.seq_len} tokens, {args.threads} threads, "
          f"median of {args.reps} (llama.cpp: median of {lreps}); transformers {hf_class(shape, 'Model').__name__}, "
          f"attn_implementation={attn}")
    print(f"armorm vs transformers, last hidden state of sequence 0: rel err {rel_err(h_ours, h_hf):.2e} "
          f"({dtypes[-1]})")
    print(f"{'dtype':<10} {'armorm tok/s':>13} {'transformers tok/s':>19} {'llama.cpp tok/s':>16} "
          f"{'armorm/transformers':>20} {'armorm/llama.cpp':>17}")
    for dtype, a, b, c in rows:
        lc_tps, lc_ratio = ("-", "-") if c is None else (f"{c:.1f}", f"{a / c:.2f}x")
        print(f"{dtype:<10} {a:>13.1f} {b:>19.1f} {lc_tps:>16} {a / b:>19.2f}x {lc_ratio:>17}")
    if lc is None:
        print(f"llama.cpp skipped: {lc_why}")
    else:
        print(f"llama.cpp: llama-cpp-python {lc_version}, flash-attn {args.llamacpp_flash_attn}, "
              f"n_batch = n_ubatch = n_ctx = {args.seq_len}, KV cache f16 (its default), one llama_decode per "
              f"sequence, KV cache cleared between")
        print(f"llama.cpp system info: {llamacpp.system_info(lc)}")
        for n in notes:
            print(n)
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
