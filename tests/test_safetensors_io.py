"""The safetensors reader (the core's parser, armorm._core.SafetensorsFile) and writer (armorm.safetensors_io).

Every file Python reads goes through the parser the checkpoints use; the
hostile-file cases are in tests/errors/ and tests/c.
"""
import json
import struct

import numpy as np
import pytest

from armorm import _core
from armorm.safetensors_io import SafetensorsFile, bf16_to_float32, float32_to_bf16, load_file, save_file


def test_safetensors_roundtrip_and_bf16_rounding(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 1e3
    x[0, 0] = np.nan
    x[0, 1] = np.inf
    x[0, 2] = -0.0
    bits = float32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(x)
    assert np.array_equal(bits[finite], ref[finite])
    assert np.isnan(bf16_to_float32(bits)[0, 0]) and bf16_to_float32(bits)[0, 1] == np.inf
    p = tmp_path / "t.safetensors"
    save_file({"e": x, "l": np.arange(6, dtype=np.int64).reshape(2, 3)}, p, metadata={"k": "v"}, dtypes={"e": "BF16"})
    t = torch_load(str(p))
    assert t["e"].dtype == torch.bfloat16 and t["l"].tolist() == [[0, 1, 2], [3, 4, 5]]
    f = SafetensorsFile(p)
    assert f.metadata == {"k": "v"} and f.info("e").dtype == "BF16"
    assert np.array_equal(f.read("e", 2, 5), bits[2:5])
    back = load_file(p, as_float32=True)["e"]
    assert np.array_equal(back[finite], torch.from_numpy(x).to(torch.bfloat16).float().numpy()[finite])
    assert [q.name for q in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left behind


def test_safetensors_write_is_atomic(tmp_path):
    p = tmp_path / "t.safetensors"

    def parts():
        yield np.zeros((2, 3), np.float32)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_file({"x": ("F32", (4, 3), parts())}, p)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"t\.safetensors: header length 16 exceeds the file size"):
        SafetensorsFile(p)  # the core's parser reads every file, and names the defect


def test_reader_reads_rows_views_and_converts(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    h = rng.normal(size=(3, 2)).astype(np.float16)
    ids = np.arange(5, dtype=np.int64) - 2
    p = tmp_path / "a.safetensors"
    save_file({"z": x, "h": h, "ids": ids, "b": x, "s": np.array(2.5, np.float32)}, p,
              metadata={"k": "v", "json": json.dumps([1, "é"])}, dtypes={"b": "BF16"})
    f = SafetensorsFile(p)
    assert f.path == str(p) and "z" in f and "nope" not in f and 5 not in f
    assert f.keys() == ["z", "h", "ids", "b", "s"]  # file order
    assert f.metadata == {"k": "v", "json": json.dumps([1, "é"])}
    info = f.info("b")
    assert (info.name, info.dtype, info.shape) == ("b", "BF16", (9, 4)) and info.data_offsets[1] > info.data_offsets[0]
    np.testing.assert_array_equal(f.read("z"), x)
    np.testing.assert_array_equal(f.read("z", 2, 5), x[2:5])
    np.testing.assert_array_equal(f.read("h", dtype=np.float32), h.astype(np.float32))
    np.testing.assert_array_equal(f.read("ids", dtype="float64"), ids.astype(np.float64))
    bits = f.read("b")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(f.read("b", 1, 3, dtype=np.float32), bf16_to_float32(bits[1:3]))
    np.testing.assert_array_equal(f.read("b", dtype=np.float64), bf16_to_float32(bits).astype(np.float64))
    assert f.read("s").shape == () and float(f.read("s")) == 2.5
    out = np.zeros((2, 4), np.float32)
    assert f.read("z", 7, 9, out=out) is out and np.array_equal(out, x[7:])
    v = f.view("z")
    assert not v.flags.writeable and np.array_equal(v, x)
    del f  # the view keeps the mapping
    np.testing.assert_array_equal(v, x)
    f = SafetensorsFile(p)
    with pytest.raises(ValueError, match=r"a\.safetensors: no tensor named 'nope' \(it has z, h, ids, b, s\)"):
        f.read("nope")
    with pytest.raises(IndexError, match=r"rows \[3, 10\) out of range for 'z' with 9 rows"):
        f.read("z", 3, 10)
    with pytest.raises(ValueError, match="`out` has the wrong shape, dtype or layout"):
        f.read("z", 0, 2, out=np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError, match="dtype must be None, float32 or float64"):
        f.read("z", dtype=np.int32)
    with pytest.raises(TypeError, match="a tensor name must be a str"):
        f.info(3)
    with pytest.raises(ValueError, match=r"cannot open"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def test_reader_refuses_what_numpy_cannot_hold(tmp_path):
    header = json.dumps({"f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    p = tmp_path / "f8.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    f = SafetensorsFile(p)
    assert f.info("f8").dtype == "F8_E4M3"
    for call in (lambda: f.read("f8"), lambda: f.view("f8")):
        with pytest.raises(ValueError, match="dtype F8_E4M3, which NumPy cannot hold"):
            call()


def test_bf16_helpers_are_the_cores():
    x = np.array([1.0, -2.5, 3.0e38, np.inf, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    bits = float32_to_bf16(x)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    assert bits.tolist()[5:] == [0x3F80, 0x3F82]  # ties to even
    out = np.empty(x.shape, np.float64)
    assert bf16_to_float32(bits, out=out) is out
    np.testing.assert_array_equal(out, bf16_to_float32(bits))
    assert float32_to_bf16 is _core.float32_to_bf16 and bf16_to_float32 is _core.bf16_to_float32
