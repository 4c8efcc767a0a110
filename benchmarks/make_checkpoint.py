"""Random Llama-shaped checkpoints of any size, written tensor by tensor in small RAM.

    python benchmarks/make_checkpoint.py OUT_DIR [--shape 8b|1b|small|tiny] [--dtype bf16|fp32]
                                         [--arch armorm|backbone] [--seed 0] [--shard-gb 5]

Writes OUT_DIR/config.json (Llama-3-8B's fields with the shape's sizes; with
--arch armorm the ArmoRM head keys and `LlamaForRewardModelWithGating`),
`model-0000i-of-0000N.safetensors` shards of at most --shard-gb GB and
`model.safetensors.index.json`, like a Hugging Face `save_pretrained` of the
real model. Peak RAM stays under 1 GB whatever the shape (0.67 GB measured
for 8B, most of it torch itself): each tensor is generated and written in
chunks of CHUNK elements (the 8B fp32 checkpoint is 30 GB on disk and never in
memory). 8B: about 2 min (bf16, 15 GB) and 3 min (fp32) on 2 cores.

Values: matrices ~ N(0, 0.02), norm weights ~ N(1, 0.02), the ArmoRM head as
in tests/checkpoints.py; deterministic in (--seed, tensor name). Every value is
bf16-representable (drawn in fp32 and rounded to bf16, round-to-nearest-even)
and the fp32 checkpoint stores those same values widened: an fp32 checkpoint
loaded with torch_dtype=bfloat16 must score exactly like the bf16 checkpoint
of the same seed, which benchmarks/big_model.py checks.

Each shard appears under its final name only when complete (written to a
temporary file, fsynced, renamed); config.json is written last, so a directory
with a config.json is a finished checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from armorm.safetensors_io import save_file  # noqa: E402

SHAPES: Dict[str, Dict[str, int]] = {
    # Llama-3-8B (and ArmoRM-Llama3-8B) / Llama-3.2-1B-like / small ones for tests and smoke runs
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256),
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, inter=1536, vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=128256),
}
#: ArmoRM-Llama3-8B-v0.1's head sizes.
HEAD = dict(num_objectives=19, gating_hidden_dim=1024, gating_n_hidden=3, gating_temperature=10)
CHUNK = 1 << 23  # elements generated at a time (32 MB of fp32)
DTYPES = {"bf16": ("BF16", "bfloat16"), "bfloat16": ("BF16", "bfloat16"),
          "fp32": ("F32", "float32"), "float32": ("F32", "float32")}


def tensor_list(shape: Dict[str, int], arch: str) -> List[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor, in file order; kind picks the distribution."""
    H, I, V = shape["hidden"], shape["inter"], shape["vocab"]
    hd = H // shape["heads"]
    QD, KD = shape["heads"] * hd, shape["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (V, H), "w")]
    for l in range(shape["layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (H,), "norm"),
                (p + "self_attn.q_proj.weight", (QD, H), "w"),
                (p + "self_attn.k_proj.weight", (KD, H), "w"),
                (p + "self_attn.v_proj.weight", (KD, H), "w"),
                (p + "self_attn.o_proj.weight", (H, QD), "w"),
                (p + "post_attention_layernorm.weight", (H,), "norm"),
                (p + "mlp.gate_proj.weight", (I, H), "w"),
                (p + "mlp.up_proj.weight", (I, H), "w"),
                (p + "mlp.down_proj.weight", (H, I), "w")]
    out.append(("model.norm.weight", (H,), "norm"))
    if arch == "armorm":
        K, D, nh = HEAD["num_objectives"], HEAD["gating_hidden_dim"], HEAD["gating_n_hidden"]
        out += [("regression_layer.weight", (K, H), "regression"),
                ("reward_transform_matrix", (K, K), "transform")]
        dims = [H] + [D] * nh + [K]
        for j in range(nh + 1):
            out += [(f"gating.layers.{j}.weight", (dims[j + 1], dims[j]), f"gate{dims[j]}"),
                    (f"gating.layers.{j}.bias", (dims[j + 1],), "bias")]
        out.append(("gating.logit_scale", (1,), "one"))
    return out


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def chunks(name: str, shape: Tuple[int, ...], kind: str, st_dtype: str, seed: int) -> Iterator[np.ndarray]:
    """The tensor's stored bytes in chunks (BF16 as uint16 bits), same values for either dtype."""
    import torch
    n = math.prod(shape)
    g = torch.Generator().manual_seed(_seed(seed, name))
    side = int(shape[0]) if kind == "transform" else 0
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = torch.empty(m, dtype=torch.float32)
        if kind == "one":
            x.fill_(1.0)
        elif kind == "norm":
            x.normal_(1.0, 0.02, generator=g)
        elif kind == "w":
            x.normal_(0.0, 0.02, generator=g)
        elif kind == "regression":
            x.normal_(0.0, 0.2, generator=g)
        elif kind == "bias":
            x.normal_(0.0, 0.1, generator=g)
        elif kind == "transform":  # identity + 0.15 N(0, 1), row-major
            x.normal_(0.0, 0.15, generator=g)
            idx = torch.arange(start, start + m)
            x[idx // side == idx % side] += 1.0
        elif kind.startswith("gate"):  # N(0, 2 / sqrt(fan_in)), as tests/checkpoints.py
            x.normal_(0.0, 2.0 / math.sqrt(int(kind[4:])), generator=g)
        else:
            raise ValueError(kind)
        b = x.to(torch.bfloat16)
        if st_dtype == "BF16":
            yield b.view(torch.int16).numpy().view(np.uint16)
        else:
            yield b.to(torch.float32).numpy()


def plan_shards(tensors: List[Tuple[str, Tuple[int, ...], str]], itemsize: int, shard_bytes: int) -> List[List[int]]:
    """Consecutive tensors grouped so that each group stays under shard_bytes (a bigger tensor alone)."""
    shards: List[List[int]] = [[]]
    used = 0
    for i, (_, shape, _) in enumerate(tensors):
        b = math.prod(shape) * itemsize
        if shards[-1] and used + b > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += b
    return shards


def config_json(shape: Dict[str, int], arch: str, torch_dtype: str) -> dict:
    """Llama-3-8B's config.json with the shape's sizes (plus ArmoRM's head keys for arch armorm)."""
    cfg = {
        "architectures": ["LlamaForRewardModelWithGating" if arch == "armorm" else "LlamaModel"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128009 if arch == "armorm" else 128001, "hidden_act": "silu",
        "hidden_size": shape["hidden"], "initializer_range": 0.02, "intermediate_size": shape["inter"],
        "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": shape["heads"], "num_hidden_layers": shape["layers"],
        "num_key_value_heads": shape["kv_heads"], "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": torch_dtype, "use_cache": True, "vocab_size": shape["vocab"],
    }
    if arch == "armorm":
        cfg.update(HEAD)
    return cfg


def make_checkpoint(out: os.PathLike, shape: str = "8b", dtype: str = "bf16", arch: str = "armorm",
                    seed: int = 0, shard_gb: float = 5.0, quiet: bool = False) -> Path:
    """Writes the checkpoint into `out` (created; existing shards of the same names are replaced)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    if arch not in ("armorm", "backbone"):
        raise ValueError(f"arch must be armorm or backbone, got {arch!r}")
    import torch
    torch.set_num_threads(1)  # generation is serial per generator; keep the footprint small
    st_dtype, torch_dtype = DTYPES[dtype]
    itemsize = 2 if st_dtype == "BF16" else 4
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # the completion marker, rewritten last
    tensors = tensor_list(SHAPES[shape], arch)
    shards = plan_shards(tensors, itemsize, int(shard_gb * 1e9))
    weight_map: Dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for s, idx in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = {}
        for i in idx:
            name, shp, kind = tensors[i]
            specs[name] = (st_dtype, shp, chunks(name, shp, kind, st_dtype, seed))
            weight_map[name] = fname
            total += math.prod(shp) * itemsize
        save_file(specs, out / fname, metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # mkstemp made it private; a checkpoint is shared data
        if not quiet:
            print(f"  {fname}: {len(idx)} tensors, {(out / fname).stat().st_size / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config_json(SHAPES[shape], arch, torch_dtype), indent=2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--arch", choices=("armorm", "backbone"), default="armorm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=5.0, help="most GB per shard file (default 5)")
    args = ap.parse_args()
    t = time.perf_counter()
    make_checkpoint(args.out, args.shape, args.dtype, args.arch, args.seed, args.shard_gb)
    import resource
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
