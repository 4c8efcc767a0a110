"""The CUDA build decisions that need no nvcc and no GPU (build_tools/cuda_build.py):

  * the reason recorded in the extension (armorm._core.CUDA_BUILD_REASON) for every way a
    build goes (ARMORM_NO_CUDA, no nvcc, no cuBLASLt of nvcc's major version, built), and that
    it survives the trip through a -D macro into C intact;
  * device_map="cuda" on a CPU-only build gives that reason;
  * cuBLASLt is taken only in nvcc's major version (a CUDA 12 nvcc never links cuBLAS 13);
  * which toolkit a driver runs (fake driver versions, compute capabilities and nvcc scripts),
    and benchmarks/gpu_check.sh's preflight command end to end on them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("armorm_cuda_build_toolkit_test", ROOT / "build_tools" / "cuda_build.py")
cb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cb)


def fake_nvcc(dirpath: Path, version: str) -> str:
    """An executable that answers `--version` as nvcc `version` does (and --dryrun with its TOP)."""
    bin_dir = dirpath / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    f'case "$1" in --version) echo "Cuda compilation tools, release {version}, V{version}.99";;\n'
                    f'  *) echo "#$ TOP={dirpath}";; esac\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (dirpath / "lib64").mkdir(exist_ok=True)
    (dirpath / "lib64" / "libcudart_static.a").write_bytes(b"")
    (dirpath / "include").mkdir(exist_ok=True)
    (dirpath / "include" / "cuda_runtime.h").write_text("")
    return str(nvcc)


def fake_cublas(dirpath: Path, major: int, header: bool = True) -> Path:
    (dirpath / "include").mkdir(parents=True, exist_ok=True)
    (dirpath / "include" / "cublasLt.h").write_text("")
    if header:
        (dirpath / "include" / "cublas_api.h").write_text(f"#define CUBLAS_VER_MAJOR {major}\n")
    (dirpath / "lib").mkdir(exist_ok=True)
    (dirpath / "lib" / f"libcublasLt.so.{major}").write_bytes(b"")
    return dirpath


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("ARMORM_NO_CUDA", "ARMORM_REQUIRE_CUDA", "ARMORM_CUBLAS_HOME", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cb, "_site_dirs", lambda: [])
    return monkeypatch


# ---- the recorded reason ---------------------------------------------------------------------


def test_reason_no_cuda(clean_env):
    clean_env.setenv("ARMORM_NO_CUDA", "1")
    plan = cb.plan_cuda_build()
    assert not plan.build and "ARMORM_NO_CUDA=1" in plan.reason


def test_reason_no_nvcc(clean_env):
    clean_env.setattr(cb, "find_nvcc", lambda: None)
    plan = cb.plan_cuda_build()
    assert not plan.build and plan.reason.startswith("nvcc was not found")


def test_reason_nvcc_without_cublas_is_not_called_missing_nvcc(clean_env, tmp_path):
    nvcc = fake_nvcc(tmp_path / "cuda-13.0", "13.0")
    clean_env.setattr(cb, "find_nvcc", lambda: nvcc)
    plan = cb.plan_cuda_build()
    assert not plan.build
    assert "nvcc was not found" not in plan.reason
    assert f"nvcc 13.0 was found ({nvcc}) but not cuBLASLt 13" in plan.reason
    assert "pip install nvidia-cublas`" in plan.reason


def test_reason_names_a_cublas_of_the_wrong_major(clean_env, tmp_path):
    nvcc = fake_nvcc(tmp_path / "cuda-12.4", "12.4")
    clean_env.setattr(cb, "find_nvcc", lambda: nvcc)
    clean_env.setenv("ARMORM_CUBLAS_HOME", str(fake_cublas(tmp_path / "cu13", 13)))
    plan = cb.plan_cuda_build()
    assert not plan.build
    assert "not cuBLASLt 12" in plan.reason and "found only cuBLASLt 13" in plan.reason
    assert "nvidia-cublas-cu12" in plan.reason


def test_reason_when_built(clean_env, tmp_path):
    nvcc = fake_nvcc(tmp_path / "cuda-12.4", "12.4")
    clean_env.setattr(cb, "find_nvcc", lambda: nvcc)
    clean_env.setenv("ARMORM_CUBLAS_HOME", str(fake_cublas(tmp_path / "cu12", 12)))
    plan = cb.plan_cuda_build()
    assert plan.build, plan.reason
    assert plan.reason.startswith(f"built with nvcc 12.4 ({nvcc}) and cuBLASLt 12 ")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
def test_reason_reaches_c_intact(tmp_path):
    """The -D value setuptools passes (as one argument, no shell) is the exact text in C."""
    reason = 'nvcc 13.0 was found (/opt/a "b"\\c) but not cuBLASLt 13: `pip install nvidia-cublas`'
    src = tmp_path / "r.c"
    src.write_text('#include <stdio.h>\nint main(void) { fputs(ARMORM_CUDA_BUILD_REASON, stdout); return 0; }\n')
    exe = tmp_path / "r"
    subprocess.run(["gcc", f"-DARMORM_CUDA_BUILD_REASON={cb.c_string(reason)}", str(src), "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout == reason


def test_device_map_cuda_gives_the_recorded_reason(monkeypatch):
    pytest.importorskip("armorm._core")
    import armorm.model as model

    class CpuOnlyCore:
        CUDA_BUILT = 0
        CUDA_BUILD_REASON = "nvcc 13.0 was found (/usr/local/bin/nvcc) but not cuBLASLt 13"

        @staticmethod
        def cuda_device_count():
            return 0

    monkeypatch.setattr(model, "_core", CpuOnlyCore)
    with pytest.raises(RuntimeError) as err:
        model._device_name("cuda")
    assert CpuOnlyCore.CUDA_BUILD_REASON in str(err.value)
    assert "nvcc was not found" not in str(err.value)


def test_built_extension_records_a_reason():
    core = pytest.importorskip("armorm._core")
    reason = core.CUDA_BUILD_REASON
    assert isinstance(reason, str) and reason
    assert reason.startswith("built with nvcc") == bool(core.CUDA_BUILT), reason


# ---- cuBLASLt of nvcc's major version ----------------------------------------------------------


def test_cublas_wheel_layouts_by_major(clean_env, tmp_path):
    site = tmp_path / "site"
    fake_cublas(site / "nvidia" / "cu13", 13)
    fake_cublas(site / "nvidia" / "cublas", 12, header=False)  # the cu12 wheel: the version is in the file name
    clean_env.setattr(cb, "_site_dirs", lambda: [site])
    tk = {"root": [str(tmp_path / "none")], "include": [], "lib": []}
    lt13 = cb.find_cublaslt(tk, 13)
    lt12 = cb.find_cublaslt(tk, 12)
    assert lt13["major"] == "13" and lt13["lib"].endswith("cu13/lib") and lt13["name"] == ":libcublasLt.so.13"
    assert lt12["major"] == "12" and lt12["lib"].endswith("cublas/lib") and lt12["name"] == ":libcublasLt.so.12"
    rejected = []
    assert cb.find_cublaslt(tk, 11, rejected) is None
    assert rejected == [f"cuBLASLt 12 in {site / 'nvidia' / 'cublas'}"]


def test_cublas_wheel_names():
    assert cb.cublas_wheel(13) == "nvidia-cublas"
    assert cb.cublas_wheel(12) == "nvidia-cublas-cu12"
    assert cb.cublas_wheel(None) == "nvidia-cublas"


# ---- the toolkit a driver runs --------------------------------------------------------------------


@pytest.mark.parametrize("driver,toolkit,cc,ok", [
    ("535.104.05", (13, 0), (9, 0), False),   # CUDA 13 needs >= 580
    ("535.104.05", (12, 4), (9, 0), True),    # minor version compatibility: sm_90 machine code, no JIT
    ("535.104.05", (12, 8), (9, 0), True),
    ("525.60.13", (12, 0), (9, 0), True),
    ("525.60.12", (12, 0), (9, 0), False),
    ("570.86.10", (12, 8), (9, 0), True),
    ("580.65.06", (13, 0), (9, 0), True),
    ("580.65.06", (12, 9), (9, 0), True),
    ("570.86.10", (12, 8), (10, 0), True),    # another GPU: PTX JIT, the driver must know CUDA 12.8
    ("550.54.14", (12, 8), (10, 0), False),
    ("470.82.01", (12, 4), (9, 0), False),
    ("590.1", (14, 0), (9, 0), False),         # a major version this table does not know
])
def test_toolkit_runs(driver, toolkit, cc, ok):
    why = cb.toolkit_runs(driver, toolkit, cc)
    assert (why is None) == ok, why


def test_driver_cuda():
    assert cb.driver_cuda("535.104.05") == (12, 2)
    assert cb.driver_cuda("580.65.06") == (13, 0)
    assert cb.driver_cuda("570.124.06") == (12, 8)
    assert cb.driver_cuda("418.0") is None
    with pytest.raises(ValueError):
        cb.parse_version("N/A")


def test_choose_the_newest_toolkit_the_driver_runs(tmp_path):
    kits = [(fake_nvcc(tmp_path / "cuda-13.0", "13.0"), (13, 0)), (fake_nvcc(tmp_path / "cuda-12.4", "12.4"), (12, 4)),
            (fake_nvcc(tmp_path / "cuda-12.8", "12.8"), (12, 8))]
    chosen, notes = cb.choose_toolkit("535.104.05", (9, 0), kits)
    assert chosen == kits[2]
    assert any("cuda-13.0" in n and "needs driver >= 580.65.06" in n for n in notes)
    chosen, _ = cb.choose_toolkit("580.82.07", (9, 0), kits)
    assert chosen == kits[0]
    chosen, notes = cb.choose_toolkit("470.82.01", (9, 0), kits)
    assert chosen is None and len(notes) == 3


def test_preflight_command(tmp_path):
    old = fake_nvcc(tmp_path / "cuda-13.0", "13.0")
    new = fake_nvcc(tmp_path / "cuda-12.6", "12.6")
    env_file = tmp_path / "env.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("ARMORM_CUBLAS_HOME",)}
    cmd = [sys.executable, str(ROOT / "build_tools" / "cuda_build.py"), "preflight", "--only", "--toolkit", old,
           "--toolkit", new, "--env-file", str(env_file), "--gpu", "NVIDIA H100 80GB HBM3", "--cc", "9.0"]
    res = subprocess.run(cmd + ["--driver", "535.104.05"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "driver:   535.104.05 (supports CUDA <= 12.2)" in res.stdout
    assert "gpu:      NVIDIA H100 80GB HBM3 (compute capability 9.0)" in res.stdout
    assert f"build:    {new} (CUDA 12.6)" in res.stdout
    exports = env_file.read_text()
    assert f"export CUDA_HOME={tmp_path / 'cuda-12.6'}\n" in exports
    # no cuBLAS 12 beside the fake toolkit: installed from the package index, unless this Python has one
    assert "ARMORM_PIP_CUBLAS=nvidia-cublas-cu12" in exports or ", cuBLASLt 12 (" in res.stdout
    res = subprocess.run(cmd + ["--driver", "470.82.01"], capture_output=True, text=True, env=env)
    assert res.returncode == 3
    assert "no toolkit here runs with this driver" in res.stdout
    assert env_file.read_text() == ""


def test_gpu_check_prints_its_table_when_every_step_fails(tmp_path):
    """benchmarks/gpu_check.sh with a Python that fails at once: every step fails, the step table
    still comes (after the preflight, build, emulation, kernels, tests and bench steps) and the exit
    code says so."""
    env = dict(os.environ, PYTHON="false", GPU_CHECK_OUT=str(tmp_path))
    env.pop("NVCC", None)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode != 0
    table = res.stdout[res.stdout.index("gpu_check summary"):]
    for name in ("preflight", "build", "emulation", "kernels", "tests", "bench"):
        line = next((ln for ln in table.splitlines() if ln.startswith(name + " ")), None)
        assert line is not None and "FAILED" in line, table
