"""Bad checkpoints: every defect of a model directory (tensors, safetensors
headers, shard index, config.json, weight files, NaN/inf weights, load-time
settings) raises a CheckpointError naming the tensor or file, never a crash.
"""
from __future__ import annotations

import json
import pickle
import shutil
import struct

import numpy as np
import pytest

from armorm.config import CheckpointError
from armorm.hub import ModelNotFoundError
import armorm
from checkpoints import make_armorm
from bad_input import NORM, Q_PROJ, edit_config, edit_header, load, ok_seq, st_build, st_read, st_tensors


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
    ("model_type", "mistral", r"model_type 'mistral' is not supported \(supported: llama, qwen2, qwen3, gemma2\)"),
    ("model_type", "gemma2", r"model_type 'gemma2' contradicts architecture 'LlamaForRewardModelWithGating'"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported for this architecture \(supported: silu\)"),
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
