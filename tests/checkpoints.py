"""Tiny random checkpoints for the tests, built with transformers.

The backbone is a real `transformers` model of the family asked for (Llama,
Qwen2, Qwen3, Gemma-2: `FAMILIES`); the ArmoRM head tensors are random
(transform matrix not the identity, logit_scale not 1) and the reference head
is computed in `reference_armorm_head` straight from docs/model.md. Outside
Llama the norm weights are random too (transformers initialises them to 1, or
0 for Gemma's 1 + w), so a norm the forward pass skipped or mis-offset shows.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
import transformers
from transformers import LlamaConfig, LlamaModel

#: Llama-3's rope_scaling, scaled down to the tiny checkpoints' context.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

ST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: family -> transformers class-name prefix
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2"}


def hf_class(family: str, suffix: str):
    """transformers' class for a family: hf_class("gemma2", "ForSequenceClassification")."""
    return getattr(transformers, FAMILIES[family] + suffix)


@dataclass
class Tiny:
    path: Path
    config: LlamaConfig           # (or the family's config class)
    backbone: LlamaModel          # fp32 copy of the stored weights (after dtype rounding); the family's *Model
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


def family_config(family: str, *, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=300, head_dim=None,
                  rope_scaling=None, max_pos=2048, pad_token_id=None, rms_eps=1e-5, rope_theta=10000.0, **extra):
    """A tiny config of `family`. Family keys come through `extra` (Gemma-2: query_pre_attn_scalar,
    sliding_window, attn_logit_softcapping, ...; Qwen: use_sliding_window, sliding_window, max_window_layers,
    attention_bias)."""
    if family == "llama":
        return llama_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, inter=inter, vocab=vocab,
                            head_dim=head_dim, rope_scaling=rope_scaling, max_pos=max_pos,
                            pad_token_id=pad_token_id, rms_eps=rms_eps, rope_theta=rope_theta, **extra)
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
              max_position_embeddings=max_pos, pad_token_id=pad_token_id, rms_norm_eps=rms_eps,
              initializer_range=0.08, tie_word_embeddings=False,
              head_dim=head_dim if head_dim is not None else hidden // heads)
    if family == "gemma2":
        kw.update(query_pre_attn_scalar=24, sliding_window=48, attn_logit_softcapping=3.0,
                  final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    kw["rope_parameters"] = rope
    kw.update(extra)
    return hf_class(family, "Config")(**kw)


def randomize_norms(model: torch.nn.Module, family: str, seed: int) -> None:
    """Random norm weights: around 0 for Gemma's (1 + w) norms, around 1 elsewhere."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if family == "gemma2" else 1.0) + 0.3 * torch.randn(p.shape, generator=g))


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
                gating_n_hidden=3, temperature=10.0, family="llama", **cfg_kw) -> Tiny:
    """An ArmoRM-shaped checkpoint (<Family>ForRewardModelWithGating; LlamaForRewardModelWithGating by default)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = family_config(family, **cfg_kw)
    backbone = hf_class(family, "Model")(cfg).eval()
    if family != "llama":
        randomize_norms(backbone, family, seed)
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
        _config_json(cfg, [FAMILIES[family] + "ForRewardModelWithGating"], dtype, extra), indent=2))
    # the reference sees exactly the stored (rounded) values
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(_rounded(p, dtype))
    head = {k: _rounded(v, dtype) for k, v in head.items()}
    return Tiny(path, cfg, backbone, head, {"temperature": temperature, "n_hidden": gating_n_hidden})


def _save_hf(model, path: Path, family: str, dtype: str, seed: int, **save_kw):
    """Randomizes the norms (outside Llama), saves in `dtype`, returns the fp32 model on the stored values."""
    if family != "llama":
        randomize_norms(model, family, seed)
    model.to(ST_DTYPES[dtype]).save_pretrained(path, safe_serialization=True, **save_kw)
    # fp32 weights equal to the stored ones; buffers (RoPE, Gemma's embed_scale) recomputed in fp32
    cfg = copy.deepcopy(model.config)
    cfg.dtype = torch.float32  # (save_pretrained in bf16 left the config saying bf16)
    fresh = type(model)(cfg).eval()
    fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert {p.dtype for p in fresh.parameters()} == {torch.float32}
    return fresh


def make_seqcls(path: Path, *, dtype="float32", num_labels=1, seed=0, family="llama", **cfg_kw):
    """A <Family>ForSequenceClassification saved with save_pretrained."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = family_config(family, num_labels=num_labels, **cfg_kw)
    model = hf_class(family, "ForSequenceClassification")(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.3)
    return _save_hf(model, path, family, dtype, seed)


def make_backbone(path: Path, *, dtype="float32", seed=0, max_shard_size=None, family="llama", **cfg_kw):
    """A bare <Family>Model saved with save_pretrained (optionally sharded)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = family_config(family, **cfg_kw)
    model = hf_class(family, "Model")(cfg).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    return _save_hf(model, path, family, dtype, seed, **kw)


def make_causallm(path: Path, *, dtype="float32", seed=0, family="llama", tie=False, **cfg_kw):
    """A <Family>ForCausalLM saved with save_pretrained; `tie`: tied embeddings (no lm_head tensor stored)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = family_config(family, **cfg_kw)
    cfg.tie_word_embeddings = tie
    model = hf_class(family, "ForCausalLM")(cfg).eval()
    return _save_hf(model, path, family, dtype, seed)


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
