"""Build logic for the CUDA backend: finds nvcc and cuBLASLt, compiles csrc/cuda/*.cu,
records why the backend was (not) built, and picks a toolkit the GPU driver supports.

Build time only: setup.py loads it by path (it imports nothing from armorm, which
needs the extension it builds), and the armorm package never imports it:

    spec = importlib.util.spec_from_file_location("armorm_cuda_build", "build_tools/cuda_build.py")

Environment:
  ARMORM_NO_CUDA=1        build CPU-only even when nvcc is present
  CUDA_HOME / CUDA_PATH   toolkit to use (else nvcc on PATH, else /usr/local/cuda)
  ARMORM_CUBLAS_HOME      directory with include/cublasLt.h and lib/libcublasLt.so*
  ARMORM_NVCC_FLAGS       extra nvcc flags (space separated)
  ARMORM_REQUIRE_CUDA=1   fail instead of building CPU-only when nvcc or cuBLASLt is missing (CI)

With nvcc found, any compile error raises CudaBuildError: a CUDA build that
silently fell back to CPU-only would hide broken kernels from CI. nvcc
without a cuBLASLt of its own major version builds CPU-only with a warning,
unless ARMORM_REQUIRE_CUDA=1. Either way the reason is compiled into the
extension (armorm._core.CUDA_BUILD_REASON), so device_map="cuda" on a CPU-only
build says what was missing.

Command line (python build_tools/cuda_build.py ...):
  nvcc                 the nvcc this build uses (benchmarks/cuda/Makefile asks here)
  preflight [--env-file F] [--driver V --gpu NAME --cc M.m] [--toolkit NVCC ...]
                       the driver, the GPU, every toolkit found and the one the driver
                       supports (benchmarks/gpu_check.sh); F gets the shell exports
  (none)               compile and print what setup.py would get
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

GENCODE = ["-gencode", "arch=compute_90,code=sm_90",        # Hopper machine code
           "-gencode", "arch=compute_90,code=compute_90"]   # plus PTX for newer GPUs
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-lineinfo"]


class CudaBuildError(RuntimeError):
    """nvcc was found but the CUDA backend could not be built."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def find_nvcc() -> Optional[str]:
    """nvcc from CUDA_HOME/CUDA_PATH, PATH, or /usr/local/cuda; None when absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def toolkit_dirs(nvcc: str) -> Dict[str, List[str]]:
    """Include and library directories of the toolkit behind `nvcc`.

    Asked of nvcc itself (--dryrun prints its TOP and target directory), since
    nvcc on PATH may be a wrapper script outside the toolkit.
    """
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    top = target = None
    for line in text.splitlines():
        m = re.match(r"#\$ TOP=(.*)$", line.strip())
        if m:
            top = m.group(1).strip()
        m = re.match(r"#\$ _TARGET_DIR_=(.*)$", line.strip())
        if m and m.group(1).strip():
            target = m.group(1).strip()
    if top is None:
        top = str(Path(nvcc).resolve().parent.parent)
    root = Path(top).resolve()
    cands = [root / target] if target else []
    cands.append(root)
    inc = [str(c / "include") for c in cands if (c / "include" / "cuda_runtime.h").is_file()]
    lib = [str(c / d) for c in cands for d in ("lib", "lib64") if glob.glob(str(c / d / "libcudart*"))]
    return {"root": [str(root)], "include": inc, "lib": lib}


def _site_dirs() -> List[Path]:
    """Python package directories, including this interpreter's own site-packages even
    inside pip's isolated build environment (which hides them from sys.path)."""
    dirs = [Path(p) for p in sys.path if p]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # some virtualenv versions
        pass
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        for key in ("purelib", "platlib"):
            dirs.append(Path(sysconfig.get_path(key, vars={"base": prefix, "platbase": prefix})))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen and d.is_dir():
            seen.add(d)
            unique.append(d)
    return unique


def nvcc_version(nvcc: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of the CUDA release behind `nvcc` ("release 13.0" in nvcc --version)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cublas_header_major(include_dir: Path) -> Optional[int]:
    """CUBLAS_VER_MAJOR from cublas_api.h in include_dir, when it says."""
    f = Path(include_dir) / "cublas_api.h"
    try:
        m = re.search(r"#define\s+CUBLAS_VER_MAJOR\s+(\d+)", f.read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _lib_major(lib: Path) -> Optional[int]:
    """N of libcublasLt.so.N (following an unversioned symlink)."""
    for name in (lib.name, lib.resolve().name):
        m = re.match(r"libcublasLt\.so\.(\d+)", name)
        if m:
            return int(m.group(1))
    return None


def cublas_wheel(major: Optional[int]) -> str:
    """The PyPI package with the cuBLAS of a CUDA major version."""
    return {11: "nvidia-cublas-cu11", 12: "nvidia-cublas-cu12"}.get(major or 13, "nvidia-cublas")


def find_cublaslt(tk: Dict[str, List[str]], cuda_major: Optional[int] = None,
                  rejected: Optional[List[str]] = None) -> Optional[Dict[str, str]]:
    """{include, lib, name, major} of a cuBLASLt whose major version is cuda_major (nvcc's):
    ARMORM_CUBLAS_HOME's, the toolkit's, or a pip wheel's (nvidia/cu13 for CUDA 13, nvidia/cublas
    for CUDA 12 and 11). A library of another major version cannot be linked with this nvcc's
    runtime; each one skipped is described in `rejected`."""
    cands: List[Path] = []
    if os.environ.get("ARMORM_CUBLAS_HOME"):
        cands.append(Path(os.environ["ARMORM_CUBLAS_HOME"]))
    cands += [Path(p).parent for p in tk["include"]]
    cands += [Path(p) for p in tk["root"]]
    for d in _site_dirs():
        if cuda_major is None or cuda_major >= 13:
            cands.append(d / "nvidia" / f"cu{cuda_major or 13}")
        cands.append(d / "nvidia" / "cublas")  # the CUDA 12 and 11 wheel layout
    seen = set()
    for c in cands:
        inc = c / "include"
        if c in seen or not (inc / "cublasLt.h").is_file():
            continue
        seen.add(c)
        for libdir in (c / "lib", c / "lib64"):
            libs = ([libdir / "libcublasLt.so"] if (libdir / "libcublasLt.so").exists() else []) + \
                sorted(libdir.glob("libcublasLt.so.*"), key=lambda p: len(p.name))
            if not libs:
                continue
            major = cublas_header_major(inc) or _lib_major(libs[0])
            if cuda_major is not None and major is not None and major != cuda_major:
                if rejected is not None:
                    rejected.append(f"cuBLASLt {major} in {c}")
                break
            # wheels ship only libcublasLt.so.N: link it by file name
            name = "cublasLt" if libs[0].name == "libcublasLt.so" else ":" + libs[0].name
            return {"include": str(inc), "lib": str(libdir), "name": name, "major": str(major or "")}
    return None


def _newest_input(root: Path) -> float:
    files = list((root / "csrc" / "cuda").glob("*.cu")) + list((root / "csrc" / "cuda").glob("*.cuh"))
    files += list((root / "csrc" / "cuda").glob("*.h")) + list((root / "csrc").glob("*.h"))
    files += list((root / "csrc" / "cpu").glob("*.h"))
    return max((f.stat().st_mtime for f in files), default=0.0)


def cuda_sources(root) -> List[Path]:
    """The .cu files of the backend (csrc/cuda/*.cu; test programs live in subfolders)."""
    return sorted((Path(root) / "csrc" / "cuda").glob("*.cu"))


def compile_cuda_objects(root, build_dir, nvcc: Optional[str] = None, include_dirs: Optional[List[str]] = None,
                         jobs: Optional[int] = None, force: bool = False,
                         extra_flags: Optional[List[str]] = None) -> List[str]:
    """Compiles every csrc/cuda/*.cu to an object in build_dir; returns their paths.

    An object newer than every CUDA source and header is reused. Raises
    CudaBuildError with nvcc's output on the first failure.
    """
    root = Path(root).resolve()
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found")
    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    incs = [str(root / "csrc")] + list(include_dirs or [])
    flags = NVCC_FLAGS + GENCODE + [f"-I{d}" for d in incs] + shlex.split(os.environ.get("ARMORM_NVCC_FLAGS", ""))
    flags += list(extra_flags or [])
    newest = _newest_input(root)
    # objects built with other flags (or another nvcc) are not reused
    stamp = build / "flags.txt"
    sig = "\n".join([nvcc] + flags)
    if not stamp.exists() or stamp.read_text() != sig:
        force = True

    def one(src: Path) -> str:
        obj = build / (src.stem + ".o")
        if not force and obj.exists() and obj.stat().st_mtime >= newest:
            return str(obj)
        cmd = [nvcc] + flags + ["-c", str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CudaBuildError(f"nvcc failed on {src.relative_to(root)} (exit {res.returncode}):\n"
                                 f"{' '.join(shlex.quote(c) for c in cmd)}\n{res.stdout}{res.stderr}")
        return str(obj)

    srcs = cuda_sources(root)
    if not srcs:
        raise CudaBuildError(f"no CUDA sources in {root / 'csrc' / 'cuda'}")
    with ThreadPoolExecutor(max_workers=jobs or min(len(srcs), os.cpu_count() or 1)) as ex:
        objs = list(ex.map(one, srcs))
    stamp.write_text(sig)
    return objs


def _version_text(v: Optional[Tuple[int, int]]) -> str:
    return f"{v[0]}.{v[1]}" if v else "(version unknown)"


class CudaBuildPlan:
    """What the build will do: compile the CUDA backend (`build`) or not, and why (`reason`)."""

    def __init__(self, build: bool, reason: str, nvcc: Optional[str] = None,
                 toolkit: Optional[Dict[str, List[str]]] = None, cublas: Optional[Dict[str, str]] = None):
        self.build, self.reason, self.nvcc, self.toolkit, self.cublas = build, reason, nvcc, toolkit, cublas


def plan_cuda_build() -> CudaBuildPlan:
    """Decides whether the CUDA backend can be built here, and the reason to record either way."""
    if _env_flag("ARMORM_NO_CUDA"):
        return CudaBuildPlan(False, "ARMORM_NO_CUDA=1 was set when it was built")
    nvcc = find_nvcc()
    if nvcc is None:
        return CudaBuildPlan(False, "nvcc was not found when it was built (set CUDA_HOME or put nvcc on PATH, "
                                    "then rebuild)")
    version = nvcc_version(nvcc)
    found = f"nvcc {_version_text(version)} was found ({nvcc})"
    tk = toolkit_dirs(nvcc)
    if not tk["lib"]:
        return CudaBuildPlan(False, f"{found} but no CUDA runtime library (libcudart) next to it; set CUDA_HOME "
                                    "to a complete toolkit", nvcc, tk)
    major = version[0] if version else None
    rejected: List[str] = []
    lt = find_cublaslt(tk, major, rejected)
    if lt is None:
        want = f"cuBLASLt {major}" if major else "cuBLASLt"
        also = f" (found only {', '.join(rejected)}, another major version than nvcc's)" if rejected else ""
        return CudaBuildPlan(False, f"{found} but not {want} (cublasLt.h and libcublasLt.so){also}: "
                                    f"`pip install {cublas_wheel(major)}` or set ARMORM_CUBLAS_HOME, then rebuild",
                             nvcc, tk)
    return CudaBuildPlan(True, f"built with nvcc {_version_text(version)} ({nvcc}) and cuBLASLt "
                               f"{lt['major'] or ''} ({lt['lib']})".replace("cuBLASLt  (", "cuBLASLt ("), nvcc, tk, lt)


def c_string(text: str) -> str:
    """`text` as a C string literal (for a -D macro value: no shell is involved)."""
    text = " ".join(text.split())
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cuda_extension_args(root, build_dir=None) -> dict:
    """Compiles the CUDA backend when it can be built and returns the setuptools.Extension
    attributes to add: always define_macros with ARMORM_CUDA_BUILD_REASON (why the backend is
    or is not in this build); when it is built also extra_objects, libraries, library_dirs,
    runtime_library_dirs and ARMORM_WITH_CUDA.

    Raises CudaBuildError when nvcc is present but a source does not compile, and with
    ARMORM_REQUIRE_CUDA=1 whenever the backend cannot be built (unless ARMORM_NO_CUDA=1).
    """
    plan = plan_cuda_build()
    reason = [("ARMORM_CUDA_BUILD_REASON", c_string(plan.reason))]
    if not plan.build:
        if _env_flag("ARMORM_REQUIRE_CUDA") and not _env_flag("ARMORM_NO_CUDA"):
            raise CudaBuildError(f"ARMORM_REQUIRE_CUDA=1 but the CUDA backend cannot be built: {plan.reason}")
        if plan.nvcc:  # nvcc is here, so a CUDA build was presumably wanted: say why there is none
            print(f"warning: {plan.reason}; building armorm CPU-only", file=sys.stderr)
        return {"define_macros": reason}
    root = Path(root).resolve()
    tk, lt = plan.toolkit, plan.cublas
    build = Path(build_dir) if build_dir else root / "build" / "cuda"
    objs = compile_cuda_objects(root, build, nvcc=plan.nvcc, include_dirs=tk["include"] + [lt["include"]])
    lib_dirs = list(dict.fromkeys(tk["lib"] + [lt["lib"]]))
    return {
        "extra_objects": objs,
        # the static runtime: importing armorm then needs no libcudart.so, and without a
        # driver cudaGetDeviceCount just reports an error (no device)
        "libraries": ["cudart_static", lt["name"], "stdc++", "rt", "pthread", "dl"],
        "library_dirs": lib_dirs,
        # libcublasLt is found at import without LD_LIBRARY_PATH (wheels put it in site-packages)
        "runtime_library_dirs": [lt["lib"]],
        "define_macros": [("ARMORM_WITH_CUDA", "1")] + reason,
    }


# ---- toolkit and driver ----------------------------------------------------------------------
#
# A CUDA major version runs on drivers from its first release on (minor version
# compatibility): the build carries sm_90 machine code, so on an sm_90 GPU (H100,
# H200) any 12.x toolkit runs on a driver >= 525.60.13 and any 13.x on >= 580.65.06.
# On other GPUs the driver compiles the build's compute_90 PTX, which needs a driver
# at least as new as the toolkit (DRIVER_CUDA: the newest CUDA each driver release supports).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
DRIVER_CUDA = [((580, 65, 6), (13, 0)), ((575, 51, 3), (12, 9)), ((570, 26), (12, 8)), ((560, 28, 3), (12, 6)),
               ((555, 42, 2), (12, 5)), ((550, 54, 14), (12, 4)), ((545, 23, 6), (12, 3)), ((535, 54, 3), (12, 2)),
               ((530, 30, 2), (12, 1)), ((525, 60, 13), (12, 0)), ((520, 61, 5), (11, 8)), ((450, 80, 2), (11, 0))]


def parse_version(text: str) -> Tuple[int, ...]:
    """'535.104.05' -> (535, 104, 5); ValueError when it is not dotted numbers."""
    parts = text.strip().split(".")
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts)


def driver_cuda(driver: str) -> Optional[Tuple[int, int]]:
    """The newest CUDA release the driver supports in full (None: older than CUDA 11)."""
    d = parse_version(driver)
    for floor, cuda in DRIVER_CUDA:
        if d >= floor:
            return cuda
    return None


def toolkit_runs(driver: str, toolkit: Tuple[int, int], gpu_cc: Optional[Tuple[int, int]] = (9, 0)) -> Optional[str]:
    """None when code built by `toolkit` runs with `driver` on a GPU of compute capability
    gpu_cc, else the reason it does not."""
    d = parse_version(driver)
    floor = MIN_DRIVER.get(toolkit[0])
    if floor is None:
        return f"CUDA {toolkit[0]}.x is not a supported toolkit"
    if d < parse_version(floor):
        return f"CUDA {toolkit[0]}.x needs driver >= {floor}"
    if gpu_cc is not None and tuple(gpu_cc) != (9, 0):
        newest = driver_cuda(driver)
        if newest is None or newest < tuple(toolkit):
            return (f"on compute capability {gpu_cc[0]}.{gpu_cc[1]} the driver compiles the compute_90 PTX, "
                    f"which needs a driver for CUDA >= {toolkit[0]}.{toolkit[1]}")
    return None


def find_toolkits(extra: Sequence[str] = ()) -> List[Tuple[str, Tuple[int, int]]]:
    """(nvcc, version) of every toolkit on this machine: `extra`, CUDA_HOME / CUDA_PATH, PATH,
    /usr/local/cuda*, /opt/cuda*, pip-installed toolkits; one entry per real nvcc."""
    paths = list(extra)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            paths.append(os.path.join(os.environ[var], "bin", "nvcc"))
    if shutil.which("nvcc"):
        paths.append(shutil.which("nvcc"))
    paths += sorted(glob.glob("/usr/local/cuda*/bin/nvcc")) + sorted(glob.glob("/opt/cuda*/bin/nvcc"))
    for d in _site_dirs():
        paths += sorted(str(p) for p in d.glob("nvidia/*/bin/nvcc"))
    out, seen = [], set()
    for p in paths:
        if not os.access(p, os.X_OK) or os.path.realpath(p) in seen:
            continue
        seen.add(os.path.realpath(p))
        v = nvcc_version(p)
        root = toolkit_dirs(p)["root"][0] if v else None  # wrapper scripts and symlinks name their toolkit
        if v is None or root in seen:
            continue
        seen.add(root)
        out.append((p, v))
    return out


def choose_toolkit(driver: Optional[str], gpu_cc: Optional[Tuple[int, int]],
                   toolkits: Sequence[Tuple[str, Tuple[int, int]]]) -> Tuple[Optional[Tuple[str, Tuple[int, int]]], List[str]]:
    """The newest toolkit the driver runs (None if none), and one line per toolkit saying why (not)."""
    notes, usable = [], []
    for nvcc, v in toolkits:
        why = toolkit_runs(driver, v, gpu_cc) if driver else None
        notes.append(f"{nvcc} (CUDA {v[0]}.{v[1]}): {why or 'usable'}")
        if why is None:
            usable.append((nvcc, v))
    usable.sort(key=lambda t: t[1], reverse=True)
    return (usable[0] if usable else None), notes


def _query_gpu() -> Tuple[Optional[str], Optional[str], Optional[Tuple[int, int]]]:
    """(driver version, GPU name, compute capability) of GPU 0 from nvidia-smi; Nones without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None, None, None
    res = subprocess.run([smi, "--query-gpu=driver_version,name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or not res.stdout.strip():
        res = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or not res.stdout.strip():
        return None, None, None
    fields = [f.strip() for f in res.stdout.strip().splitlines()[0].split(",")]
    cc = None
    if len(fields) > 2:
        try:
            cc = tuple(parse_version(fields[2]))[:2]
        except ValueError:
            cc = None
    return fields[0], (fields[1] if len(fields) > 1 else None), cc


def preflight(argv: Sequence[str]) -> int:
    """Prints the driver, the GPU, the toolkits and the choice; writes the exports to --env-file.
    Exit 0 with a usable toolkit, 3 without."""
    import argparse
    ap = argparse.ArgumentParser(prog="cuda_build.py preflight")
    ap.add_argument("--env-file", help="write `export CUDA_HOME=...` (and what to pip install) here")
    ap.add_argument("--driver", help="driver version (default: nvidia-smi's)")
    ap.add_argument("--gpu", help="GPU name (default: nvidia-smi's)")
    ap.add_argument("--cc", help="compute capability, e.g. 9.0 (default: nvidia-smi's)")
    ap.add_argument("--toolkit", action="append", default=[], help="an nvcc to consider (with those found)")
    ap.add_argument("--only", action="store_true", help="consider only the --toolkit ones")
    a = ap.parse_args(argv)
    driver, gpu, cc = _query_gpu() if not (a.driver or a.gpu or a.cc) else (None, None, None)
    driver, gpu = a.driver or driver, a.gpu or gpu
    if a.cc:
        cc = tuple(parse_version(a.cc))[:2]
    newest = driver_cuda(driver) if driver else None
    print(f"driver:   {driver or 'none found (nvidia-smi)'}"
          + (f" (supports CUDA <= {newest[0]}.{newest[1]})" if newest else ""))
    print(f"gpu:      {gpu or 'none found'}" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else ""))
    toolkits = [(p, v) for p, v in ((p, nvcc_version(p)) for p in a.toolkit) if v] if a.only else find_toolkits(a.toolkit)
    chosen, notes = choose_toolkit(driver, cc, toolkits)
    for n in notes or ["none found"]:
        print(f"toolkit:  {n}")
    exports = []
    if chosen is None:
        print("build:    no toolkit here runs with this driver: install a CUDA toolkit the driver supports "
              "(CUDA 12.x for drivers 525-579; PyPI has no CUDA 12 nvcc: nvidia-cuda-nvcc-cu12 ships ptxas only) "
              "or upgrade the driver to >= 580 for CUDA 13")
        status = 3
    else:
        nvcc, v = chosen
        tk = toolkit_dirs(nvcc)
        home = tk["root"][0]  # nvcc may be a wrapper outside its toolkit
        exports.append(f"export CUDA_HOME={shlex.quote(home)}")
        exports.append(f"export PATH={shlex.quote(os.path.join(home, 'bin'))}:\"$PATH\"")
        lt = find_cublaslt(tk, v[0])
        lt_text = f"cuBLASLt {lt['major']} ({lt['lib']})" if lt else f"no cuBLASLt {v[0]} yet: pip install {cublas_wheel(v[0])}"
        if lt is None:
            exports.append(f"ARMORM_PIP_CUBLAS={cublas_wheel(v[0])}")
        print(f"build:    {nvcc} (CUDA {v[0]}.{v[1]}), {lt_text}")
        status = 0
    if a.env_file:
        Path(a.env_file).write_text("".join(line + "\n" for line in exports))
    return status


if __name__ == "__main__":
    if sys.argv[1:2] == ["nvcc"]:
        found = find_nvcc()
        print(found or "")
        sys.exit(0 if found else 1)
    if sys.argv[1:2] == ["preflight"]:
        sys.exit(preflight(sys.argv[2:]))
    import json
    print(json.dumps(cuda_extension_args(Path(__file__).resolve().parent.parent), indent=2))
