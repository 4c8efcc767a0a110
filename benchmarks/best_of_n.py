"""Best-of-N throughput: N responses to one prompt, the prompt computed once (docs/best_of_n.md).

    python benchmarks/best_of_n.py [--shape 1b] [--dtype bfloat16] [--threads 2] [--n 2,4,8,16]
                                   [--prompt-len 1024] [--response-len 256] [--prompts 1] [--pairs 32]
                                   [--reps 1] [--skip-hf] [--device cpu|cuda] [--rewardbench FILE --tokenizer DIR]

Workloads, each scored as one call:
  best-of-N   --prompts prompts of --prompt-len tokens (ending with Llama-3's
              final assistant header, so the ArmoRM gating row lies in the
              prompt), each with N responses of --response-len tokens;
  pairs       a RewardBench-like mix: --pairs prompts with a chosen and a
              rejected response. Lengths are drawn (seed 0) from the ranges
              below unless --rewardbench gives a RewardBench file (parquet or
              JSONL with prompt/chosen/rejected), whose pairs are formatted
              with --tokenizer's chat template and their token lengths used.

Competitors, one process, same random ArmoRM-shaped checkpoint (written by
benchmarks/make_checkpoint.py under --cache-dir when missing), same thread count:
  armorm shared     ArmoRM.score_sequences: shared prefixes computed once (the default)
  armorm unshared   the same call with share_prefixes=False
  transformers      LlamaModel forward (torch, sdpa, no LM head) on a padded batch of each
                    prompt's N sequences (pairs: chosen + rejected), as reward-bench batches
Tokens/s count every full sequence (prompt + response), as a user counts them:
the same numerator for all three. `work` is the tokens of the full sequences
over the tokens armorm computes with sharing (the speed-up's ceiling). Shared
and unshared outputs (score, hidden_state) of the timed runs are checked to be
bit-identical (CPU).

Prints one table of medians over --reps timed runs (after one untimed warm-up
on a short input), the CPU model (lscpu) and the load average.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_prefill import timeit  # noqa: E402
from machine import describe  # noqa: E402
from make_checkpoint import SHAPES, make_checkpoint  # noqa: E402

#: Llama-3's "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n": ends every prompt
HEADER = [128009, 128006, 78191, 128007, 271]
# the synthetic pair mix: prompt and response lengths (tokens, chat formatting included), uniform in these ranges
PAIR_PROMPT = (30, 600)
PAIR_RESPONSE = (20, 400)



def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1000, 128000, size=n).astype(np.int32)


def best_of_n(rng: np.random.Generator, prompts: int, n: int, plen: int, rlen: int) -> List[List[np.ndarray]]:
    """`prompts` groups of n full sequences (prompt + response)."""
    groups = []
    for _ in range(prompts):
        p = np.concatenate([random_ids(rng, plen - len(HEADER)), HEADER]).astype(np.int32)
        groups.append([np.concatenate([p, random_ids(rng, rlen)]) for _ in range(n)])
    return groups


def synthetic_pairs(rng: np.random.Generator, pairs: int) -> List[List[np.ndarray]]:
    groups = []
    for _ in range(pairs):
        plen = int(rng.integers(*PAIR_PROMPT))
        p = np.concatenate([random_ids(rng, plen - len(HEADER)), HEADER]).astype(np.int32)
        groups.append([np.concatenate([p, random_ids(rng, int(rng.integers(*PAIR_RESPONSE)))]) for _ in range(2)])
    return groups


def rewardbench_pairs(rng: np.random.Generator, path: str, tokenizer_dir: str, pairs: int) -> List[List[np.ndarray]]:
    """Pairs with RewardBench's real token lengths (shared prompt, chosen and rejected), random ids."""
    from armorm.data import open_dataset
    from armorm.tokenizer import ChatTokenizer, format_conversations
    from armorm.train.stage2 import pair_conversations
    src = open_dataset(path, split="filtered", columns=["prompt", "chosen", "rejected"])
    tok = ChatTokenizer.from_pretrained(tokenizer_dir)
    idx = rng.choice(len(src), size=min(pairs, len(src)), replace=False)
    groups = []
    for i, rec in zip(idx, src.take(sorted(int(x) for x in idx))):
        ch, rj = pair_conversations(rec, src.where(int(i)))
        a, b = (np.asarray(x) for x in format_conversations(tok, [ch, rj]))
        n = min(a.size, b.size)
        common = int(np.argmax(a[:n] != b[:n])) if (a[:n] != b[:n]).any() else n
        if common < len(HEADER) + 1 or common == n:
            continue  # no shared prompt with its header, or one side a prefix of the other: not a pair here
        # random ids of the real lengths; the shared part ends with the final assistant header, as formatted
        p = np.concatenate([random_ids(rng, common - len(HEADER)), HEADER]).astype(np.int32)
        groups.append([np.concatenate([p, random_ids(rng, a.size - common)]),
                       np.concatenate([p, random_ids(rng, b.size - common)])])
    return groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", default="2,4,8,16", help="responses per prompt, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=1, help="prompts per best-of-N workload")
    ap.add_argument("--pairs", type=int, default=32, help="pairs in the RewardBench-like workload (0: none)")
    ap.add_argument("--rewardbench", default=None, help="a RewardBench file: take the pairs' token lengths from it")
    ap.add_argument("--tokenizer", default=None, help="a model directory whose chat template formats --rewardbench")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch-tokens", type=int, default=8192, help="armorm's max_batch_tokens")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (armorm and transformers both)")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers column")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("ARMORM_BENCH_CACHE", Path.home() / ".cache" / "armorm-bench")))
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if x]
    if min(ns + [args.threads, args.reps, args.prompts, args.prompt_len - len(HEADER), args.response_len]) < 1:
        ap.error("--n, --threads, --reps, --prompts and --response-len must be >= 1, --prompt-len > 5")
    if args.rewardbench and not args.tokenizer:
        ap.error("--rewardbench needs --tokenizer (a directory with the chat template, e.g. the ArmoRM model)")

    import armorm
    ckpt = args.cache_dir / "best_of_n" / f"{args.shape}-{args.dtype}"
    if not (ckpt / "config.json").exists():
        print(f"generating {ckpt}", flush=True)
        make_checkpoint(ckpt, shape=args.shape, dtype="bf16" if args.dtype == "bfloat16" else "fp32",
                        arch="armorm", quiet=True)

    rng = np.random.default_rng(0)
    workloads: List[Tuple[str, List[List[np.ndarray]]]] = [
        (f"best-of-{n}", best_of_n(rng, args.prompts, n, args.prompt_len, args.response_len)) for n in ns]
    if args.pairs:
        if args.rewardbench:
            workloads.append(("RewardBench pairs", rewardbench_pairs(rng, args.rewardbench, args.tokenizer,
                                                                     args.pairs)))
        else:
            workloads.append(("pairs (synthetic)", synthetic_pairs(rng, args.pairs)))

    results: Dict[str, Dict[str, float]] = {name: {} for name, _ in workloads}
    model = armorm.ArmoRM.from_pretrained(ckpt, torch_dtype=args.dtype, num_threads=args.threads,
                                          device_map=args.device, max_batch_tokens=args.batch_tokens)
    model.score_sequences([w[0][0][:64] for _, w in workloads], fields=["hidden_state"])  # warm-up
    for name, groups in workloads:
        seqs = [s for g in groups for s in g]
        r = results[name]
        r["seqs"] = len(seqs)
        r["tokens"] = sum(s.size for s in seqs)
        stats: Dict[str, int] = {}
        got = {}

        def run(share: bool) -> None:
            got[share] = model.score_sequences(seqs, fields=["score", "hidden_state"], share_prefixes=share,
                                               stats=stats if share else None)

        r["shared"] = timeit(lambda: run(True), args.reps, warmup=False)
        r["unshared"] = timeit(lambda: run(False), args.reps, warmup=False)
        r["work"] = stats["tokens_in"] / stats["tokens_computed"]
        if args.device == "cpu":  # the timed runs' own outputs
            for f in got[True]:
                assert np.array_equal(got[True][f], got[False][f]), f"{name}: {f} differs with sharing on and off"
        print(f"  {name}: shared {r['tokens'] / r['shared']:.1f} tok/s, unshared {r['tokens'] / r['unshared']:.1f} "
              f"tok/s", flush=True)
    model.close()
    model = None

    hf_version = None
    if not args.skip_hf:
        import torch
        import transformers
        from transformers import LlamaModel
        hf_version = transformers.__version__
        transformers.logging.set_verbosity_error()  # the ArmoRM head's tensors are unused by LlamaModel: say nothing
        torch.set_num_threads(args.threads)
        dev = "cuda" if args.device.startswith("cuda") else "cpu"
        hf = LlamaModel.from_pretrained(ckpt, dtype=getattr(torch, args.dtype), attn_implementation="sdpa").to(dev)
        hf.eval()

        def run_padded(groups: List[List[np.ndarray]]) -> None:
            with torch.no_grad():
                for g in groups:
                    L = max(s.size for s in g)
                    ids = torch.zeros((len(g), L), dtype=torch.long)
                    mask = torch.zeros((len(g), L), dtype=torch.long)
                    for i, s in enumerate(g):
                        ids[i, :s.size] = torch.from_numpy(s.astype(np.int64))
                        mask[i, :s.size] = 1
                    hf(input_ids=ids.to(dev), attention_mask=mask.to(dev))
                if dev == "cuda":
                    torch.cuda.synchronize()

        run_padded([[g[0][:64]] for _, w in workloads for g in w[:1]])
        for name, groups in workloads:
            results[name]["hf"] = timeit(lambda: run_padded(groups), args.reps, warmup=False)
            print(f"  {name}: transformers {results[name]['tokens'] / results[name]['hf']:.1f} tok/s", flush=True)
        hf = None

    s = SHAPES[args.shape]
    where = describe() if args.device == "cpu" else args.device
    print(f"\nbest-of-N on {where}; {args.threads} threads; "
          f"shape {args.shape} (hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, "
          f"intermediate {s['inter']}), {args.dtype}{'; transformers ' + hf_version if hf_version else ''}; "
          f"median of {args.reps}")
    print(f"best-of-N: {args.prompts} prompt(s) of {args.prompt_len} tokens x N responses of {args.response_len}; "
          + ("pairs: RewardBench's lengths" if args.rewardbench else
             f"pairs: prompt {PAIR_PROMPT[0]}-{PAIR_PROMPT[1]}, responses {PAIR_RESPONSE[0]}-{PAIR_RESPONSE[1]} tokens"))
    head = ["workload", "seqs", "tokens", "work", "shared tok/s", "unshared tok/s", "transformers tok/s",
            "shared/unshared", "shared/transformers"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for name, _ in workloads:
        r = results[name]
        tps = {k: r["tokens"] / r[k] for k in ("shared", "unshared", "hf") if k in r}
        hf_cells = (f"{tps['hf']:.1f}", f"{tps['shared'] / tps['hf']:.2f}x") if "hf" in tps else ("-", "-")
        print(f"| {name} | {r['seqs']} | {r['tokens']} | {r['work']:.2f}x | {tps['shared']:.1f} | "
              f"{tps['unshared']:.1f} | {hf_cells[0]} | {tps['shared'] / tps['unshared']:.2f}x | {hf_cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
