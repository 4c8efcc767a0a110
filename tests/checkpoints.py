"""Tiny random checkpoints for the tests, built with transformers.

The backbone is a real `transformers` LlamaModel; the ArmoRM head tensors are
random (transform matrix not the identity, logit_scale not 1) and the
reference head is computed in `reference_armorm_head` straight from docs/model.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

ST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Tiny:
    path: Path
    config: LlamaConfig
    backbone: LlamaModel          # fp32 copy of the stored weights (after dtype rounding)
    head: Dict[str, torch.Tensor]  # fp32 head tensors (after dtype rounding)
    head_cfg: Dict[str, float]


def llama_config(*, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=300, head_dim=None,
                 rope_scaling=None, max_pos=2048, pad_token_id=None, rms_eps=1e-5, rope_theta=10000.0,
                 **extra) -> LlamaConfig:
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
              max_position_embeddings=max_pos, pad_token_id=pad_token_id, rms_norm_eps=rms_eps,
              initializer_range=0.08, tie_word_embeddings=False, **extra)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    kw["rope_parameters"] = rope
    return LlamaConfig(**kw)


def _rounded(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.detach().to(ST_DTYPES[dtype]).to(torch.float32).contiguous()


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor], dtype: str, shards: int = 1) -> None:
    """Writes tensors as model.safetensors, or as `shards` files plus the index."""
    tensors = {k: v.detach().to(ST_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _config_json(cfg: LlamaConfig, architectures, dtype: str, extra: Optional[dict] = None) -> dict:
    d = cfg.to_dict()
    d["architectures"] = architectures
    d["torch_dtype"] = dtype
    d.update(extra or {})
    return d


def make_armorm(path: Path, *, dtype="float32", shards=1, seed=0, num_objectives=19, gating_hidden=48,
                gating_n_hidden=3, temperature=10.0, **cfg_kw) -> Tiny:
    """An ArmoRM-shaped checkpoint (LlamaForRewardModelWithGating)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = llama_config(**cfg_kw)
    backbone = LlamaModel(cfg).eval()
    H, K, D = cfg.hidden_size, num_objectives, gating_hidden
    g = torch.Generator().manual_seed(seed + 1)
    head: Dict[str, torch.Tensor] = {
        "regression_layer.weight": torch.randn(K, H, generator=g) * 0.2,
        "reward_transform_matrix": torch.eye(K) + 0.15 * torch.randn(K, K, generator=g),
        "gating.logit_scale": torch.tensor([1.7]),
    }
    dims = [H] + [D] * gating_n_hidden + [K]
    for j in range(gating_n_hidden + 1):
        head[f"gating.layers.{j}.weight"] = torch.randn(dims[j + 1], dims[j], generator=g) / math.sqrt(dims[j]) * 2
        head[f"gating.layers.{j}.bias"] = torch.randn(dims[j + 1], generator=g) * 0.1
    tensors = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    tensors.update(head)
    save_tensors(path, tensors, dtype, shards)
    extra = {"num_objectives": K, "gating_hidden_dim": D, "gating_n_hidden": gating_n_hidden,
             "gating_temperature": temperature}
    (path / "config.json").write_text(json.dumps(
        _config_json(cfg, ["LlamaForRewardModelWithGating"], dtype, extra), indent=2))
    # the reference sees exactly the stored (rounded) values
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(_rounded(p, dtype))
    head = {k: _rounded(v, dtype) for k, v in head.items()}
    return Tiny(path, cfg, backbone, head, {"temperature": temperature, "n_hidden": gating_n_hidden})


def make_seqcls(path: Path, *, dtype="float32", num_labels=1, seed=0, **cfg_kw):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = llama_config(num_labels=num_labels, **cfg_kw)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.3)
    model.to(ST_DTYPES[dtype]).save_pretrained(path, safe_serialization=True)
    return model.float()


def make_backbone(path: Path, *, dtype="float32", seed=0, max_shard_size=None, **cfg_kw) -> LlamaModel:
    """A bare LlamaModel saved with save_pretrained (optionally sharded)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = llama_config(**cfg_kw)
    model = LlamaModel(cfg).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(ST_DTYPES[dtype]).save_pretrained(path, safe_serialization=True, **kw)
    return model.float()


def reference_armorm_head(hs: torch.Tensor, p_r: int, p_g: int, head: Dict[str, torch.Tensor],
                          temperature: float, n_hidden: int) -> Dict[str, torch.Tensor]:
    """The ArmoRM head of docs/model.md, for one sequence's final hidden states hs [L, H]."""
    hidden = hs[p_r]
    prompt = hs[p_g]
    rewards = head["regression_layer.weight"] @ hidden
    x = prompt
    for j in range(n_hidden + 1):
        x = head[f"gating.layers.{j}.weight"] @ x + head[f"gating.layers.{j}.bias"]
        if j < n_hidden:
            x = torch.relu(x)
    gating = torch.softmax(x / temperature, dim=0) * head["gating.logit_scale"][0]
    adjusted = rewards @ head["reward_transform_matrix"]
    score = (gating * adjusted).sum()
    return {"rewards": rewards, "gating_output": gating, "score": score, "hidden_state": hidden,
            "prompt_embedding": prompt}
