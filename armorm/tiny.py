"""A small random ArmoRM directory, and matching toy datasets, for trying armorm offline.

    armorm make-tiny-model DIR [--datasets]

The directory has everything the real model's has, at toy size: `config.json`
(`LlamaForRewardModelWithGating`, 2 layers, hidden 64), `model.safetensors`
with random weights, and a byte-level tokenizer (`tokenizer.json`,
`tokenizer_config.json` with the Llama-3 chat template and special tokens) that
both armorm and transformers' `AutoTokenizer` load. Its scores mean nothing:
it exists so that `armorm score`, the pipeline, training and evaluation can be
run end to end without the 16 GB download. Only numpy and `tokenizers` are
needed (no torch, no network).

With `datasets=True` it also writes small synthetic datasets in the formats the
training and evaluation commands read (their labels are random too).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from .atomic import make_temp_dir
from .config import ATTRIBUTES

#: The Llama-3 Instruct chat template (as in its tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
#: Special tokens after the 256 byte tokens, in id order; the last one pads.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "[PAD]"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
PAD_TOKEN_ID = VOCAB_SIZE - 1

_WORDS = ("the a an of to and in is it for on with as at by from this that what how why which can you "
          "please explain write list give name describe summarize compare translate improve short long "
          "beautiful synonyms poem story recipe code python function error bug answer question number "
          "math safety history science music travel health garden weather coffee river mountain city "
          "book friend letter email plan idea reason example step simple clear careful").split()


def _byte_alphabet() -> List[str]:
    """The byte-level BPE alphabet: one printable character per byte value (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tokenizer(d: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # every byte its own token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, 256)]),
    ])
    tok.save(str(d / "tokenizer.json"))
    added = {str(256 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {"added_tokens_decoder": added, "bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": "[PAD]",
              "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 2048,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _weights(rng: np.random.Generator, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
             gating_hidden: int) -> Dict[str, np.ndarray]:
    hd = hidden // heads

    def mat(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    t: Dict[str, np.ndarray] = {"model.embed_tokens.weight": (rng.standard_normal((VOCAB_SIZE, hidden)) * 0.5)
                                .astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = mat(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = mat(kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = mat(kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = mat(hidden, heads * hd)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "mlp.gate_proj.weight"] = mat(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = mat(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = mat(hidden, intermediate)
    t["model.norm.weight"] = np.ones(hidden, np.float32)
    K = len(ATTRIBUTES)
    t["regression_layer.weight"] = mat(K, hidden, 0.5)
    t["reward_transform_matrix"] = (np.eye(K) + 0.05 * rng.standard_normal((K, K))).astype(np.float32)
    dims = [hidden] + [gating_hidden] * 3 + [K]
    for j in range(4):
        t[f"gating.layers.{j}.weight"] = mat(dims[j + 1], dims[j], 2.0)
        t[f"gating.layers.{j}.bias"] = (0.1 * rng.standard_normal(dims[j + 1])).astype(np.float32)
    t["gating.logit_scale"] = np.array([1.0], np.float32)
    return t


def make_tiny_model(path: Union[str, os.PathLike], *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128, gating_hidden: int = 32,
                    datasets: bool = False, overwrite: bool = False) -> Path:
    """Writes a random toy ArmoRM directory at `path` (and, with `datasets`, `path/data/`).

    The directory appears complete or not at all. Refuses to replace an
    existing path unless `overwrite`. Returns the path.
    """
    from .safetensors_io import save_file
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out.parent, out.name))
    try:
        rng = np.random.default_rng(seed)
        config = {
            "architectures": ["LlamaForRewardModelWithGating"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
            "vocab_size": VOCAB_SIZE, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 260,
            "pad_token_id": PAD_TOKEN_ID, "torch_dtype": "float32", "num_objectives": len(ATTRIBUTES),
            "gating_temperature": 10, "gating_hidden_dim": gating_hidden, "gating_n_hidden": 3,
            "armorm_note": "random toy weights made by `armorm make-tiny-model`: its scores mean nothing",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(_weights(rng, hidden, layers, heads, kv_heads, intermediate, gating_hidden),
                  tmp / "model.safetensors", metadata={"format": "pt"})
        _write_tokenizer(tmp)
        if datasets:
            write_datasets(tmp / "data", seed=seed)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    words = rng.choice(_WORDS, size=int(rng.integers(lo, hi)))
    return " ".join(words).capitalize() + "."


def _conversation(rng: np.random.Generator, prompt: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _sentence(rng, 4, 30)}]


def write_datasets(path: Union[str, os.PathLike], *, seed: int = 0, stage1_rows: int = 240, pairs: int = 160,
                   rewardbench_rows: int = 4) -> Dict[str, Path]:
    """Synthetic JSONL datasets in the formats of the training and evaluation commands.

    `stage1.jsonl`: `messages` + one column per objective (about a third of the
    labels missing, as in the real multi-objective data); `pairs.jsonl`:
    `chosen`/`rejected` message lists; `rewardbench.jsonl`: RewardBench's
    `prompt`/`chosen`/`rejected`/`subset`/`id` columns, `rewardbench_rows` rows
    per subset. Returns {name: path}.
    """
    from .train.rewardbench import EXAMPLE_COUNTS
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    files: Dict[str, Path] = {}

    def write(name: str, rows: List[Dict]) -> None:
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = []
    for _ in range(stage1_rows):
        r: Dict = {"messages": _conversation(rng, _sentence(rng, 3, 12))}
        for a in ATTRIBUTES:
            r[a] = None if rng.random() < 0.35 else round(float(rng.uniform(0, 1)), 3)
        rows.append(r)
    write("stage1", rows)
    rows = []
    for _ in range(pairs):
        prompt = _sentence(rng, 3, 12)
        rows.append({"chosen": _conversation(rng, prompt), "rejected": _conversation(rng, prompt)})
    write("pairs", rows)
    rows = []
    for subset in EXAMPLE_COUNTS:
        for i in range(rewardbench_rows):
            rows.append({"prompt": _sentence(rng, 3, 12), "chosen": _sentence(rng, 4, 30),
                         "rejected": _sentence(rng, 4, 30), "subset": subset, "id": len(rows)})
    write("rewardbench", rows)
    return files
