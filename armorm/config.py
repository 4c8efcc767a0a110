"""Reading a Hugging Face model directory: config.json and the weight files.

Everything here is parsing and validation of files that may come from the
internet; nothing from the model directory is ever executed. The numbers go to
the C core, which checks them again against the tensors it maps.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import _core

#: The 19 ArmoRM objectives, in the order of the regression layer's rows.
ATTRIBUTES: List[str] = [
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence",
    "helpsteer-complexity", "helpsteer-verbosity", "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following", "ultrafeedback-truthfulness",
    "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity",
    "code-style", "code-explanation", "code-instruction-following", "code-readability",
]


def objective_names(k: int, names: Sequence[str] = ATTRIBUTES) -> List[str]:
    """`names` when there are `k` of them, else objective-0 ... objective-(k-1)."""
    return list(names) if k == len(names) else [f"objective-{i}" for i in range(k)]

ARCHITECTURES: Dict[str, int] = {
    "LlamaForRewardModelWithGating": _core.ARCH_ARMORM,
    "LlamaForSequenceClassification": _core.ARCH_SEQCLS,
    "LlamaModel": _core.ARCH_BACKBONE,
    "LlamaForCausalLM": _core.ARCH_CAUSALLM,
}

MAX_CONFIG_BYTES = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """A model directory is missing, malformed, or inconsistent with its config."""


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{what} {path} is {size} bytes; refusing to parse more than {MAX_CONFIG_BYTES}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} {path} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is nested too deeply") from None


def _int(raw: Dict[str, Any], key: str, default: Any = None) -> int:
    v = raw.get(key, default)
    if v is None:
        raise CheckpointError(f"config.json: '{key}' is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise CheckpointError(f"config.json: '{key}' must be an integer, got {v!r}")
    if not -2**31 <= v < 2**31:
        raise CheckpointError(f"config.json: '{key}' = {v!r} is out of range")
    return int(v)


def _float(raw: Dict[str, Any], key: str, default: Any = None) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CheckpointError(f"config.json: '{key}' must be a finite number, got {v!r}")
    return float(v)


@dataclass
class ModelConfig:
    """The parts of config.json armorm uses, with the reference's defaults."""

    architecture: str
    core: Dict[str, Any]           # the dict handed to armorm._core.Model
    pad_token_id: Optional[int]
    raw: Dict[str, Any] = field(repr=False)

    @property
    def hidden_size(self) -> int:
        return self.core["hidden_size"]

    @property
    def num_objectives(self) -> int:
        return self.core["num_objectives"]

    @property
    def max_position_embeddings(self) -> int:
        return self.core["max_position_embeddings"]


def _rope(raw: Dict[str, Any]) -> Dict[str, Any]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params
        theta = _float(params, "rope_theta")
    else:
        scaling = raw.get("rope_scaling")
        theta = _float(raw, "rope_theta", 10000.0)
    out: Dict[str, Any] = {"rope_theta": theta, "rope_type": _core.ROPE_DEFAULT}
    if scaling is None:
        return out
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return out
    if kind == "llama3":
        out.update(
            rope_type=_core.ROPE_LLAMA3,
            rope_factor=_float(scaling, "factor"),
            rope_low_freq_factor=_float(scaling, "low_freq_factor"),
            rope_high_freq_factor=_float(scaling, "high_freq_factor"),
            rope_original_max_position_embeddings=_int(scaling, "original_max_position_embeddings"),
        )
        return out
    if kind == "linear":
        out.update(rope_type=_core.ROPE_LINEAR, rope_factor=_float(scaling, "factor"))
        return out
    raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported (supported: default, "
                          "linear, llama3)")


def load_config(model_dir: os.PathLike | str, architecture: Optional[str] = None,
                compute_head: bool = True) -> ModelConfig:
    """Reads `model_dir/config.json` into a ModelConfig.

    `architecture` overrides the config's `architectures[0]` (e.g. "LlamaModel"
    to use an ArmoRM checkpoint's backbone only: its head tensors are then
    checked but not computed).
    """
    d = Path(model_dir)
    raw = _read_json(d / "config.json", "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{d / 'config.json'}: expected a JSON object")
    declared = raw.get("architectures") or ["LlamaModel"]
    if not isinstance(declared, list) or not declared or not isinstance(declared[0], str):
        raise CheckpointError("config.json: 'architectures' must be a list of class names")
    arch = declared[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"config.json: architecture {arch!r} is not supported; supported: "
                              + ", ".join(ARCHITECTURES))
    if raw.get("model_type", "llama") != "llama":
        raise CheckpointError(f"config.json: model_type {raw.get('model_type')!r} is not supported (only llama)")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    H = _int(raw, "hidden_size")
    nh = _int(raw, "num_attention_heads")
    if nh <= 0:
        raise CheckpointError("config.json: num_attention_heads must be positive")
    if raw.get("head_dim") is not None:
        head_dim = _int(raw, "head_dim")
    elif H % nh == 0:
        head_dim = H // nh
    else:
        raise CheckpointError(f"config.json: hidden_size {H} is not a multiple of num_attention_heads {nh} "
                              "and no head_dim is given")
    core: Dict[str, Any] = {
        "arch": ARCHITECTURES[arch],
        "compute_head": int(compute_head and (architecture is None or architecture == arch)),
        "hidden_size": H,
        "intermediate_size": _int(raw, "intermediate_size"),
        "num_hidden_layers": _int(raw, "num_hidden_layers"),
        "num_attention_heads": nh,
        "num_key_value_heads": _int(raw, "num_key_value_heads", nh),
        "head_dim": head_dim,
        "vocab_size": _int(raw, "vocab_size"),
        "max_position_embeddings": _int(raw, "max_position_embeddings", 2048),
        "rms_norm_eps": _float(raw, "rms_norm_eps", 1e-6),
        "attention_bias": int(bool(raw.get("attention_bias", False))),
        "mlp_bias": int(bool(raw.get("mlp_bias", False))),
        "tie_word_embeddings": int(bool(raw.get("tie_word_embeddings", False))),
        "num_objectives": _int(raw, "num_objectives", 19),
        "gating_temperature": _float(raw, "gating_temperature", 10),
        "gating_hidden_dim": _int(raw, "gating_hidden_dim", 1024),
        "gating_n_hidden": _int(raw, "gating_n_hidden", 3),
        "num_labels": _num_labels(raw),
    }
    core.update(_rope(raw))
    pad = raw.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise CheckpointError(f"config.json: pad_token_id must be an integer or null, got {pad!r}")
    return ModelConfig(architecture=arch, core=core, pad_token_id=pad, raw=raw)


def _num_labels(raw: Dict[str, Any]) -> int:
    if "num_labels" in raw:
        return _int(raw, "num_labels")
    id2label = raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return 1


def weight_files(model_dir: os.PathLike | str) -> List[str]:
    """The safetensors files of a model directory, validated for existence.

    Sharded checkpoints list their files in `model.safetensors.index.json`;
    the names there must be plain file names inside the directory.
    """
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        idx = _read_json(index, "shard index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object")
        names = []
        for tensor, fname in wm.items():
            if (not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname
                    or fname in (".", "..") or "\x00" in fname):
                raise CheckpointError(f"{index}: tensor {tensor!r} maps to an invalid file name {fname!r}")
            if fname not in names:
                names.append(fname)
        paths = []
        for fname in sorted(names):
            p = d / fname
            if not p.is_file():
                raise CheckpointError(f"{index} lists {fname}, which is missing from {d}")
            paths.append(str(p))
        return paths
    single = d / "model.safetensors"
    if single.is_file():
        return [str(single)]
    if any((d / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointError(f"{d} holds only PyTorch pickle weights; armorm loads safetensors only "
                              "(pickles can execute code). Convert them with safetensors first.")
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} is not a model directory (no config.json)")
    raise CheckpointError(f"{d} has no model.safetensors or model.safetensors.index.json")
