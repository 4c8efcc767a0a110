"""Every CUDA kernel of csrc/cuda, run on the CPU and checked against its reference.

tests/cuda_emu compiles the unchanged kernel sources (csrc/cuda/k_*.cuh) as host
C++ with ASan and UBSan: each CUDA thread is a fiber with a real __syncthreads,
warp shuffles, mma.sync m16n8k16 and ldmatrix are emulated from the PTX ISA's
fragment layouts. Each kernel runs through the launcher the backend calls and is
compared with the CPU reference the GPU harnesses use (benchmarks/cuda/reference.h)
over head dims 16-128, GQA 1:1 to 8:1, sequence lengths 1-700 that end exactly at
the buffer's end, odd sizes and large amplitudes.

Mutation tests: builds with one planted fault (a fragment in the wrong register,
swapped halves, swapped accumulator rows, a shuffle partner error, a grid one
block short) must fail the same checks; deliberately broken kernels (a barrier
not every thread reaches, a warp collective with an exited lane) must be refused.

The "gemm" group checks the cuBLASLt call of every projection (transposes,
leading dimensions, row-major outputs, beta = 1 accumulation): the values
csrc/cuda/plan.cu's cuda_gemm_call produces, which gemm.cu turns into cuBLASLt
descriptors, are run by a CPU stand-in of cublasLtMatmul (tests/cuda_emu/lt_standin.h).

Needs only g++ (and make); no nvcc, no GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None or shutil.which("make") is None,
                                reason=f"{CXX} or make not found: the CUDA emulation cannot be built")

MUTANTS = {
    1: "mma A fragment registers exchanged",
    2: "mma B register halves exchanged",
    3: "mma accumulator rows g and g+8 exchanged",
    4: "shuffle xor partner error",
    5: "grid one block short",
}
# ASan's leak check is off: the harness's buffers live until exit by design.
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda_emu")
    res = subprocess.run(["make", "-s", "-C", str(EMU), f"BUILD={out}", f"CXX={CXX}", f"-j{min(4, os.cpu_count() or 1)}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return out


def run(exe: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def checks(stdout: str) -> dict:
    """name -> 'OK' / 'MISMATCH' for every check line the program printed."""
    out = {}
    for line in stdout.splitlines():
        if line.endswith((" OK", " MISMATCH")):
            name, _, verdict = line.rpartition(" ")
            out[" ".join(name.split()[:6])] = verdict
    return out


@pytest.mark.parametrize("group", ["selftest", "attention", "rmsnorm", "rope", "swiglu", "head", "embedding",
                                   "convert", "gemm"])
def test_kernel_matches_reference(build, group):
    res = run(build / "kernels_test", group)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    got = checks(res.stdout)
    assert got, res.stdout
    # the gemm group's deliberately flipped transposes must be refused or mismatch; all else must match
    for name, verdict in got.items():
        assert verdict == ("MISMATCH" if "flipped" in name else "OK"), res.stdout
    assert res.stdout.splitlines()[-1].endswith(" 0 failed"), res.stdout[-2000:]


def test_every_kernel_is_covered(build):
    """Each __global__ kernel in csrc/cuda/k_*.cuh appears in the emulation's checks."""
    src = (EMU / "kernels_test.cpp").read_text()
    kernels = set()
    for f in sorted((ROOT / "csrc" / "cuda").glob("k_*.cuh")):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                                  f.read_text()))
    assert len(kernels) >= 13, kernels
    launchers = {"attention_tc_kernel": "launch_attention", "attention_warp_kernel": "attention_warp_kernel",
                 "to_bf16_kernel": "launch_to_bf16", "add_bias_kernel": "launch_add_bias",
                 "embedding_kernel": "launch_embedding", "head_linear_kernel": "launch_head_linear",
                 "armorm_finish_kernel": "launch_armorm_finish", "first_column_kernel": "launch_first_column",
                 "rmsnorm_kernel": "launch_rmsnorm<", "rmsnorm_vec4_kernel": "launch_rmsnorm<",
                 "rope_kernel": "launch_rope", "swiglu_kernel": "launch_swiglu", "swiglu_vec8_kernel": "launch_swiglu"}
    missing = sorted(k for k in kernels if k not in launchers)
    assert not missing, f"kernels without an emulation check (add them to tests/cuda_emu/kernels_test.cpp): {missing}"
    for k, call in launchers.items():
        assert call in src, f"{k}: {call} is not called by tests/cuda_emu/kernels_test.cpp"


@pytest.mark.parametrize("mutant", sorted(MUTANTS), ids=[MUTANTS[m].replace(" ", "_") for m in sorted(MUTANTS)])
def test_planted_fault_is_caught(build, mutant):
    res = run(build / f"mutant{mutant}", "quick")
    assert res.returncode != 0, f"{MUTANTS[mutant]} went unnoticed:\n{res.stdout}"
    bad = [name for name, verdict in checks(res.stdout).items() if verdict == "MISMATCH"]
    assert bad, res.stdout + res.stderr
    if mutant <= 3:  # a tensor-core fault shows in the attention kernel itself
        assert any(name.startswith("attention") for name in bad), bad


def test_quick_subset_passes_without_a_fault(build):
    """The checks the mutants fail pass on the unmodified emulator."""
    res = run(build / "kernels_test", "quick")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("case,message", [("divergent-barrier", "__syncthreads"), ("exited-lane", "exited")])
def test_broken_kernel_is_refused(build, case, message):
    res = run(build / "kernels_test", case, timeout=120)
    assert res.returncode != 0
    assert "cuda_emu:" in res.stderr and message in res.stderr, res.stderr[-3000:]


def test_validate_keeps_nan_and_the_largest_error(tmp_path):
    """benchmarks/cuda/check.h validate(): a NaN anywhere fails, even when a finite value follows it,
    and the largest finite error is reported, not the last one."""
    prog = tmp_path / "v.cpp"
    prog.write_text(r'''
#include "check.h"
int main() {
    const float ref[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    const float nan_first[4] = {__builtin_nanf(""), 2.0f, 3.0f, 4.0f};   // an unwritten first output
    const float nan_mid[4] = {1.0f, __builtin_nanf(""), 3.0f, 4.0f};
    const float inf_out[4] = {1.0f, 2.0f, __builtin_inff(), 4.0f};
    const float big_then_small[4] = {1.5f, 2.0f, 3.01f, 4.0f};            // error 0.5 then 0.01
    const float ok[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    int r = 0;
    r |= validate("nan_first", nan_first, ref, 4, 1.0) == 1 ? 0 : 1;
    r |= validate("nan_mid", nan_mid, ref, 4, 1.0) == 1 ? 0 : 2;
    r |= validate("inf", inf_out, ref, 4, 1.0) == 1 ? 0 : 4;
    r |= validate("big_then_small", big_then_small, ref, 4, 0.1) == 1 ? 0 : 8;   // 0.5 / 4 > 0.1
    r |= validate("ok", ok, ref, 4, 0.0) == 0 ? 0 : 16;
    return r;
}
''')
    exe = tmp_path / "v"
    res = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unused-function", f"-I{ROOT / 'benchmarks' / 'cuda'}", str(prog),
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, f"failed cases bitmask {res.returncode}:\n{res.stdout}"
    line = next(l for l in res.stdout.splitlines() if l.startswith("big_then_small"))
    assert "max|err| 5.000e-01" in line and "at 0:" in line, line
    line = next(l for l in res.stdout.splitlines() if l.startswith("nan_first"))
    assert "1 non-finite" in line and "at 0:" in line, line
