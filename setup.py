"""Build armorm._core from csrc/.

Portable by default: no -march=native; the hot loops carry run-time CPU
dispatch (GCC target_clones). Environment switches:
  ARMORM_SANITIZE=address,undefined   build the core with ASan/UBSan
  ARMORM_DEBUG=1                      -O0 -g
"""
import os
import sys

import numpy as np
from setuptools import Extension, setup

SOURCES = ["csrc/module.c", "csrc/model.c", "csrc/safetensors.c", "csrc/forward_cpu.c"]

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
    depends=[os.path.join(d, f) for d in ("csrc", "csrc/cpu") for f in os.listdir(d) if f.endswith(".h")],
)

setup(ext_modules=[ext])
