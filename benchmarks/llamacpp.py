"""llama.cpp as a prefill competitor for benchmarks/cpu_prefill.py.

llama.cpp comes from PyPI's ``llama-cpp-python`` sdist, which vendors
llama.cpp and compiles it with CMake at install time (GGML_NATIVE, so
``-march=native``: AVX-512 and AVX512_BF16 on a CPU that has them)::

    python benchmarks/llamacpp.py build     # nice pip install from source, ~30-60 min on 2 cores
    python benchmarks/llamacpp.py info      # version, system info string, converter location

This module does three things for the benchmark:

1. ``convert(checkpoint, dtype, cache)``: turns a generated Hugging Face Llama
   checkpoint into a GGUF file with llama.cpp's own converter
   (``convert_hf_to_gguf.py``, with its ``conversion/`` and ``gguf-py/``,
   taken from the same llama-cpp-python sdist as the installed library:
   downloaded once with ``pip download --no-binary :all:`` and cached, or read
   from ``$LLAMACPP_SRC`` if that names a llama.cpp source tree). The
   converter reads the tokenizer from the checkpoint directory, so the
   checkpoint's files are symlinked into a staging directory next to it
   together with the real Llama-3 tokenizer (built by
   ``tests/llama3_tokenizer.py`` from Meta's tiktoken file; the converter
   recognises it as the ``llama-bpe`` pre-tokenizer). The checkpoint directory
   itself is left untouched, so armorm and transformers load exactly what they
   loaded before. The GGUF (``--outtype bf16`` for a bf16 checkpoint, ``f32``
   for fp32: no conversion loss) is cached next to the checkpoint.
2. ``LlamaCppPrefill``: loads a GGUF through llama-cpp-python's low-level C API
   (the public ``llama_*`` bindings) with ``n_batch = n_ubatch = n_ctx =``
   the sequence length, so one sequence is one ``llama_decode`` call, and
   runs pure prompt processing: the KV cache is cleared, the token ids are
   decoded at positions 0..L-1 with only the last token's logits requested
   (so the LM head runs for one row), and nothing is sampled or generated.
   Everything else is llama.cpp's default (flash attention auto, which is on
   for the CPU; KV cache in f16, so an f32 model's attention is not exact f32).
   llama.cpp's own perf counters (prompt-eval time and token count) are kept
   so the caller can check that the work it timed really happened.
3. ``available()``: whether llama-cpp-python imports, and why not.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Version the build command installs (the figures in the README were taken with it).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BUILD_CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"  # native ISA; skip the multimodal library
GGUF_OUTTYPE = {"bfloat16": "bf16", "float32": "f32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def available() -> tuple[Optional[Any], str]:
    """Import llama_cpp; return (module, "") or (None, why it is not usable)."""
    try:
        import llama_cpp
        import llama_cpp._logger as lc_logger
    except Exception as exc:  # not installed, or its shared library fails to load
        return None, (f"llama-cpp-python is not importable ({type(exc).__name__}: {exc}); "
                      f"build it with: python benchmarks/llamacpp.py build")
    lc_logger.set_verbose(False)  # llama.cpp's load log to stderr only for errors
    return llama_cpp, ""


def build_command() -> list[str]:
    """The pip command that compiles and installs llama-cpp-python from its PyPI sdist."""
    return [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "-v",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]


def build() -> int:
    """Compile llama-cpp-python (and llama.cpp in it) for this CPU; returns pip's exit code."""
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", BUILD_CMAKE_ARGS),
               CMAKE_BUILD_PARALLEL_LEVEL=str(len(os.sched_getaffinity(0))))
    cmd = ["nice", *build_command()]
    print(f"CMAKE_ARGS={env['CMAKE_ARGS']!r} $ {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def system_info(llama_cpp: Any) -> str:
    """llama.cpp's own description of the CPU features it was compiled with."""
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


# --------------------------------------------------------------------------- conversion

def _is_converter_tree(d: Path) -> bool:
    return (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py" / "gguf").is_dir()


def converter_dir(cache: Path, version: str) -> Path:
    """A llama.cpp source tree holding convert_hf_to_gguf.py for llama-cpp-python `version`.

    ``$LLAMACPP_SRC`` (a llama.cpp tree, or an unpacked llama-cpp-python sdist)
    wins; otherwise the sdist is downloaded once and the converter's files are
    extracted under `cache`.
    """
    env = os.environ.get("LLAMACPP_SRC")
    if env:
        for d in (Path(env), Path(env) / "vendor" / "llama.cpp"):
            if _is_converter_tree(d):
                return d
        raise FileNotFoundError(f"LLAMACPP_SRC={env} holds no convert_hf_to_gguf.py and gguf-py/")
    out = cache / f"llama-cpp-python-{version}-converter"
    if _is_converter_tree(out) and (out / ".complete").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", tmp,
               f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"could not download the llama-cpp-python sdist:\n$ {' '.join(cmd)}\n"
                               f"{proc.stdout}\n{proc.stderr}")
        stage = Path(tmp) / "tree"
        with tarfile.open(sdists[0]) as tf:
            members = []
            for m in tf.getmembers():
                parts = Path(m.name).parts  # llama_cpp_python-X/vendor/llama.cpp/<rel>
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                    continue
                rel = Path(*parts[3:])
                if (rel.parts == ("convert_hf_to_gguf.py",) or
                        rel.parts[0] in ("conversion", "gguf-py")):
                    if not (m.isfile() or m.isdir()):
                        continue
                    m.name = str(rel)
                    members.append(m)
            tf.extractall(stage, members=members, filter="data")
        if not _is_converter_tree(stage):
            raise RuntimeError(f"{sdists[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py with gguf-py/")
        (stage / ".complete").write_text(f"{sdists[0].name}\n")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    return out


def _llama3_tokenizer_dir() -> Path:
    """The Llama-3 tokenizer files, built (once, cached like the tests do) by tests/llama3_tokenizer.py."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from llama3_tokenizer import llama3_tokenizer_dir
    finally:
        sys.path.remove(str(REPO / "tests"))
    root = Path(os.environ.get("ARMORM_TEST_CACHE", Path.home() / ".cache" / "armorm-tests"))
    return Path(llama3_tokenizer_dir(root))


def _gguf_field(conv: Path, gguf: Path, key: str) -> str:
    """A metadata value of `gguf`, read with the converter's own gguf-py (in a child process)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gguf; "
            "print(gguf.GGUFReader(sys.argv[2]).fields[sys.argv[3]].contents())")
    proc = subprocess.run([sys.executable, "-c", code, str(conv / "gguf-py"), str(gguf), key],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not read {key} from {gguf}:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def convert(checkpoint: Path, dtype: str, cache: Path, version: str) -> Path:
    """GGUF of `checkpoint` (a generated Llama checkpoint with the Llama-3 vocabulary size).

    Cached as ``<checkpoint>.<version>.<outtype>.gguf``; rebuilt when the
    checkpoint's config or weights are newer.
    """
    if dtype not in GGUF_OUTTYPE:
        raise ValueError(f"no GGUF type for dtype {dtype!r}; known: {', '.join(GGUF_OUTTYPE)}")
    outtype = GGUF_OUTTYPE[dtype]
    gguf = checkpoint.with_name(f"{checkpoint.name}.llama-cpp-python-{version}.{outtype}.gguf")
    sources = [p for p in checkpoint.iterdir() if p.is_file()]
    if gguf.is_file() and gguf.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return gguf
    tok = _llama3_tokenizer_dir()
    conv = converter_dir(cache, version)
    stage = checkpoint.with_name(f"{checkpoint.name}.gguf-src")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    for p in sources:
        if p.name not in TOKENIZER_FILES:
            (stage / p.name).symlink_to(p.resolve())
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok / name, stage / name)
    tmp = gguf.with_name(gguf.name + ".tmp")
    cmd = ["nice", sys.executable, str(conv / "convert_hf_to_gguf.py"), str(stage), "--outtype", outtype,
           "--outfile", str(tmp), "--model-name", f"armorm-bench {checkpoint.parent.name} {dtype}"]
    print(f"converting {checkpoint.name} to GGUF: $ {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
    pre = _gguf_field(conv, tmp, "tokenizer.ggml.pre")
    if pre != "llama-bpe":
        tmp.unlink()
        raise RuntimeError(f"the converter wrote pre-tokenizer {pre!r}, not Llama-3's 'llama-bpe'")
    tmp.rename(gguf)
    shutil.rmtree(stage)
    print(f"converted in {time.perf_counter() - t:.0f} s: {gguf}", flush=True)
    return gguf


# --------------------------------------------------------------------------- prefill

class LlamaCppPrefill:
    """A llama.cpp model and context sized for one sequence of up to `max_len` tokens per decode."""

    def __init__(self, llama_cpp: Any, gguf: Path, max_len: int, threads: int,
                 flash_attn: str = "auto") -> None:
        fa = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        if flash_attn not in fa:
            raise ValueError(f"flash_attn must be one of {', '.join(fa)}, not {flash_attn!r}")
        if max_len < 1 or threads < 1:
            raise ValueError("max_len and threads must be >= 1")
        self.lc = llama_cpp
        self.max_len = max_len
        self.model = self.ctx = self.batch = None
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max_len
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.embeddings = False
        cp.no_perf = False
        cp.flash_attn_type = fa[flash_attn]
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context for {gguf}")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        if self.n_ctx < max_len:
            self.close()
            raise RuntimeError(f"llama.cpp gave a context of {self.n_ctx} tokens, fewer than {max_len}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.desc = self._desc()
        self.batch = llama_cpp.llama_batch_init(max_len, 0, 1)
        self.mem = llama_cpp.llama_get_memory(self.ctx)

    def _desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lc.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode(errors="replace")

    def prefill(self, ids: np.ndarray) -> Any:
        """Prompt processing of `ids` from an empty KV cache; returns llama.cpp's last-token logits pointer.

        The pointer stays valid until the next call; `last_logits()` copies it.
        """
        lc, b = self.lc, self.batch
        n = int(ids.size)
        if not 1 <= n <= self.max_len:
            raise ValueError(f"sequence of {n} tokens; this context takes 1..{self.max_len}")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token ids must lie in 0..{self.n_vocab - 1}")
        lc.llama_memory_clear(self.mem, True)
        b.n_tokens = n
        for i, t in enumerate(ids.tolist()):
            b.token[i] = t
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1  # only the last position's output: pure prefill plus one LM-head row
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = lc.llama_get_logits_ith(self.ctx, -1)  # also waits for the computation to finish
        if not ptr:
            raise RuntimeError("llama.cpp returned no logits")
        return ptr

    def last_logits(self, ids: np.ndarray) -> np.ndarray:
        """Last-token logits of `ids` (a copy, float32 [n_vocab])."""
        ptr = self.prefill(ids)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def perf_reset(self) -> None:
        self.lc.llama_perf_context_reset(self.ctx)

    def perf(self) -> tuple[float, int]:
        """(prompt-eval seconds, prompt-eval tokens) counted by llama.cpp since the last reset."""
        d = self.lc.llama_perf_context(self.ctx)
        return d.t_p_eval_ms / 1e3, int(d.n_p_eval)

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.lc.llama_free(self.ctx)
        self.ctx = None
        if self.model:
            self.lc.llama_model_free(self.model)
        self.model = None


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "info"
    if cmd == "build":
        return build()
    if cmd == "info":
        lc, why = available()
        if lc is None:
            print(why)
            return 1
        print(f"llama-cpp-python {lc.__version__}")
        print(system_info(lc))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
