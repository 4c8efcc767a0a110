"""The load pass over a checkpoint's bytes (csrc/weight_pass.c): conversion, NaN/inf scan, memory.

- dtype conversion at load rounds like torch (round to nearest even, ties
  included) whether the tensor is small or spans many 4 MiB chunks;
- the NaN/inf scan counts exactly across chunk boundaries, in tensors held
  as stored and in tensors converted (the scan is fused with conversion);
- tensors whose bytes are not aligned to their element size load (into an
  aligned copy), score and scan like aligned ones;
- an fp32 checkpoint held in bf16 never has its fp32 bytes resident next to
  the converted copy (peak RSS of a fresh process), and a zero-copy model
  does not keep the embedding's pages mapped after the scan.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import armorm
from checkpoints import make_armorm, make_backbone

PATTERN = [5, 6, 7]
# a vocabulary large enough that the embedding spans several 4 MiB chunks in every dtype
BIG_EMBED = dict(hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=100_000, max_pos=64,
                 gating_hidden=8, gating_n_hidden=1)
EMBED = "model.embed_tokens.weight"


def seqs():
    rng = np.random.default_rng(3)
    out = []
    for n in (9, 40):
        s = rng.integers(8, 100_000, size=n)
        s[n - 6:n - 3] = PATTERN
        out.append(s)
    return out


def with_ties(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """fp32 values of which a third lie exactly halfway between two bf16 values and a third between two f16 values."""
    x = t.detach().float().clone().contiguous()
    bits = x.view(torch.int32)
    u = torch.from_numpy(rng.random(x.numel())).view(x.shape)
    bf16_tie, f16_tie = u < 1 / 3, (u >= 1 / 3) & (u < 2 / 3)
    bits[bf16_tie] = (bits[bf16_tie] & ~0xFFFF) | 0x8000  # 16 dropped bits: exactly half an ulp
    bits[f16_tie] = (bits[f16_tie] & ~0x1FFF) | 0x1000    # 13 dropped bits (normal f16 range)
    return x


@pytest.fixture(scope="module")
def fp32_with_ties(tmp_path_factory):
    """An fp32 ArmoRM checkpoint whose backbone matrices are full of rounding ties, and its tensors."""
    tiny = make_armorm(tmp_path_factory.mktemp("ties") / "f32", dtype="float32", seed=4, **BIG_EMBED)
    f = tiny.path / "model.safetensors"
    tensors = load_file(str(f))
    rng = np.random.default_rng(0)
    for k, v in tensors.items():
        if k.startswith("model.") and v.ndim == 2:
            tensors[k] = with_ties(v, rng)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return tiny.path, tensors


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_conversion_rounds_like_torch(tmp_path, fp32_with_ties, dtype):
    """fp32 held in bf16/f16 == the same matrices rounded by torch and stored so (the rest fp32 in both)."""
    src, tensors = fp32_with_ties
    d = tmp_path / "rounded"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    rounded = {k: (v.to(getattr(torch, dtype)) if k.startswith("model.") and v.ndim == 2 else v)
               for k, v in tensors.items()}
    save_file(rounded, str(d / "model.safetensors"), metadata={"format": "pt"})
    converted = armorm.ArmoRM.from_pretrained(src, gating_pattern=PATTERN, torch_dtype=dtype, num_threads=2)
    stored = armorm.ArmoRM.from_pretrained(d, gating_pattern=PATTERN, torch_dtype=dtype, num_threads=2)
    assert converted.dtype == stored.dtype == dtype
    a, b = converted.score_sequences(seqs()), stored.score_sequences(seqs())
    for f in ("hidden_state", "prompt_embedding", "rewards", "score"):
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def put_nonfinite(path: Path, name: str, dtype: torch.dtype, positions, values) -> None:
    tensors = load_file(str(path))
    t = tensors[name].to(dtype).clone()
    flat = t.view(-1)
    for p, v in zip(positions, values):
        flat[p] = v
    tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("stored,held", [("float32", None), ("float32", "bfloat16"), ("float32", "float16"),
                                         ("bfloat16", None), ("bfloat16", "float32"), ("float16", None),
                                         ("float16", "bfloat16")])
@pytest.mark.parametrize("name", [EMBED, "model.layers.0.mlp.down_proj.weight"])
def test_nonfinite_counted_exactly(tmp_path, stored, held, name):
    """NaN/inf at the ends and spread through a tensor are all counted, held as stored or converted."""
    tiny = make_armorm(tmp_path / "m", dtype=stored, **BIG_EMBED)
    f = tiny.path / "model.safetensors"
    n = load_file(str(f))[name].numel()
    positions = sorted({0, 1, n // 7, n // 3, n // 2 + 1, n - 2, n - 1})
    values = [float("nan"), float("inf"), float("-inf")] * 3
    put_nonfinite(f, name, getattr(torch, stored), positions, values)
    with pytest.raises(armorm.CheckpointError,
                       match=rf"{name.replace('.', '[.]')}' holds {len(positions)} NaN/inf values"):
        armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype=held, num_threads=2)
    model = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype=held, num_threads=2,
                                          check_finite=False)
    assert model.score_sequences([[0, 8, 9, 5, 6, 7, 10]]).hidden_state.shape == (1, 32)


def test_first_nonfinite_tensor_by_name(tmp_path):
    """Two bad tensors: the error names the same one whatever the thread timing (the first by name)."""
    tiny = make_armorm(tmp_path / "m", dtype="float32", **BIG_EMBED)
    f = tiny.path / "model.safetensors"
    put_nonfinite(f, EMBED, torch.float32, [5], [float("nan")])
    put_nonfinite(f, "model.layers.0.self_attn.q_proj.weight", torch.float32, [5], [float("nan")])
    for _ in range(3):
        with pytest.raises(armorm.CheckpointError, match=r"embed_tokens\.weight' holds 1 NaN/inf value "):
            armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype="bfloat16", num_threads=2)


def misalign(path: Path) -> None:
    """Rewrites a safetensors file with one more space of header padding: every tensor starts at an odd address."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].rstrip(b" ")
    if (8 + len(header)) % 2 == 0:
        header += b" "
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


@pytest.mark.parametrize("stored,held", [("float32", None), ("bfloat16", None), ("float16", None),
                                         ("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16")])
def test_misaligned_tensors_load_and_scan(tmp_path, stored, held):
    """Every tensor at an odd address: held as stored (copied aligned) or converted, same results and counts."""
    tiny = make_armorm(tmp_path / "m", dtype=stored, **BIG_EMBED)
    good = armorm.ArmoRM.from_pretrained(tiny.path, gating_pattern=PATTERN, torch_dtype=held)
    want = good.score_sequences(seqs())
    good_T = np.array(good.reward_transform_matrix)
    good.close()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((tiny.path / "config.json").read_text())
    (odd / "model.safetensors").write_bytes((tiny.path / "model.safetensors").read_bytes())
    misalign(odd / "model.safetensors")
    raw = (odd / "model.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 2 == 1
    got = armorm.ArmoRM.from_pretrained(odd, gating_pattern=PATTERN, torch_dtype=held, num_threads=2)
    for f in ("hidden_state", "score"):
        np.testing.assert_array_equal(got.score_sequences(seqs())[f], want[f])
    # head tensors read back through the binding (aligned copies of the odd addresses)
    np.testing.assert_array_equal(np.asarray(got.reward_transform_matrix), np.asarray(good_T))
    got.close()
    n = load_file(str(tiny.path / "model.safetensors"))[EMBED].numel()
    put_nonfinite(odd / "model.safetensors", EMBED, getattr(torch, stored), [0, n // 2, n - 1], [float("nan")] * 3)
    misalign(odd / "model.safetensors")
    with pytest.raises(armorm.CheckpointError, match=r"embed_tokens\.weight' holds 3 NaN/inf values"):
        armorm.ArmoRM.from_pretrained(odd, gating_pattern=PATTERN, torch_dtype=held)


RSS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import armorm

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

before = status()
m = armorm.ArmoRM.from_pretrained(sys.argv[1], num_threads=2, **json.loads(sys.argv[2]))
after = status()
print(json.dumps({"before": before, "after": after, "prepacked_bytes": m.prepacked_bytes}))
"""


def load_rss(path: Path, **kw) -> dict:
    """/proc/self/status before and after from_pretrained(path, **kw) in a fresh process, and its prepacked bytes."""
    root = str(Path(armorm.__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), json.dumps(kw), root], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def big_embedding_fp32(tmp_path_factory):
    """An fp32 backbone whose embedding (128 MiB) dwarfs the rest."""
    d = tmp_path_factory.mktemp("rss") / "m"
    make_backbone(d, dtype="float32", hidden=256, heads=4, kv_heads=2, inter=256, layers=1, vocab=131072)
    return d


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fp32_held_in_bf16_never_holds_both(big_embedding_fp32):
    """Peak RSS grows by the bf16 copy plus a few chunks, not by any fp32 tensor (the embedding is 128 MiB)."""
    fp32_bytes = (big_embedding_fp32 / "model.safetensors").stat().st_size
    bf16_bytes = fp32_bytes // 2
    r = load_rss(big_embedding_fp32, torch_dtype="bfloat16")
    grew = r["after"]["VmHWM"] - r["before"]["VmHWM"]
    assert grew < bf16_bytes + 48 * 2**20, (grew, bf16_bytes)
    assert r["after"]["RssFile"] - r["before"]["RssFile"] < 8 * 2**20  # no source page stays mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_zero_copy_scan_leaves_embedding_unmapped(big_embedding_fp32):
    """Held as stored: the scan maps every page, then unmaps the embedding's (read later row by row)."""
    size = (big_embedding_fp32 / "model.safetensors").stat().st_size
    embed = 131072 * 256 * 4
    r = load_rss(big_embedding_fp32, torch_dtype="float32")
    mapped = r["after"]["RssFile"] - r["before"]["RssFile"]
    assert size - embed - 8 * 2**20 < mapped < size - embed + 8 * 2**20, (mapped, size, embed)
