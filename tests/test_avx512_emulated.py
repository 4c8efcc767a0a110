"""The avx512 attention path's code, run on any x86 CPU by emulating its intrinsics (SIMDe).

This machine class may lack AVX-512, so the kernel-path tests skip that path;
here csrc/cpu/attention_avx512.c (and the vector math it includes) is compiled
against tests/avx512_emu/immintrin.h (SIMDe's portable AVX-512, from the
system's libsimde-dev headers) with their target attributes removed, and tests/avx512_emu/attention_check.c checks, for
several head shapes and sliding windows, that N sequences sharing a prompt give bit-identical rows
scored whole and as one prefix plus N continuations (docs/best_of_n.md), on the
avx512 and the portable path, and that the two paths agree to fp32 rounding.
Skips, saying why, without gcc or the SIMDe headers (`apt-get install libsimde-dev`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIMDE = Path("/usr/include/simde/x86/avx512.h")

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found"),
    pytest.mark.skipif(not SIMDE.exists(), reason=f"{SIMDE} not found: install libsimde-dev to run the avx512 "
                                                  "attention code without AVX-512"),
]


def test_avx512_attention_shares_prefixes_bit_identically(tmp_path):
    # the kernel and the vector math it includes, with their AVX-512 target attributes removed (SIMDe's portable
    # code must not be compiled into AVX-512 instructions); the copies sit together, so the include finds this one
    target = re.compile(r'__attribute__\(\(target\("avx512f,avx512bw,avx512vl,fma"\)\)\)')
    for name in ("attention_avx512.c", "vmath_avx512.h"):
        src = (ROOT / "csrc" / "cpu" / name).read_text()
        emu, n = target.subn("", src)
        assert n >= 1, f"{name} no longer carries the AVX-512 target attribute this test removes"
        (tmp_path / name).write_text(emu)
    exe = tmp_path / "attention_check"
    res = subprocess.run(["gcc", "-std=c11", "-O2", "-fopenmp", "-DARMORM_NO_CLONES",
                          f"-I{ROOT / 'tests' / 'avx512_emu'}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cpu'}",
                          str(ROOT / "tests" / "avx512_emu" / "attention_check.c"),
                          str(tmp_path / "attention_avx512.c"), "-o", str(exe), "-lm"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, check=True).stdout
    cases = [line for line in out.splitlines() if "identical=" in line]
    assert len(cases) == 14 and {c.split()[0] for c in cases} == {"portable", "avx512"}, out
    assert all(c.endswith("identical=1") for c in cases), out
    diff = float(out.split("max_path_diff=")[1])
    assert diff < 1e-5, out
