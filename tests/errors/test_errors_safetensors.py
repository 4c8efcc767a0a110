"""The safetensors parser from Python (inspect_safetensors, parse_safetensors_bytes):
each corrupt buffer raises a ValueError naming the defect; the random-corruption
loop is there to catch crashes.
"""
from __future__ import annotations

import json
import random
import struct

import pytest

from armorm import _core
from bad_input import NORM, st_pack


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
