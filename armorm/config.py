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


#: Supported families: class-name prefix -> config.json `model_type`.
FAMILIES: Dict[str, str] = {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3", "Gemma2": "gemma2"}

#: Class-name suffix -> (the core's head, its kind). `<Family>ForRewardModelWithGating` is the
#: ArmoRM head on that family's backbone (RLHFlow's `LlamaForRewardModelWithGating` for Llama).
HEADS: Dict[str, tuple] = {
    "ForRewardModelWithGating": (_core.ARCH_ARMORM, "armorm"),
    "ForSequenceClassification": (_core.ARCH_SEQCLS, "seqcls"),
    "Model": (_core.ARCH_BACKBONE, "backbone"),
    "ForCausalLM": (_core.ARCH_CAUSALLM, "causallm"),
}


#: Every supported class name -> the core's head code.
ARCHITECTURES: Dict[str, int] = {f + h: code for f in FAMILIES for h, (code, _) in HEADS.items()}

# transformers' names for the tanh approximation of GELU (the same function)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")

#: ArmoRM's head sizes when config.json does not give them (the released model's), from the model
#: description (csrc/model.h): num_objectives, gating_temperature, gating_hidden_dim, gating_n_hidden.
HEAD_DEFAULTS: Dict[str, Any] = dict(_core.HEAD_DEFAULTS)

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
    family: str = "llama"          # model_type: llama, qwen2, qwen3, gemma2

    @property
    def kind(self) -> str:
        """What the checkpoint's class holds: "armorm", "seqcls", "backbone" or "causallm"."""
        return _split_class(self.architecture)[1]

    @property
    def pad_rule(self) -> str:
        """How a padded 2-D batch row ends, as the reference class reads it.

        "last_non_pad" (every `*ForSequenceClassification`: the rightmost token
        that is not the pad token) or "first_pad" (the ArmoRM class: the token
        before the first pad token; also used for bare backbones).
        """
        return "last_non_pad" if self.kind == "seqcls" else "first_pad"

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


def _split_class(name: str) -> tuple:
    """("Gemma2", "seqcls") for "Gemma2ForSequenceClassification"; ValueError when unsupported."""
    for f in FAMILIES:
        if name.startswith(f) and name[len(f):] in HEADS:
            return f, HEADS[name[len(f):]][1]
    raise ValueError(name)


def _bool(raw: Dict[str, Any], key: str, default: bool) -> bool:
    v = raw.get(key, default)
    if v is None:
        return default
    if v not in (True, False):  # (0 and 1 too, as Python reads them)
        raise CheckpointError(f"config.json: '{key}' must be true or false, got {v!r}")
    return bool(v)


def _positive_or_null(raw: Dict[str, Any], key: str, required: bool = False) -> Optional[float]:
    """A positive number or null (absent: null, or an error naming the key when required)."""
    if key not in raw:
        if required:
            raise CheckpointError(f"config.json: '{key}' is required for this architecture (a number or null)")
        return None
    if raw[key] is None:
        return None
    v = _float(raw, key)
    if v <= 0:
        raise CheckpointError(f"config.json: '{key}' must be positive or null, got {raw[key]!r}")
    return v


def _activation(raw: Dict[str, Any], key: str, default: str, allowed: tuple) -> int:
    v = raw.get(key, default)
    if v in _GELU_TANH and any(a in _GELU_TANH for a in allowed):
        return _core.ACT_GELU_TANH
    if v == "silu" and "silu" in allowed:
        return _core.ACT_SILU
    raise CheckpointError(f"config.json: {key} {v!r} is not supported for this architecture "
                          f"(supported: {', '.join(allowed)})")


def _layer_types(raw: Dict[str, Any], n_layers: int, default: List[str]) -> List[str]:
    types = raw.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, list) or len(types) != n_layers or \
            any(t not in ("full_attention", "sliding_attention") for t in types):
        raise CheckpointError(f"config.json: 'layer_types' must list 'full_attention' or 'sliding_attention' for "
                              f"each of the {n_layers} layers, got {types!r}")
    return types


def _sliding(raw: Dict[str, Any], family: str, n_layers: int) -> Dict[str, Any]:
    """The sliding-window switches: window size and the layers that use it (as transformers 5 reads them)."""
    if family == "gemma2":
        window = _int(raw, "sliding_window")  # Gemma-2 alternates sliding and full layers: the size is required
        if window <= 0:
            raise CheckpointError(f"config.json: 'sliding_window' must be positive, got {window}")
        default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        why = "sliding_window"
    elif family in ("qwen2", "qwen3"):
        # the window exists only with use_sliding_window; then layers from max_window_layers on slide
        window = None
        if _bool(raw, "use_sliding_window", False):
            window = _int(raw, "sliding_window", 4096) if raw.get("sliding_window", 4096) is not None else None
            if window is None or window <= 0:
                raise CheckpointError("config.json: 'use_sliding_window' is true but 'sliding_window' is "
                                      f"{raw.get('sliding_window')!r}; it must be a positive integer")
        first = _int(raw, "max_window_layers", 28)
        default = ["sliding_attention" if window is not None and i >= first else "full_attention"
                   for i in range(n_layers)]
        why = "use_sliding_window"
    else:
        return {"sliding_window": 0, "sliding_layers": []}
    types = _layer_types(raw, n_layers, default)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and window is None:
        raise CheckpointError(f"config.json: 'layer_types' lists sliding_attention layers but '{why}' gives no "
                              "window (contradictory)")
    return {"sliding_window": window or 0, "sliding_layers": sliding}


def _family_switches(family: str, raw: Dict[str, Any], n_layers: int, head_dim: int) -> Dict[str, Any]:
    """The core's family switches for `raw` (model.h: one forward pass, these set)."""
    out: Dict[str, Any] = {"query_pre_attn_scalar": float(head_dim)}
    if family == "llama":
        out.update(hidden_act=_activation(raw, "hidden_act", "silu", ("silu",)),
                   attention_bias=int(_bool(raw, "attention_bias", False)),
                   mlp_bias=int(_bool(raw, "mlp_bias", False)))
    elif family == "qwen2":  # q, k, v always carry biases, o never (no attention_bias key)
        out.update(hidden_act=_activation(raw, "hidden_act", "silu", ("silu",)), qkv_bias=1)
    elif family == "qwen3":  # per-head RMSNorm of q and k before RoPE
        out.update(hidden_act=_activation(raw, "hidden_act", "silu", ("silu",)),
                   attention_bias=int(_bool(raw, "attention_bias", False)), qk_norm=1)
    elif family == "gemma2":
        if _bool(raw, "use_bidirectional_attention", False):
            raise CheckpointError("config.json: 'use_bidirectional_attention' is true; armorm runs causal "
                                  "attention only")
        qpas = _positive_or_null(raw, "query_pre_attn_scalar", required=True)
        if qpas is None:
            raise CheckpointError("config.json: 'query_pre_attn_scalar' must be a positive number, got null")
        # final_logit_softcapping only bounds a causal LM's vocabulary logits, which armorm never
        # computes (Gemma2ForSequenceClassification does not apply it either); it is checked, not used
        _positive_or_null(raw, "final_logit_softcapping")
        out.update(hidden_act=_activation(raw, "hidden_activation", "gelu_pytorch_tanh", _GELU_TANH),
                   attention_bias=int(_bool(raw, "attention_bias", False)),
                   norm_offset=1, post_norms=1, embed_scale=1, query_pre_attn_scalar=qpas,
                   attn_softcap=_positive_or_null(raw, "attn_logit_softcapping", required=True) or 0.0)
    out.update(_sliding(raw, family, n_layers))
    return out


def load_config(model_dir: os.PathLike | str, architecture: Optional[str] = None,
                compute_head: bool = True) -> ModelConfig:
    """Reads `model_dir/config.json` into a ModelConfig.

    `architecture` overrides the config's `architectures[0]` for the head only:
    a class name whose head kind differs from the checkpoint's (e.g.
    "LlamaModel" or "Gemma2Model" for any checkpoint) uses the backbone only;
    the head tensors are then checked but not computed. The family always
    comes from the checkpoint.
    """
    d = Path(model_dir)
    raw = _read_json(d / "config.json", "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{d / 'config.json'}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in FAMILIES.values():
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported (supported: "
                              + ", ".join(FAMILIES.values()) + ")")
    prefix = {v: k for k, v in FAMILIES.items()}.get(model_type or "llama")
    declared = raw.get("architectures") or [prefix + "Model"]
    if not isinstance(declared, list) or not declared or not isinstance(declared[0], str):
        raise CheckpointError("config.json: 'architectures' must be a list of class names")
    arch = declared[0]
    try:
        family_prefix, kind = _split_class(arch)
    except ValueError:
        raise CheckpointError(f"config.json: architecture {arch!r} is not supported; supported: "
                              + ", ".join(ARCHITECTURES)) from None
    family = FAMILIES[family_prefix]
    if model_type is not None and model_type != family:
        raise CheckpointError(f"config.json: model_type {model_type!r} contradicts architecture {arch!r} "
                              f"(a {family_prefix} class needs model_type {family!r})")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    H = _int(raw, "hidden_size")
    nh = _int(raw, "num_attention_heads")
    n_layers = _int(raw, "num_hidden_layers")
    if nh <= 0:
        raise CheckpointError("config.json: num_attention_heads must be positive")
    if family in ("qwen3", "gemma2"):
        # their transformers classes default head_dim to a constant (128, 256), not hidden_size / heads
        if raw.get("head_dim") is None:
            raise CheckpointError(f"config.json: 'head_dim' is required for {family} (its default is not "
                                  "hidden_size / num_attention_heads)")
        head_dim = _int(raw, "head_dim")
    elif raw.get("head_dim") is not None:
        head_dim = _int(raw, "head_dim")
    elif H % nh == 0:
        head_dim = H // nh
    else:
        raise CheckpointError(f"config.json: hidden_size {H} is not a multiple of num_attention_heads {nh} "
                              "and no head_dim is given")
    core: Dict[str, Any] = {
        "model_class": arch,
        "arch": ARCHITECTURES[arch],
        "compute_head": int(compute_head and (architecture is None or
                                              _split_class(architecture)[1] == kind)),
        "hidden_size": H,
        "intermediate_size": _int(raw, "intermediate_size"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": nh,
        "num_key_value_heads": _int(raw, "num_key_value_heads", nh),
        "head_dim": head_dim,
        "vocab_size": _int(raw, "vocab_size"),
        "max_position_embeddings": _int(raw, "max_position_embeddings", 2048),
        "rms_norm_eps": _float(raw, "rms_norm_eps", 1e-6),
        "tie_word_embeddings": int(bool(raw.get("tie_word_embeddings", family == "gemma2"))),
        "num_objectives": _int(raw, "num_objectives", HEAD_DEFAULTS["num_objectives"]),
        "gating_temperature": _float(raw, "gating_temperature", HEAD_DEFAULTS["gating_temperature"]),
        "gating_hidden_dim": _int(raw, "gating_hidden_dim", HEAD_DEFAULTS["gating_hidden_dim"]),
        "gating_n_hidden": _int(raw, "gating_n_hidden", HEAD_DEFAULTS["gating_n_hidden"]),
        "num_labels": _num_labels(raw),
    }
    core.update(_family_switches(family, raw, n_layers, head_dim))
    core.update(_rope(raw))
    pad = raw.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise CheckpointError(f"config.json: pad_token_id must be an integer or null, got {pad!r}")
    return ModelConfig(architecture=arch, core=core, pad_token_id=pad, raw=raw, family=family)


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
