"""Build logic for the CUDA backend: finds nvcc and cuBLASLt, compiles csrc/cuda/*.cu.

Used by setup.py at build time only; the armorm package never imports it at
run time. It imports nothing from armorm, so setup.py can load it by path
before the extension exists:

    spec = importlib.util.spec_from_file_location("armorm_cuda_build", "armorm/cuda_build.py")

Environment:
  ARMORM_NO_CUDA=1        build CPU-only even when nvcc is present
  CUDA_HOME / CUDA_PATH   toolkit to use (else nvcc on PATH, else /usr/local/cuda)
  ARMORM_CUBLAS_HOME      directory with include/cublasLt.h and lib/libcublasLt.so*
  ARMORM_NVCC_FLAGS       extra nvcc flags (space separated)
  ARMORM_REQUIRE_CUDA=1   fail instead of building CPU-only when nvcc or cuBLASLt is missing (CI)

With nvcc found, any compile error raises CudaBuildError: a CUDA build that
silently fell back to CPU-only would hide broken kernels from CI. nvcc
without cuBLASLt builds CPU-only with a warning, unless ARMORM_REQUIRE_CUDA=1.
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
from typing import Dict, List, Optional

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


def find_cublaslt(tk: Dict[str, List[str]]) -> Optional[Dict[str, str]]:
    """{include, lib, name} of cuBLASLt: the toolkit's, or the nvidia-cublas wheel's."""
    cands: List[Path] = []
    if os.environ.get("ARMORM_CUBLAS_HOME"):
        cands.append(Path(os.environ["ARMORM_CUBLAS_HOME"]))
    cands += [Path(p).parent for p in tk["include"]]
    cands += [Path(p) for p in tk["root"]]
    for d in _site_dirs():
        cands += [d / "nvidia" / "cu13", d / "nvidia" / "cublas"]  # CUDA 13 and CUDA 12 wheel layouts
    for c in cands:
        inc = c / "include"
        if not (inc / "cublasLt.h").is_file():
            continue
        for libdir in (c / "lib", c / "lib64"):
            if (libdir / "libcublasLt.so").exists():
                return {"include": str(inc), "lib": str(libdir), "name": "cublasLt"}
            versioned = sorted(libdir.glob("libcublasLt.so.*"), key=lambda p: len(p.name))
            if versioned:  # wheels ship only libcublasLt.so.N: link it by file name
                return {"include": str(inc), "lib": str(libdir), "name": ":" + versioned[0].name}
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


def cuda_extension_args(root, build_dir=None) -> Optional[dict]:
    """Compiles the CUDA backend and returns the Extension arguments that link it in.

    None when CUDA is disabled (ARMORM_NO_CUDA=1) or nvcc is absent: the
    caller builds CPU-only. Raises CudaBuildError when nvcc is present but the
    build cannot be done (cuBLASLt missing, a compile error).

    The result's keys map onto setuptools.Extension attributes:
    extra_objects, libraries, library_dirs, runtime_library_dirs, define_macros.
    """
    if _env_flag("ARMORM_NO_CUDA"):
        return None
    require = _env_flag("ARMORM_REQUIRE_CUDA")
    nvcc = find_nvcc()
    if nvcc is None:
        if require:
            raise CudaBuildError("ARMORM_REQUIRE_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return None
    root = Path(root).resolve()
    tk = toolkit_dirs(nvcc)
    if not tk["lib"]:
        raise CudaBuildError(f"nvcc found ({nvcc}) but no CUDA runtime library (libcudart) next to it; "
                             "set CUDA_HOME, or ARMORM_NO_CUDA=1 for a CPU-only build")
    lt = find_cublaslt(tk)
    if lt is None:
        msg = (f"nvcc found ({nvcc}) but not cuBLASLt (cublasLt.h and libcublasLt.so*): install the CUDA "
               "toolkit's cuBLAS or `pip install nvidia-cublas`, or set ARMORM_CUBLAS_HOME")
        if require:
            raise CudaBuildError(msg)
        print(f"warning: {msg}; building armorm CPU-only", file=sys.stderr)
        return None
    build = Path(build_dir) if build_dir else root / "build" / "cuda"
    objs = compile_cuda_objects(root, build, nvcc=nvcc, include_dirs=tk["include"] + [lt["include"]])
    lib_dirs = list(dict.fromkeys(tk["lib"] + [lt["lib"]]))
    return {
        "extra_objects": objs,
        # the static runtime: importing armorm then needs no libcudart.so, and without a
        # driver cudaGetDeviceCount just reports an error (no device)
        "libraries": ["cudart_static", lt["name"], "stdc++", "rt", "pthread", "dl"],
        "library_dirs": lib_dirs,
        # libcublasLt is found at import without LD_LIBRARY_PATH (wheels put it in site-packages)
        "runtime_library_dirs": [lt["lib"]],
        "define_macros": [("ARMORM_WITH_CUDA", "1")],
    }


if __name__ == "__main__":  # python armorm/cuda_build.py: compile and print what setup.py would get
    import json
    print(json.dumps(cuda_extension_args(Path(__file__).resolve().parent.parent), indent=2))
