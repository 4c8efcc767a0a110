"""Build armorm._core from csrc/.

Portable by default: no -march=native; the hot loops carry run-time CPU
dispatch (GCC target_clones). Environment switches:
  ARMORM_SANITIZE=address,undefined   build the core with ASan/UBSan
  ARMORM_DEBUG=1                      -O0 -g
"""
import glob
import importlib.util
import os
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

SOURCES = ["csrc/python/module.c", "csrc/python/safetensors_file.c", "csrc/python/numeric.c", "csrc/model.c", "csrc/weight_pass.c", "csrc/safetensors.c", "csrc/forward_cpu.c",
           "csrc/cpu/cpu_features.c", "csrc/cpu/gemm_driver.c", "csrc/cpu/matmul_avx512.c", "csrc/cpu/matmul_avx2.c",
           "csrc/cpu/attention_avx512.c", "csrc/cpu/gemm_general.c",
           "csrc/cpu/adamw.c"]

compile_args = ["-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-function",
                "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
link_args = ["-fopenmp"]
if os.environ.get("ARMORM_DEBUG"):
    compile_args += ["-O0", "-g"]
else:
    compile_args += ["-O3"]
sanitize = os.environ.get("ARMORM_SANITIZE", "").strip()
if sanitize:
    flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
    compile_args += flags + ["-DARMORM_NO_CLONES"]  # ifunc resolvers run before the ASan runtime is up
    link_args += flags

if sys.platform == "darwin":  # Apple clang has no -fopenmp; build single-threaded there
    compile_args = [a for a in compile_args if a != "-fopenmp"]
    link_args = [a for a in link_args if a != "-fopenmp"]

ext = Extension(
    "armorm._core",
    sources=SOURCES,
    include_dirs=[np.get_include(), "csrc"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    depends=[os.path.join(d, f) for d in ("csrc", "csrc/cpu", "csrc/python") for f in os.listdir(d) if f.endswith(".h")],
)



def _cuda_build():
    # by path: build-time code, outside the armorm package (which needs the extension being built)
    spec = importlib.util.spec_from_file_location("armorm_cuda_build", os.path.join(ROOT, "build_tools", "cuda_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc when it is found and links them in (ARMORM_NO_CUDA=1: CPU-only);
    either way the extension records why (armorm._core.CUDA_BUILD_REASON)."""

    def build_extensions(self):
        args = _cuda_build().cuda_extension_args(ROOT, build_dir=os.path.join(self.build_temp, "cuda"))
        for e in self.extensions:
            for key, value in args.items():
                getattr(e, key).extend(value)
            if "extra_objects" in args:
                e.depends += args["extra_objects"] + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*"))
        super().build_extensions()


setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
