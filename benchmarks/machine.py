"""What a benchmark table says about the machine it was measured on: the CPU (lscpu) and its vector ISA.

Speed figures mean little without it: this project's machines change between
CPU generations (AVX2 only, AVX-512, AVX-512 with AVX512_BF16) and are shared.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def cpu_isa() -> str:
    """The widest matrix-product instruction set the CPU has, as armorm's kernel paths see it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown ISA"
    return "AVX-512 + AVX512_BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"


def describe() -> str:
    """One line: CPU, logical CPUs, ISA, load average now."""
    la = os.getloadavg()
    return (f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {cpu_isa()}; "
            f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
