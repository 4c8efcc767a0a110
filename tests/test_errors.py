"""Every bad-input path: each test checks the exception type and a telling part of its message.

Checkpoint defects are made by corrupting tiny checkpoints from `checkpoints.py`
(the low-level ones by writing raw safetensors bytes: an 8-byte little-endian
header length, the JSON header, the data section). Loading a broken checkpoint
must raise a Python exception naming the tensor or file, never crash the
interpreter; the random-corruption loop at the end of the safetensors section
is there to catch crashes.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import armorm
from armorm import _core
from armorm.config import CheckpointError
from armorm.hub import ModelNotFoundError
from armorm.model import GatingPatternError
from checkpoints import make_armorm, make_backbone, make_seqcls

PATTERN = [5, 6, 7]  # the tiny checkpoints' gating pattern
VOCAB = 64
MAX_POS = 64
TINY = dict(hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB, max_pos=MAX_POS,
            gating_hidden=8, gating_n_hidden=1)
NORM = "model.norm.weight"  # [32] F32
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [32, 32] F32


# ---------------------------------------------------------------------------- raw safetensors helpers

def st_read(path: Path):
    """(header dict, data section bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_pack(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def st_write(path: Path, header: dict, data: bytes) -> None:
    path.write_bytes(st_pack(header, data))


def st_tensors(path: Path):
    """{name: (dtype, shape, bytes)} of a safetensors file (metadata dropped)."""
    header, data = st_read(path)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def st_build(tensors) -> bytes:
    """A consistent safetensors file from {name: (dtype, shape, bytes)}, offsets laid out in order."""
    header, chunks, off = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        chunks.append(blob)
        off += len(blob)
    return st_pack(header, b"".join(chunks))


def edit_header(path: Path, fn) -> None:
    """Rewrites `path` with fn(header) applied; the data section is kept byte for byte."""
    header, data = st_read(path)
    fn(header)
    st_write(path, header, data)


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pristine tiny ArmoRM checkpoint (never modified: tests corrupt copies)."""
    return make_armorm(tmp_path_factory.mktemp("errors") / "base", **TINY).path


@pytest.fixture(scope="module")
def base_sharded(tmp_path_factory):
    return make_armorm(tmp_path_factory.mktemp("errors") / "sharded", shards=2, **TINY).path


@pytest.fixture
def ckpt(base, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(base, d)
    return d


@pytest.fixture
def sharded(base_sharded, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(base_sharded, d)
    return d


@pytest.fixture(scope="module")
def model(base):
    m = armorm.ArmoRM.from_pretrained(base, gating_pattern=PATTERN, num_threads=1)
    yield m
    m.close()


def load(path, **kw):
    kw.setdefault("gating_pattern", PATTERN)
    kw.setdefault("num_threads", 1)
    return armorm.ArmoRM.from_pretrained(path, **kw)


def edit_config(d: Path, **changes) -> None:
    """Sets keys of d/config.json; a value of `...` deletes the key."""
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def ok_seq(n: int = 8) -> list:
    """A valid token sequence for the tiny checkpoints (pattern at the end)."""
    return [10 + i % 40 for i in range(n - 3)] + PATTERN


# ============================================================================ checkpoint defects

def test_pristine_checkpoint_loads(ckpt):
    """Sanity: the unmodified copy loads and scores, so every failure below is the corruption's."""
    with load(ckpt) as m:
        assert np.isfinite(m([ok_seq()]).score).all()


def test_missing_tensor_is_named(ckpt):
    edit_header(ckpt / "model.safetensors", lambda h: h.pop(NORM))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.norm\.weight'"):
        load(ckpt)


def test_missing_head_tensor_is_named(ckpt):
    edit_header(ckpt / "model.safetensors", lambda h: h.pop("gating.logit_scale"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'gating\.logit_scale'"):
        load(ckpt)


def test_misshapen_tensor_names_it_and_both_shapes(ckpt):
    def fn(h):
        h[Q_PROJ]["shape"] = [16, 64]  # same byte size, wrong shape
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape "
                                              r"\[16, 64\], expected \[32, 32\]"):
        load(ckpt)


def test_misshapen_vector_wrong_rank(ckpt):
    def fn(h):
        h[NORM]["shape"] = [4, 8]
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[4, 8\], expected \[32\]"):
        load(ckpt)


def test_tensors_disagree_with_config(ckpt):
    edit_config(ckpt, intermediate_size=96)  # the stored MLP is 48 wide
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape \[.*48.*\], expected \[.*96.*\]"):
        load(ckpt)


def test_extra_unexpected_tensor_is_named(ckpt):
    tensors = st_tensors(ckpt / "model.safetensors")
    tensors["lm_head.bogus"] = ("F32", [2], b"\0" * 8)
    (ckpt / "model.safetensors").write_bytes(st_build(tensors))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'lm_head\.bogus'.*LlamaForRewardModelWithGating"):
        load(ckpt)


def test_config_layers_missing_or_zero(ckpt):
    edit_config(ckpt, num_hidden_layers=...)  # absent: required
    with pytest.raises(CheckpointError, match="'num_hidden_layers' is required"):
        load(ckpt)
    edit_config(ckpt, num_hidden_layers=0)
    with pytest.raises(CheckpointError, match="num_hidden_layers must be positive"):
        load(ckpt)


@pytest.mark.parametrize("dtype,itemsize", [("I64", 8), ("F64", 8), ("U8", 1), ("BOOL", 1), ("F8_E4M3", 1),
                                            ("Q4_K", 3)])
def test_unsupported_dtype_is_named(ckpt, dtype, itemsize):
    tensors = st_tensors(ckpt / "model.safetensors")
    tensors[NORM] = (dtype, [32], b"\1" * (32 * itemsize))
    (ckpt / "model.safetensors").write_bytes(st_build(tensors))
    with pytest.raises(CheckpointError, match=rf"tensor 'model\.norm\.weight' has dtype {dtype}; "
                                              r"supported: F32, BF16, F16"):
        load(ckpt)


def test_same_tensor_in_two_shards(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) == 2
    first, second = st_tensors(shards[0]), st_tensors(shards[1])
    dup = next(iter(first))
    second[dup] = first[dup]
    shards[1].write_bytes(st_build(second))
    with pytest.raises(CheckpointError, match=rf"tensor '{dup}' appears twice: in .*00001-of-00002.* and in "
                                              r".*00002-of-00002"):
        load(sharded)


def test_duplicate_name_inside_one_file(ckpt):
    # json.dumps cannot write a duplicate key: splice one into the header text
    header, data = st_read(ckpt / "model.safetensors")
    text = json.dumps(header)
    entry = json.dumps({NORM: header[NORM]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    with pytest.raises(CheckpointError, match=r"duplicate tensor name 'model\.norm\.weight'"):
        load(ckpt)


@pytest.mark.parametrize("keep,match", [
    (0, r"file is 0 bytes, shorter than the 8-byte header length"),
    (5, r"file is 5 bytes, shorter than the 8-byte header length"),
    (8 + 20, r"header length \d+ exceeds the file size \(20 bytes after the 8-byte prefix\)"),
    (-100, r"data_offsets \[\d+, \d+\] extend past the end of the data section"),
    (-1, r"extend past the end of the data section"),
])
def test_truncated_file(ckpt, keep, match):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:keep] if keep >= 0 else raw[:len(raw) + keep])
    with pytest.raises(CheckpointError, match=match) as ei:
        load(ckpt)
    assert "model.safetensors" in str(ei.value)  # names the file


def test_header_length_bigger_than_file(ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length \d+ exceeds the file size"):
        load(ckpt)


@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 100 * 1024 * 1024 + 1])
def test_header_length_beyond_limit(ckpt, n):
    f = ckpt / "model.safetensors"
    f.write_bytes(struct.pack("<Q", n) + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=rf"header length {n} exceeds the limit of 104857600 bytes"):
        load(ckpt)


def test_header_length_zero(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 0) + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="header length is 0"):
        load(ckpt)


@pytest.mark.parametrize("header,match", [
    (b"\xff\xfe\x00\x01", r"header is not valid UTF-8 at byte 0"),
    (b'{"a\xc3(": 1}', r"header is not valid UTF-8 at byte 3"),
    (b'{"x": "\xed\xa0\x80"}', r"not valid UTF-8"),  # an encoded surrogate
    (b"hello", r"header is not a JSON object \(must start with '\{'\)"),
    (b"[1, 2]", r"header is not a JSON object"),
    (b'{"a": ', r"invalid JSON header"),
    (b'{"a": tru}', r"invalid JSON header at byte \d+: invalid literal"),
    (b'{"a": 1}xyz', r"unexpected byte 0x78 at header byte 8"),
    (b"\x00" * 16, r"header is not a JSON object"),
])
def test_garbage_header(ckpt, header, match):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


def test_overlapping_data_offsets(ckpt):
    other = "model.layers.0.input_layernorm.weight"  # also [32] F32

    def fn(h):
        h[NORM]["data_offsets"] = list(h[other]["data_offsets"])
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match=r"tensors '.*' \[\d+, \d+\] and '.*' \[\d+, \d+\] have overlapping "
                                              r"data_offsets") as ei:
        load(ckpt)
    assert NORM in str(ei.value) and other in str(ei.value)


def test_partially_overlapping_data_offsets(ckpt):
    def fn(h):
        b, e = h[NORM]["data_offsets"]
        o = h[Q_PROJ]["data_offsets"][0]
        h[NORM]["data_offsets"] = [o + 4, o + 4 + (e - b)]
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match="overlapping data_offsets"):
        load(ckpt)


@pytest.mark.parametrize("change,match", [
    (lambda b, e: [b, e - 4], r"data_offsets \[\d+, \d+\] hold 124 bytes but shape \[32\] of F32 needs 128"),
    (lambda b, e: [b, e + 4], r"data_offsets \[\d+, \d+\] hold 132 bytes but shape \[32\] of F32 needs 128"),
    (lambda b, e: [e, b], r"data_offsets \[\d+, \d+\] have begin > end"),
    (lambda b, e: [b], r"data_offsets must have exactly 2 entries"),
    (lambda b, e: [b, e, e], r"data_offsets must have exactly 2 entries"),
    (lambda b, e: [-1, e], r"data_offsets must contain only non-negative integers"),
    (lambda b, e: [b + 0.5, e], r"data_offsets must contain only non-negative integers"),
    (lambda b, e: [b, 2**64], r"data_offsets value is too large"),
    (lambda b, e: "x", r"data_offsets is not an array"),
], ids=["short", "long", "reversed", "one", "three", "negative", "fraction", "huge", "string"])
def test_data_offsets_not_matching_shape(ckpt, change, match):
    def fn(h):
        h[NORM]["data_offsets"] = change(*h[NORM]["data_offsets"])
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': " + match):
        load(ckpt)


@pytest.mark.parametrize("field,value,match", [
    ("shape", [-32], r"shape must contain only non-negative integers"),
    ("shape", [32.0], r"shape must contain only non-negative integers"),
    ("shape", [1] * 9, r"shape has more than 8 dimensions"),
    ("shape", [2**62, 2**62], r"number of elements of shape .* overflows"),
    ("shape", "32", r"shape is not an array"),
    ("dtype", 4, r"dtype is not a string"),
    ("dtype", "", r"dtype is empty"),
    ("extra", 1, r"unknown key 'extra'"),
])
def test_bad_tensor_description(ckpt, field, value, match):
    def fn(h):
        h[NORM][field] = value
    edit_header(ckpt / "model.safetensors", fn)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': " + match):
        load(ckpt)


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_tensor_description_missing_key(ckpt, key):
    edit_header(ckpt / "model.safetensors", lambda h: h[NORM].pop(key))
    with pytest.raises(CheckpointError, match=rf"tensor 'model\.norm\.weight': missing key '{key}'"):
        load(ckpt)


def test_index_names_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json lists model-00002-of-00002\."
                                              r"safetensors, which is missing"):
        load(sharded)


@pytest.mark.parametrize("fname", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..\\x.safetensors",
                                   "..", ".", "", 7, None])
def test_index_with_path_outside_the_directory(sharded, fname):
    # even when the file it points at exists, it is refused before anything is opened
    shutil.copy(sharded / "model-00001-of-00002.safetensors", sharded.parent / "x.safetensors")
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    idx["weight_map"][NORM] = fname
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' maps to an invalid file name"):
        load(sharded)


@pytest.mark.parametrize("text,match", [
    ("{not json", r"shard index .*model\.safetensors\.index\.json is not valid JSON"),
    ("", r"shard index .* is not valid JSON"),
    ('{"weight_map": {}}', r"'weight_map' must be a non-empty object"),
    ('{"metadata": {}}', r"'weight_map' must be a non-empty object"),
    ('[1, 2]', r"'weight_map' must be a non-empty object"),
    ('{"weight_map": ["model.safetensors"]}', r"'weight_map' must be a non-empty object"),
])
def test_bad_index_json(sharded, text, match):
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load(sharded)


def test_index_json_not_utf8(sharded):
    (sharded / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": "\xff"}}')
    with pytest.raises(CheckpointError, match=r"shard index .* is not UTF-8"):
        load(sharded)


# ---- config.json

def test_config_missing(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"cannot read config .*config\.json: No such file"):
        load(ckpt)


@pytest.mark.parametrize("text,match", [
    ("{not json", r"config .*config\.json is not valid JSON"),
    ("", r"is not valid JSON"),
    ("[1, 2]", r"config\.json: expected a JSON object"),
    ("null", r"expected a JSON object"),
    ("[" * 100000 + "]" * 100000, r"nested too deeply"),
])
def test_config_not_json(ckpt, text, match):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


def test_config_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config .* is not UTF-8"):
        load(ckpt)


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"])
def test_config_missing_required_size(ckpt, key):
    edit_config(ckpt, **{key: ...})
    with pytest.raises(CheckpointError, match=rf"config\.json: '{key}' is required"):
        load(ckpt)


@pytest.mark.parametrize("archs,match", [
    (["LlamaForFoo"], r"architecture 'LlamaForFoo' is not supported; supported: LlamaForRewardModelWithGating"),
    (["MistralForCausalLM"], r"architecture 'MistralForCausalLM' is not supported"),
    ("LlamaForRewardModelWithGating", r"'architectures' must be a list of class names"),
    ([3], r"'architectures' must be a list of class names"),
])
def test_config_wrong_architecture(ckpt, archs, match):
    edit_config(ckpt, architectures=archs)
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


def test_architecture_override_must_be_known(ckpt):
    with pytest.raises(ValueError, match=r"architecture must be one of .*got 'GPT2'"):
        load(ckpt, architecture="GPT2")


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "mistral", r"model_type 'mistral' is not supported \(only llama\)"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported \(only silu\)"),
])
def test_config_wrong_model_type(ckpt, key, value, match):
    edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


def test_config_heads_not_multiple_of_kv_heads(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=r"num_attention_heads \(4\) is not a multiple of "
                                              r"num_key_value_heads \(3\)"):
        load(ckpt)


def test_config_hidden_not_multiple_of_heads_without_head_dim(ckpt):
    edit_config(ckpt, num_attention_heads=5, num_key_value_heads=5, head_dim=...)
    with pytest.raises(CheckpointError, match=r"hidden_size 32 is not a multiple of num_attention_heads 5"):
        load(ckpt)


def test_config_odd_head_dim(ckpt):
    edit_config(ckpt, head_dim=7)
    with pytest.raises(CheckpointError, match=r"head_dim \(7\) must be even"):
        load(ckpt)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "longrope", "rope_theta": 10000.0},
])
def test_config_unsupported_rope_parameters(ckpt, rope):
    edit_config(ckpt, rope_parameters=rope)
    with pytest.raises(CheckpointError, match=rf"rope_scaling type '{rope['rope_type']}' is not supported "
                                              r"\(supported: default, linear, llama3\)"):
        load(ckpt)


@pytest.mark.parametrize("scaling,match", [
    ({"type": "yarn", "factor": 4.0}, r"rope_scaling type 'yarn' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_scaling type 'dynamic' is not supported"),
    ("linear", r"rope_scaling must be an object or null, got 'linear'"),
    ({"rope_type": "llama3", "factor": 8.0}, r"'low_freq_factor' must be a finite number"),
    ({"rope_type": "linear"}, r"'factor' must be a finite number, got None"),
    ({"rope_type": "linear", "factor": -2.0}, r"rope_scaling linear needs a positive factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, r"high_freq_factor \(distinct\)"),
])
def test_config_bad_legacy_rope_scaling(ckpt, scaling, match):
    edit_config(ckpt, rope_parameters=..., rope_scaling=scaling)
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                                 "vocab_size", "max_position_embeddings", "head_dim"])
@pytest.mark.parametrize("value", [-1, 0])
def test_config_nonpositive_sizes(ckpt, key, value):
    edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=rf"{key} must be positive, got {value}"):
        load(ckpt)


def test_config_negative_heads(ckpt):
    edit_config(ckpt, num_attention_heads=-4)
    with pytest.raises(CheckpointError, match=r"num_attention_heads must be positive"):
        load(ckpt)


@pytest.mark.parametrize("key,value,match", [
    ("num_objectives", -1, r"num_objectives must be in 1\.\.65536, got -1"),
    ("gating_hidden_dim", 0, r"gating_hidden_dim must be positive, got 0"),
    ("gating_n_hidden", -1, r"gating_n_hidden must be in 0\.\.64, got -1"),
    ("gating_temperature", 0, r"gating_temperature must be positive and finite"),
    ("rms_norm_eps", -1e-5, r"rms_norm_eps must be a finite non-negative number"),
])
def test_config_bad_head_values(ckpt, key, value, match):
    edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


@pytest.mark.parametrize("value,match", [
    ("32", r"'hidden_size' must be an integer, got '32'"),
    (32.5, r"'hidden_size' must be an integer, got 32\.5"),
    (True, r"'hidden_size' must be an integer, got True"),
    ([32], r"'hidden_size' must be an integer"),
    (float("nan"), r"'hidden_size' must be an integer, got nan"),   # json writes NaN, Python reads it
    (float("inf"), r"'hidden_size' must be an integer, got inf"),
    (1e300, r"'hidden_size' = 1e\+300 is out of range"),
    (2**40, r"'hidden_size' = 1099511627776 is out of range"),
])
def test_config_non_integer_size(ckpt, value, match):
    edit_config(ckpt, hidden_size=value)
    with pytest.raises(CheckpointError, match=r"config\.json: " + match):
        load(ckpt)


@pytest.mark.parametrize("key,value,match", [
    ("rms_norm_eps", "x", r"'rms_norm_eps' must be a finite number, got 'x'"),
    ("rms_norm_eps", float("nan"), r"'rms_norm_eps' must be a finite number"),
    ("pad_token_id", "x", r"pad_token_id must be an integer or null, got 'x'"),
    ("num_labels", "two", r"'num_labels' must be an integer"),
])
def test_config_bad_scalars(ckpt, key, value, match):
    edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        load(ckpt)


def test_config_bad_rope_theta(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": -1.0})
    with pytest.raises(CheckpointError, match=r"rope_theta must be a positive finite number"):
        load(ckpt)


def test_only_pytorch_pickle_is_refused_and_never_unpickled(ckpt, tmp_path):
    sentinel = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))  # unpickling would create the sentinel file

    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match=r"holds only PyTorch pickle weights; armorm loads safetensors only"):
        load(ckpt)
    assert not sentinel.exists()


def test_sharded_pickle_index_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match=r"pickle"):
        load(ckpt)


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"):
        load(ckpt)


def test_weights_path_is_a_directory(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load(ckpt)


def test_directory_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist") as ei:
        load(tmp_path / "nope")
    assert isinstance(ei.value, ModelNotFoundError)


def test_file_path_instead_of_directory(base):
    with pytest.raises(ModelNotFoundError, match=r"config\.json is a file, not a model directory"):
        load(base / "config.json")


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot read config"):
        load(tmp_path)


def test_failed_load_leaves_nothing_behind(ckpt):
    """A failed load raises cleanly and the next load of a fixed checkpoint works in the same process."""
    good = (ckpt / "model.safetensors").read_bytes()
    edit_header(ckpt / "model.safetensors", lambda h: h.pop(NORM))
    for _ in range(20):
        with pytest.raises(CheckpointError):
            load(ckpt)
    (ckpt / "model.safetensors").write_bytes(good)
    with load(ckpt) as m:
        assert m([ok_seq()]).score.shape == (1,)


# ============================================================================ the safetensors parser

def test_inspect_safetensors_good_file(base):
    tensors = {t["name"]: t for t in _core.inspect_safetensors(str(base / "model.safetensors"))}
    assert tensors[NORM]["shape"] == (32,) and tensors[NORM]["dtype"] == "F32"


def test_inspect_safetensors_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.safetensors: cannot open: No such file"):
        _core.inspect_safetensors(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match=r"not a regular file"):
        _core.inspect_safetensors(str(tmp_path))
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match=r"bad\.safetensors: header length 1000 exceeds the file size"):
        _core.inspect_safetensors(str(f))
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"bad\.safetensors: file is 2 bytes"):
        _core.inspect_safetensors(f)  # os.PathLike works too
    with pytest.raises(TypeError):
        _core.inspect_safetensors(42)


def _entry(name="a", dtype="F32", shape=(2,), offsets=(0, 8)):
    return {name: {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


@pytest.mark.parametrize("buf,match", [
    (b"", r"<bytes>: file is 0 bytes, shorter than the 8-byte header length"),
    (b"\x02\x00\x00\x00\x00\x00\x00", r"file is 7 bytes"),
    (struct.pack("<Q", 0), r"header length is 0"),
    (struct.pack("<Q", 3) + b"{}", r"header length 3 exceeds the file size \(2 bytes"),
    (struct.pack("<Q", 2) + b"[]", r"header is not a JSON object"),
    (struct.pack("<Q", 4) + b"{}\n ", r"unexpected byte 0x0a at header byte 2"),
    (struct.pack("<Q", 3) + b"{\x00}", r"invalid JSON header"),
    (struct.pack("<Q", 2) + b"\xc0\x80", r"not valid UTF-8 at byte 0"),  # overlong NUL
    (struct.pack("<Q", 206) + b'{"a":' + b"[" * 100 + b"]" * 100 + b"}", r"JSON header nested deeper than 64 levels"),
    (st_pack(_entry(), b"\0" * 4), r"tensor 'a': data_offsets \[0, 8\] extend past the end of the data section "
                                   r"\(4 bytes\)"),
    (st_pack(_entry(offsets=(0, 4)), b"\0" * 8), r"tensor 'a': data_offsets \[0, 4\] hold 4 bytes but shape \[2\] "
                                                 r"of F32 needs 8"),
    (st_pack({**_entry("a"), **_entry("b", offsets=(4, 12))}, b"\0" * 12), r"overlapping data_offsets"),
    (st_pack(_entry(name=""), b"\0" * 8), r"empty tensor name"),
    (st_pack(_entry(name="a\u0000b"), b"\0" * 8), r"tensor 'a\\x00b': name contains a NUL character"),
    (st_pack(_entry(name="x" * 2000), b"\0" * 8), r"name is longer than 1024 bytes"),
    (st_pack({"__metadata__": {"format": 1}}), r"__metadata__ entry 'format' is not a string"),
    (st_pack({"__metadata__": []}), r"__metadata__ is not a JSON object"),
    (st_pack({"a": 1}), r"tensor 'a': description is not a JSON object"),
    (st_pack({"a": {}}), r"tensor 'a': missing key 'dtype'"),
])
def test_parse_safetensors_bytes_corrupt_buffers(buf, match):
    with pytest.raises(ValueError, match=match):
        _core.parse_safetensors_bytes(buf)


def test_parse_safetensors_bytes_duplicates():
    text = b'{"__metadata__": {}, "__metadata__": {}}'
    with pytest.raises(ValueError, match=r"duplicate __metadata__ entry"):
        _core.parse_safetensors_bytes(struct.pack("<Q", len(text)) + text)
    e = json.dumps(_entry()["a"])
    text = ('{"a": %s, "a": %s}' % (e, e)).encode()
    with pytest.raises(ValueError, match=r"duplicate tensor name 'a'"):
        _core.parse_safetensors_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    text = b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [], "data_offsets": [0, 4]}}'
    with pytest.raises(ValueError, match=r"tensor 'a': duplicate key 'dtype'"):
        _core.parse_safetensors_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)


def test_parse_safetensors_bytes_hostile_name_is_escaped():
    name = "evil'\n\x1b[31m" + "é" * 300
    with pytest.raises(ValueError) as ei:
        _core.parse_safetensors_bytes(st_pack(_entry(name=name, offsets=(0, 4))) + b"\0" * 8)
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert r"evil\x27\x0a\x1b[31m" in msg and "..." in msg  # escaped, then cut


def test_parse_safetensors_bytes_needs_a_buffer():
    with pytest.raises(TypeError):
        _core.parse_safetensors_bytes("not bytes")
    with pytest.raises(TypeError):
        _core.parse_safetensors_bytes(None)


def test_parse_safetensors_bytes_accepts_padding_and_empty_tensors():
    # not errors: space padding after the header, a zero-size tensor, a scalar
    hdr = {**_entry("a", shape=(0, 5), offsets=(0, 0)), **_entry("b", shape=(), offsets=(0, 4))}
    h = json.dumps(hdr).encode() + b"    "
    out = _core.parse_safetensors_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    assert {t["name"]: t["shape"] for t in out} == {"a": (0, 5), "b": ()}


def test_parse_safetensors_bytes_random_corruptions_only_raise_valueerror(base):
    """~2000 bit-flipped / truncated / byte-smashed variants of a real file: ValueError or a valid parse."""
    good = (base / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", good[:8])
    rng = random.Random(1234)
    counts = {"ok": 0, "ValueError": 0}
    for i in range(2000):
        b = bytearray(good)
        kind = i % 5
        if kind == 0:  # flip a few bits anywhere in prefix + header
            for _ in range(rng.randint(1, 6)):
                p = rng.randrange(8 + hlen)
                b[p] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            b = b[:rng.randrange(len(b))]
        elif kind == 2:  # smash one header byte with an interesting value
            b[rng.randrange(8, 8 + hlen)] = rng.choice(b'{}[]",:-0123456789eE. \\\x00\xff\xc3u')
        elif kind == 3:  # corrupt the length prefix
            b[rng.randrange(8)] = rng.randrange(256)
        else:  # cut out a slice of the header (length prefix unchanged)
            p = rng.randrange(8, 8 + hlen)
            del b[p:p + rng.randint(1, 40)]
        try:
            tensors = _core.parse_safetensors_bytes(bytes(b))
        except ValueError as e:
            assert str(e).startswith("<bytes>: "), str(e)
            counts["ValueError"] += 1
            continue
        counts["ok"] += 1
        (n,) = struct.unpack("<Q", bytes(b[:8]))
        data_size = len(b) - 8 - n
        for t in tensors:  # whatever parses is in bounds
            assert 0 <= t["data_offsets"][0] <= t["data_offsets"][1] <= data_size
    assert counts["ValueError"] > 1000, counts


# ============================================================================ API errors

def test_token_id_at_vocab_size_names_sequence_and_position(model):
    bad = ok_seq()
    bad[3] = VOCAB
    with pytest.raises(ValueError, match=rf"sequence 1, position 3: token id {VOCAB} is outside the embedding "
                                         rf"\(vocab_size {VOCAB}\)"):
        model([ok_seq(), bad])


def test_negative_token_id(model):
    bad = ok_seq()
    bad[0] = -1
    with pytest.raises(ValueError, match=r"sequence 0, position 0: token id -1 is outside the embedding"):
        model(np.array([bad]))


@pytest.mark.parametrize("big", [2**31, 2**40, 2**63 - 1])
def test_token_id_beyond_int32(model, big):
    with pytest.raises(ValueError, match=rf"input_ids\[0\], position 2: token id {big} is outside the embedding"):
        model([5, 6, big, 7])


def test_token_id_beyond_int64(model):
    with pytest.raises(ValueError, match=rf"input_ids\[0\], position 1: token id {2**70} is outside the embedding"):
        model([5, 2**70, 6, 7])


def test_uint64_token_ids_do_not_wrap(model):
    ids = np.array([5, 6, 7, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=rf"position 3: token id {2**64 - 1} is outside the embedding"):
        model(ids)


@pytest.mark.parametrize("inp,match", [
    ([], r"input_ids is empty"),
    ([[]], r"sequence 0 is empty"),
    ([ok_seq(), []], r"sequence 1 is empty"),
    (np.zeros((1, 0), dtype=np.int64), r"sequence 0 is empty"),
    (np.zeros((0, 5), dtype=np.int64), r"no sequences to score"),
    (None, r"input_ids is required"),
])
def test_empty_inputs(model, inp, match):
    with pytest.raises(ValueError, match=match):
        model(inp)


def test_score_sequences_empty(model):
    with pytest.raises(ValueError, match=r"no sequences to score"):
        model.score_sequences([])
    with pytest.raises(ValueError, match=r"sequence 0 is empty"):
        model.score_sequences([np.zeros(0, dtype=np.int32)])


def test_sequence_longer_than_max_position_embeddings(model):
    seqs = [ok_seq(MAX_POS), ok_seq(MAX_POS + 1)]
    with pytest.raises(ValueError, match=rf"sequence 1 has {MAX_POS + 1} tokens; the model allows at most "
                                         rf"{MAX_POS} \(max_position_embeddings\)"):
        model(seqs)
    assert model([seqs[0]]).score.shape == (1,)  # exactly max_pos is fine


def test_missing_gating_pattern_names_the_sequence(model):
    with pytest.raises(GatingPatternError, match=r"sequence 2: the gating pattern \[5, 6, 7\] .* was not found"):
        model([ok_seq(), ok_seq(10), [10, 11, 12, 5, 6]])


def test_gating_pattern_error_is_a_valueerror(model):
    with pytest.raises(ValueError, match=r"sequence 0: the gating pattern"):
        model.score_sequences([[10, 11, 12]], fields=["score"])
    # fields that do not need the gating position work without it
    assert model.score_sequences([[10, 11, 12]], fields=["hidden_state"]).hidden_state.shape == (1, 32)


def test_empty_gating_pattern(base):
    with load(base, gating_pattern=[]) as m:
        with pytest.raises(GatingPatternError, match=r"no gating pattern: pass gating_pattern"):
            m([ok_seq()])


@pytest.mark.parametrize("shape", [(1, 2, 8), (2, 1, 1, 8)])
def test_input_ids_3d(model, shape):
    with pytest.raises(ValueError, match=r"input_ids must be 1-D or 2-D, got shape \(" + ", ".join(map(str, shape))):
        model(np.full(shape, 5, dtype=np.int64))


@pytest.mark.parametrize("ids", [
    np.array([10.5, 5, 6, 7]),
    [10.5, 5, 6, 7],
    [[10.5, 5, 6, 7]],
    np.array([np.nan, 5, 6, 7]),
    np.array([np.inf, 5, 6, 7]),
    np.array([True, False, True]),
    np.array([1 + 2j, 5, 6, 7]),
])
def test_non_integer_ids(model, ids):
    with pytest.raises(ValueError, match=r"input_ids\[0\] must hold integer token ids, got dtype"):
        model(ids)


def test_integral_float_ids_are_accepted(model):
    s = ok_seq()
    assert model(np.array(s, dtype=np.float64)).score[0] == model(s).score[0]


@pytest.mark.parametrize("ids,match", [
    ("hello", r"input_ids must be a list, NumPy array or torch tensor, not str"),
    (42, r"input_ids must be a list, NumPy array or torch tensor, not int"),
])
def test_input_ids_wrong_type(model, ids, match):
    with pytest.raises(TypeError, match=match):
        model(ids)


@pytest.mark.parametrize("ids", [["a", "b"], [[5, 6], "x"], [[5, [6]]]])
def test_input_ids_not_token_lists(model, ids):
    with pytest.raises(ValueError, match=r"must be a 1-D sequence of token ids"):
        model(ids)


@pytest.mark.parametrize("mask,match", [
    (np.ones((1, 7)), r"attention_mask must have the shape of input_ids"),
    (np.ones((2, 8)), r"attention_mask must have the shape of input_ids"),
    (np.ones((1, 1, 8)), r"attention_mask must have the shape of input_ids"),
    (np.array([[1, 1, 0, 1, 1, 1, 1, 1]]), r"input_ids\[0\]: attention_mask must be one contiguous run of ones"),
    (np.array([[0, 1, 1, 0, 0, 1, 1, 0]]), r"contiguous run of ones"),
    (np.zeros((1, 8)), r"input_ids\[0\]: attention_mask masks every token"),
])
def test_bad_attention_mask(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(np.array([ok_seq()]), attention_mask=mask)


def test_attention_mask_with_ragged_rows(model):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        model([ok_seq(8), ok_seq(9)], attention_mask=np.ones((2, 8)))


def test_attention_mask_torch_non_contiguous(model):
    torch = pytest.importorskip("torch")
    ids = torch.tensor([ok_seq(), ok_seq()])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 4] = 0
    with pytest.raises(ValueError, match=r"input_ids\[1\]: attention_mask must be one contiguous run"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input_ids\[1\]: attention_mask must be one contiguous run"):
        model({"input_ids": ids, "attention_mask": mask})


def test_unknown_call_keyword(model):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'labels'"):
        model([ok_seq()], labels=[1])


def test_unknown_from_pretrained_keyword(base):
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword arguments: bogus, foo"):
        load(base, foo=1, bogus=2)


@pytest.mark.parametrize("dt", ["int8", "float64", "bf32", 3])
def test_bad_torch_dtype(base, dt):
    with pytest.raises(ValueError, match=r"torch_dtype must be float32, bfloat16, float16 or 'auto', got"):
        load(base, torch_dtype=dt)


def test_dtype_and_torch_dtype_disagree(base):
    with pytest.raises(ValueError, match=r"dtype and torch_dtype disagree"):
        load(base, dtype="float32", torch_dtype="bfloat16")


@pytest.mark.parametrize("dm", ["cuda", "cuda:0", {"": "cuda:1"}])
def test_device_map_cuda(base, dm):
    with pytest.raises(RuntimeError, match=r"no CUDA (backend|device)"):
        load(base, device_map=dm)


def test_device_map_unknown(base, model):
    with pytest.raises(ValueError, match=r"device_map must be 'cpu', 'auto' or 'cuda\[:N\]', got 'tpu'"):
        load(base, device_map="tpu")
    with pytest.raises(RuntimeError, match=r"CUDA"):
        model.to("cuda")


@pytest.mark.parametrize("nt", [0, -1, 5000])
def test_bad_num_threads(base, nt):
    with pytest.raises(ValueError, match=rf"num_threads must be in 1\.\.1024, got {nt}"):
        load(base, num_threads=nt)


@pytest.mark.parametrize("env", ["abc", "0", "-3"])
def test_bad_num_threads_env(base, monkeypatch, env):
    monkeypatch.setenv("ARMORM_NUM_THREADS", env)
    with pytest.raises(ValueError, match=rf"ARMORM_NUM_THREADS must be a positive integer, got '{env}'"):
        load(base, num_threads=None)


def test_bad_max_batch_tokens(base):
    with pytest.raises(ValueError, match=r"max_batch_tokens must be positive"):
        load(base, max_batch_tokens=0)


def test_field_the_architecture_lacks(model, tmp_path):
    with pytest.raises(ValueError, match=r"field 'bogus' is not available for LlamaForRewardModelWithGating; "
                                         r"available: rewards, gating_output"):
        model.score_sequences([ok_seq()], fields=["bogus"])
    bb_dir = tmp_path / "bb"
    make_backbone(bb_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(bb_dir) as bb:
        with pytest.raises(ValueError, match=r"field 'rewards' is not available for LlamaModel; "
                                             r"available: hidden_state, prompt_embedding"):
            bb.score_sequences([ok_seq()], fields=["rewards"])
        with pytest.raises(AttributeError, match=r"reward_transform_matrix exists only on ArmoRM checkpoints"):
            bb.reward_transform_matrix
    sc_dir = tmp_path / "sc"
    make_seqcls(sc_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(sc_dir) as sc:
        with pytest.raises(ValueError, match=r"field 'gating_output' is not available for "
                                             r"LlamaForSequenceClassification; available: score, logits"):
            sc.score_sequences([ok_seq()], fields=["gating_output"])


def test_backbone_only_override_has_no_head_fields(base):
    with load(base, architecture="LlamaModel") as m:
        with pytest.raises(ValueError, match=r"field 'score' is not available .*available: hidden_state, "
                                             r"prompt_embedding"):
            m.score_sequences([ok_seq()], fields=["score"])


def test_output_has_no_such_field(model):
    out = model([ok_seq()])
    with pytest.raises(AttributeError, match=r"this output has no field 'loss'; it has rewards"):
        out.loss


def test_reward_pos_wrong_length(model):
    with pytest.raises(ValueError, match=r"reward_pos must have one entry per sequence"):
        model.score_sequences([ok_seq(), ok_seq()], reward_pos=[1])


def test_closed_model(base):
    m = load(base)
    m.close()
    for call in (lambda: m([ok_seq()]), lambda: m.dtype, lambda: m.reward_transform_matrix,
                 lambda: m.score_sequences([ok_seq()], fields=["hidden_state"])):
        with pytest.raises(RuntimeError, match=r"model is closed"):
            call()
    m.close()  # closing twice is fine


def test_closed_by_context_manager(base):
    with load(base) as m:
        m([ok_seq()])
    with pytest.raises(RuntimeError, match=r"closed"):
        m([ok_seq()])


# ---- the core's Model directly

def _tok(*ids):
    return np.array(ids, dtype=np.int32)


@pytest.mark.parametrize("cu,exc,match", [
    ([0, 2], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([1, 3], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([0, 4], ValueError, r"cu_seqlens must run from 0 to the token count 3"),
    ([0, 2, 2, 3], ValueError, r"sequence 1 is empty \(cu_seqlens must be strictly increasing\)"),
    ([0, 3, 1, 3], ValueError, r"sequence 1 is empty \(cu_seqlens must be strictly increasing\)"),
    ([0], ValueError, r"cu_seqlens must hold B\+1 offsets with B >= 1"),
    (np.zeros(0, dtype=np.int64), ValueError, r"cu_seqlens must hold B\+1 offsets with B >= 1"),
    ([[0, 3]], TypeError, r"cu_seqlens must be a 1-D integer array"),
    ([0, 1.5, 3], TypeError, r"cu_seqlens must be a 1-D integer array"),
    ("abc", TypeError, r"cu_seqlens must be a 1-D integer array"),
])
def test_core_forward_inconsistent_cu_seqlens(model, cu, exc, match):
    with pytest.raises(exc, match=match):
        model._core.forward(_tok(5, 6, 7), cu if isinstance(cu, (str, np.ndarray)) else np.array(cu),
                            fields=["hidden_state"])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(gating_pos=[5]), ValueError, r"sequence 0: gating position 5 outside its 3 tokens"),
    (dict(gating_pos=[0, 0]), ValueError, r"gating_pos must have B entries"),
    (dict(reward_pos=[-1], gating_pos=[0]), ValueError, r"sequence 0: reward position -1 outside its 3 tokens"),
    (dict(reward_pos=[0, 1], gating_pos=[0]), ValueError, r"reward_pos must have B entries"),
    (dict(), ValueError, r"gating positions are required for the ArmoRM head"),
    (dict(fields=["prompt_embedding"]), ValueError, r"field 'prompt_embedding' is not available"),
    (dict(gating_pos=[0], fields=["bogus"]), ValueError, r"field 'bogus' is not available for "
                                                          r"LlamaForRewardModelWithGating; available: rewards"),
    (dict(gating_pos=[0], fields=5), TypeError, r"fields must be a sequence of str"),
])
def test_core_forward_bad_positions_and_fields(model, kw, exc, match):
    with pytest.raises(exc, match=match):
        model._core.forward(_tok(5, 6, 7), np.array([0, 3]), **kw)


def test_core_forward_bad_tokens(model):
    cu = np.array([0, 3])
    with pytest.raises(ValueError, match=rf"sequence 0, position 2: token id {VOCAB} is outside the embedding"):
        model._core.forward(_tok(5, 6, VOCAB), cu, gating_pos=[0])
    with pytest.raises(ValueError, match=r"sequence 1, position 0: token id -4 is outside the embedding"):
        model._core.forward(_tok(5, 6, -4), np.array([0, 2, 3]), gating_pos=[0, 0])
    # int64 ids beyond int32 must not wrap around into valid ids (2**32 would become 0)
    with pytest.raises(ValueError, match=r"tokens\[2\]: token id 4294967296 is outside the embedding"):
        model._core.forward(np.array([5, 6, 2**32]), cu, gating_pos=[0])
    with pytest.raises(TypeError, match=r"tokens must be a 1-D integer array"):
        model._core.forward(np.array([5.0, 6.5, 7.0]), cu, gating_pos=[0])
    with pytest.raises(TypeError, match=r"tokens must be a 1-D integer array"):
        model._core.forward(np.array([[5, 6, 7]]), cu, gating_pos=[0])


def test_core_plans_the_fields(base, model, tmp_path):
    """The model description decides the fields; Python reads it (no table of its own)."""
    core = model._core
    assert core.fields == ("rewards", "gating_output", "score", "logits", "hidden_state", "prompt_embedding",
                           "all_hidden")
    assert core.plan() == (core.fields[:-1], True)  # default: all but all_hidden
    assert core.plan(["hidden_state"]) == (("hidden_state",), False)
    assert core.plan(["score"]) == (("score",), True)  # the ArmoRM head reads the gating position
    assert core.plan(["logits", "hidden_state"]) == (("logits", "hidden_state"), True)
    with pytest.raises(TypeError, match="fields must be a sequence of str"):
        core.plan("score")
    sc_dir = tmp_path / "sc"
    make_seqcls(sc_dir, hidden=32, heads=4, kv_heads=2, inter=48, layers=1, vocab=VOCAB)
    with load(sc_dir) as sc:
        assert sc._core.fields == ("score", "logits", "hidden_state", "all_hidden")
        assert sc._core.plan() == (("score", "logits", "hidden_state"), False)
    with load(base, architecture="LlamaModel") as bb:
        assert bb._core.fields == ("hidden_state", "prompt_embedding", "all_hidden")


def test_core_forward_groups_match_one_call(model):
    """batch_tokens splits a call into packed groups; every row is what one group gives."""
    seqs = [np.array(ok_seq(n), dtype=np.int32) for n in (9, 30, 4, 17, 12)]
    toks = np.concatenate(seqs)
    cu = np.concatenate([[0], np.cumsum([s.size for s in seqs])]).astype(np.int64)
    gp = np.array([s.size - 3 for s in seqs], dtype=np.int64)
    fields = ["score", "logits", "hidden_state", "all_hidden"]
    whole = model._core.forward(toks, cu, None, gp, fields)
    calls = []
    grouped = model._core.forward(toks, cu, None, gp, fields, batch_tokens=32,
                                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (4, 5), (5, 5)]  # groups [9] [30] [4 17] [12]: at most 32 tokens each
    assert list(grouped) == fields
    for f in fields:
        np.testing.assert_array_equal(grouped[f], whole[f])
    np.testing.assert_array_equal(whole["logits"], whole["score"])  # ArmoRM: logits is the score
    assert whole["all_hidden"].shape == (toks.size, 32)

    def stop(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        model._core.forward(toks, cu, None, gp, fields, batch_tokens=32, progress=stop)
    with pytest.raises(TypeError, match="progress must be callable"):
        model._core.forward(toks, cu, None, gp, fields, progress=5)


def test_core_model_bad_constructor_arguments(base, model):
    files = [str(base / "model.safetensors")]
    cfg = dict(model.config.core)
    with pytest.raises(ValueError, match=r"dtype must be auto, float32, bfloat16 or float16, got 'int4'"):
        _core.Model(files, cfg, "int4", 1)
    with pytest.raises(ValueError, match=r"num_threads must be in 1\.\.1024, got 0"):
        _core.Model(files, cfg, "float32", 0)
    with pytest.raises(ValueError, match=r"paths must name 1\.\.100000 files"):
        _core.Model([], cfg, "float32", 1)
    with pytest.raises(TypeError, match=r"config must be a dict"):
        _core.Model(files, [1], "float32", 1)
    with pytest.raises(KeyError, match=r"config is missing 'hidden_size'"):
        _core.Model(files, {k: v for k, v in cfg.items() if k != "hidden_size"}, "float32", 1)
    with pytest.raises(TypeError, match=r"config 'hidden_size' must be a number"):
        _core.Model(files, dict(cfg, hidden_size="32"), "float32", 1)
    for bad in (1e300, 32.5, float("nan"), float("inf"), 2**40):
        with pytest.raises(ValueError, match=r"config 'hidden_size' must be an integer in the int32 range, got "
                                             r"(1e\+300|32\.5|nan|inf|1\.09951e\+12)"):
            _core.Model(files, dict(cfg, hidden_size=bad), "float32", 1)
    with pytest.raises(ValueError, match=r"config: arch / rope_type out of range"):
        _core.Model(files, dict(cfg, arch=9), "float32", 1)
    with pytest.raises(ValueError, match=r"nope\.safetensors: cannot open"):
        _core.Model([str(base / "nope.safetensors")], cfg, "float32", 1)
    with pytest.raises(TypeError, match=r"paths must be a sequence of str"):
        _core.Model(5, cfg, "float32", 1)
    m = _core.Model(files, cfg, "float32", 1)
    with pytest.raises(KeyError, match=r"no tensor named 'nope'"):
        m.tensor("nope")
    with pytest.raises(RuntimeError, match=r"Model already initialised"):
        m.__init__(files, cfg, "float32", 1)
    m.close()
    with pytest.raises(RuntimeError, match=r"model is closed"):
        m.forward(_tok(5, 6, 7), np.array([0, 3]))
    with pytest.raises(RuntimeError, match=r"model is closed"):
        m.tensor(NORM)


# ============================================================================ pipeline and CLI (real Llama-3 tokenizer)

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4."}


@pytest.fixture(scope="module")
def l3_ckpt(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("errors-l3") / "ArmoRM-tiny"
    make_armorm(d, vocab=128257, hidden=32, heads=4, kv_heads=2, inter=64, layers=2, gating_hidden=16)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama3_dir / f).exists():
            shutil.copy(llama3_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def rm(l3_ckpt):
    p = armorm.ArmoRMPipeline(l3_ckpt, torch_dtype="float32", num_threads=1)
    assert p.model.gating_pattern == armorm.LLAMA3_GATING_PATTERN  # derived from the tokenizer
    yield p
    p.model.close()


def test_pipeline_good_conversation(rm):
    assert np.isfinite(rm([U, A])["score"])


def test_pipeline_empty_conversation(rm):
    with pytest.raises(ValueError, match=r"conversation 0: empty conversation"):
        rm([])
    with pytest.raises(ValueError, match=r"conversation 1: empty conversation"):
        rm.score_batch([[U, A], []])


def test_pipeline_no_conversations(rm):
    with pytest.raises(ValueError, match=r"no sequences to score"):
        rm.score_batch([])


@pytest.mark.parametrize("msg,exc,match", [
    ({"content": "hi"}, ValueError, r"conversation 0: message 0 has no 'role'"),
    ({"role": "user"}, ValueError, r"conversation 0: message 0 has no 'content'"),
    ({"role": "user", "content": None}, ValueError, r"conversation 0: message 0 has no 'content'"),
    ({"role": 3, "content": "hi"}, TypeError, r"conversation 0: message 0: 'role' must be a string, got int"),
    ("hi", TypeError, r"conversation 0: message 0 must be a dict with 'role' and 'content', got str"),
])
def test_pipeline_bad_message(rm, msg, exc, match):
    with pytest.raises(exc, match=match):
        rm([msg, A])


def test_pipeline_messages_not_a_list(rm):
    with pytest.raises(TypeError, match=r"messages must be a list of \{'role', 'content'\} dicts"):
        rm("What is 2 + 2?")


@pytest.mark.parametrize("conv", [[U], [U, A, U], [A, {"role": "system", "content": "x"}]])
def test_pipeline_conversation_ending_with_non_assistant_turn(rm, conv):
    role = conv[-1]["role"]
    with pytest.raises(GatingPatternError, match=rf"conversation 1 ends with a '{role}' message; .* must end with "
                                                 r"an assistant message"):
        rm.score_batch([[U, A], conv])
    with pytest.raises(GatingPatternError, match=r"conversation 0 ends with"):
        rm(conv)


def test_pipeline_bad_records(rm):
    with pytest.raises(ValueError, match=r"record has 'prompt' but no 'response'"):
        rm.score_batch([{"prompt": "hi"}])
    with pytest.raises(ValueError, match=r"record has neither 'messages' nor 'prompt' \+ 'response' "
                                         r"\(keys: \['foo'\]\)"):
        rm.score_batch([{"foo": 1}])
    with pytest.raises(ValueError, match=r"record 'response' must be a string, got int"):
        rm.score_batch([{"prompt": "hi", "response": 3}])


def test_pipeline_truncation_cuts_final_header(rm):
    short = armorm.ArmoRMPipeline(model=rm.model, tokenizer=rm.tokenizer, max_length=40)
    assert np.isfinite(short([U, A])["score"])  # a short conversation fits
    long_prompt = [{"role": "user", "content": "word " * 50}, A]
    with pytest.raises(ValueError, match=r"conversation 0: truncation to max_length=40 tokens would cut off the "
                                         r"final assistant header \(it starts at token \d+ of \d+\)"):
        short(long_prompt)
    with pytest.raises(ValueError, match=r"conversation 1: truncation"):
        short.score_batch([[U, A], long_prompt])
    # the same conversation without truncation scores
    assert np.isfinite(armorm.ArmoRMPipeline(model=rm.model, tokenizer=rm.tokenizer, truncation=False)(long_prompt)
                       ["score"])


def test_pipeline_without_model(rm):
    with pytest.raises(ValueError, match=r"give model_id"):
        armorm.ArmoRMPipeline()


def test_pipeline_model_dir_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"does not exist"):
        armorm.ArmoRMPipeline(tmp_path / "nope")


# ---- CLI

def cli(*args) -> int:
    from armorm.cli import main
    return main([str(a) for a in args])


def _write_jsonl(path: Path, lines) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD_LINE = json.dumps({"messages": [U, A]})


@pytest.mark.parametrize("bad,match", [
    ("{bad json", r"in\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"in\.jsonl:2: record must be a dict"),
    ('"just a string"', r"in\.jsonl:2: record must be a dict"),
    (json.dumps({"messages": [{"content": "x"}]}), r"in\.jsonl:2: message 0 needs string 'role' and 'content'"),
    (json.dumps({"messages": []}), r"in\.jsonl:2: empty conversation"),
    (json.dumps({"prompt": "x"}), r"in\.jsonl:2: record has 'prompt' but no 'response'"),
    (json.dumps({"messages": "x"}), r"in\.jsonl:2: record 'messages' must be a list of message dicts"),
    (b"\xff\xfe{}", r"in\.jsonl:2: not valid UTF-8"),
])
def test_cli_malformed_jsonl_line(l3_ckpt, tmp_path, capsys, bad, match):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, bad, GOOD_LINE])
    out = tmp_path / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert err.startswith("armorm: error: ")
    assert re.search(match, err), err
    assert not out.exists()  # no partial output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temp file left either


def test_cli_conversation_ending_with_user_turn(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, "", json.dumps({"messages": [U, A, U]})])
    out = tmp_path / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert f"{inp}:3 ends with a 'user' message" in err  # file:line, blank lines counted
    assert not out.exists()


def test_cli_existing_output_untouched_on_error(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, "{oops"])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    assert "in.jsonl:2" in capsys.readouterr().err
    assert out.read_text() == "previous results\n"


def test_cli_empty_input(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", ["", "   "])
    assert cli("score", "--model", l3_ckpt, "--input", inp) == 2
    assert "in.jsonl: no conversations" in capsys.readouterr().err


def test_cli_missing_input_file(l3_ckpt, tmp_path, capsys):
    assert cli("score", "--model", l3_ckpt, "--input", tmp_path / "nope.jsonl") == 2
    err = capsys.readouterr().err
    assert "No such file" in err and "nope.jsonl" in err


def test_cli_output_directory_missing(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE])
    out = tmp_path / "no-such-dir" / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "no-such-dir" in err and "does not exist" in err


def test_cli_model_dir_does_not_exist(tmp_path, capsys):
    assert cli("score", "--model", tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--model DIR" in err


def test_cli_model_is_a_file(l3_ckpt, capsys):
    assert cli("score", "--model", l3_ckpt / "config.json") == 2
    err = capsys.readouterr().err
    assert "is a file, not a model directory" in err and "--model DIR" in err


def test_cli_broken_checkpoint(l3_ckpt, tmp_path, capsys):
    d = tmp_path / "broken"
    shutil.copytree(l3_ckpt, d)
    edit_header(d / "model.safetensors", lambda h: h.pop("model.norm.weight"))
    assert cli("score", "--model", d) == 2
    assert "missing tensor 'model.norm.weight'" in capsys.readouterr().err


def test_cli_no_model_offline(tmp_path, monkeypatch, capsys):
    """No --model, an empty HF cache and no network: a fast exit 2 telling the user to pass --model DIR."""
    import huggingface_hub.constants as hfc
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time, and it may already be imported
    monkeypatch.setattr(hfc, "HF_HOME", str(home))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    assert cli("score") == 2
    err = capsys.readouterr().err
    assert "--model DIR" in err and armorm.DEFAULT_MODEL in err
    assert not any(home.rglob("*.safetensors"))


@pytest.mark.parametrize("flag,value", [("--threads", "0"), ("--batch-tokens", "0"), ("--max-length", "-1"),
                                        ("--top-k", "-1"), ("--threads", "many")])
def test_cli_bad_numeric_flags(l3_ckpt, capsys, flag, value):
    with pytest.raises(SystemExit) as ei:
        cli("score", "--model", l3_ckpt, flag, value)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("must be at least" in err or "expected an integer" in err)


def test_cli_bad_dtype_and_command(capsys):
    with pytest.raises(SystemExit) as ei:
        cli("score", "--dtype", "int8")
    assert ei.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli("train")
    assert ei.value.code == 2


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "1e400x"])
def test_bad_parallel_min_flops(monkeypatch, value, tmp_path):
    tiny = make_armorm(tmp_path / "m")
    monkeypatch.setenv("ARMORM_PARALLEL_MIN_FLOPS", value)
    with pytest.raises(ValueError, match="ARMORM_PARALLEL_MIN_FLOPS"):
        armorm.ArmoRM.from_pretrained(tiny.path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_reported_at_load(tmp_path, dtype, bad):
    import torch
    from safetensors.torch import load_file, save_file
    tiny = make_armorm(tmp_path / "m", dtype=dtype)
    f = tiny.path / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.up_proj.weight"
    t = tensors[name].clone()
    t.view(-1)[[3, 17]] = torch.tensor(bad, dtype=t.dtype)
    tensors[name] = t
    save_file(tensors, str(f))
    with pytest.raises(armorm.CheckpointError, match=r"up_proj\.weight' holds 2 NaN/inf values.*check_finite=False in Python, --no-check-finite"):
        armorm.ArmoRM.from_pretrained(tiny.path)
    # flagged by option: loads, and the NaN/inf reaches the outputs rather than being hidden
    model = armorm.ArmoRM.from_pretrained(tiny.path, check_finite=False, gating_pattern=[5])
    out = model.score_sequences([[5, 20, 30]])
    assert not np.isfinite(out.hidden_state).all()


def test_nonfinite_head_tensor_reported(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny = make_armorm(tmp_path / "m")
    f = tiny.path / "model.safetensors"
    tensors = load_file(str(f))
    tensors["gating.logit_scale"][0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(armorm.CheckpointError, match=r"gating\.logit_scale' holds 1 NaN/inf value "):
        armorm.ArmoRM.from_pretrained(tiny.path)
