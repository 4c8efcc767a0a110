"""The CUDA backend on machines without a GPU: it compiles, links, and its host side works.

Runs everywhere nvcc is (skips, saying so, where it is not):
  * every csrc/cuda/*.cu compiles with build_tools/cuda_build.py's flags, warnings as errors;
  * the objects plus the core's C files link into a shared object with no undefined symbol;
  * a standalone host program (csrc/cuda/test/host_test.cu) runs the planning functions
    (weight/activation layouts, memory plan, attention tiles, batch packing, launch shapes,
    the out-of-memory message) and the no-GPU paths, and its output is checked here
    against arithmetic done independently in Python;
  * the kernel harnesses in benchmarks/cuda build (`make`);
  * cuda_build's switches: ARMORM_NO_CUDA, no nvcc, compile errors raising.
The build logic that needs no nvcc (the recorded reason, cuBLAS major matching, the
toolkit a driver supports) is tested in tests/test_cuda_toolkit.py.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_cuda_build():
    # by path, as setup.py does: build-time code outside the armorm package
    spec = importlib.util.spec_from_file_location("armorm_cuda_build_under_test", ROOT / "build_tools" / "cuda_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cb = _load_cuda_build()
NVCC = cb.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA backend is not built on this machine")

HAS_GPU_DRIVER = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


@pytest.fixture(scope="module")
def toolchain():
    tk = cb.toolkit_dirs(NVCC)
    version = cb.nvcc_version(NVCC)
    lt = cb.find_cublaslt(tk, version[0] if version else None)
    if lt is None:
        msg = (f"nvcc is installed but a cuBLASLt of its major version is not: `pip install "
               f"{cb.cublas_wheel(version[0] if version else None)}` (or install the toolkit's cuBLAS); without it "
               "the CUDA backend cannot be built or checked")
        if os.environ.get("ARMORM_REQUIRE_CUDA") == "1":  # CI: the CUDA build must be checked
            pytest.fail(msg)
        pytest.skip(msg)
    return tk, lt


@pytest.fixture(scope="module")
def objects(toolchain, tmp_path_factory):
    tk, lt = toolchain
    build = tmp_path_factory.mktemp("cuda_objs")
    # -Werror all-warnings: nvcc's own diagnostics; -Xcompiler -Werror: the host compiler's
    return cb.compile_cuda_objects(ROOT, build, nvcc=NVCC, include_dirs=tk["include"] + [lt["include"]],
                                   extra_flags=["-Werror", "all-warnings", "-Xcompiler", "-Werror"])


@pytest.fixture(scope="module")
def core_c_objects(tmp_path_factory):
    """The core's C files the CUDA backend calls into (batch_validate and what it pulls in: model_load's
    prepacking reaches the CPU GEMM driver and kernels)."""
    out = tmp_path_factory.mktemp("core_objs")
    objs = []
    for src in ("csrc/model.c", "csrc/weight_pass.c", "csrc/safetensors.c", "csrc/cpu/cpu_features.c",
                "csrc/cpu/gemm_driver.c", "csrc/cpu/matmul_avx2.c", "csrc/cpu/matmul_avx512.c"):
        obj = out / (Path(src).stem + ".o")
        subprocess.run(["gcc", "-std=c11", "-O1", "-fPIC", "-I", str(ROOT / "csrc"), "-c", str(ROOT / src),
                        "-o", str(obj)], check=True, capture_output=True, text=True)
        objs.append(str(obj))
    return objs


def _link_libs(toolchain):
    tk, lt = toolchain
    flags = [f"-L{d}" for d in tk["lib"] + [lt["lib"]]]
    flags += ["-lcudart_static", f"-l{lt['name']}", "-lstdc++", "-lrt", "-lpthread", "-ldl", "-lm",
              f"-Wl,-rpath,{lt['lib']}"]
    return flags


@pytest.fixture(scope="module")
def host_test(objects, core_c_objects, toolchain, tmp_path_factory):
    tk, lt = toolchain
    out = tmp_path_factory.mktemp("host_test")
    obj = out / "host_test.o"
    exe = out / "host_test"
    subprocess.run([NVCC, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", f"-I{lt['include']}", "-c",
                    str(ROOT / "csrc" / "cuda" / "test" / "host_test.cu"), "-o", str(obj)],
                   check=True, capture_output=True, text=True)
    res = subprocess.run([NVCC, "-o", str(exe), str(obj)] + objects + core_c_objects +
                         [f"-L{d}" for d in tk["lib"] + [lt["lib"]]] +
                         [f"-l{lt['name']}", "-Xlinker", f"-rpath={lt['lib']}", "-lm"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return exe


def run_host(exe, *args) -> dict:
    res = subprocess.run([str(exe)] + [str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"host_test {args} exited {res.returncode}: {res.stdout}{res.stderr}"
    out = {}
    for line in res.stdout.splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


# ---- compile and link ----------------------------------------------------------------------


def test_every_cuda_source_compiles_without_warnings(objects):
    names = sorted(Path(o).stem for o in objects)
    assert names == sorted(p.stem for p in cb.cuda_sources(ROOT))
    assert {"forward_cuda", "model_cuda", "device", "gemm", "plan"} <= set(names)
    for o in objects:
        assert Path(o).stat().st_size > 0


def test_objects_carry_sm90_code_and_ptx(objects):
    backend = next(o for o in objects if Path(o).stem == "forward_cuda")  # the kernels live here
    cuobjdump = Path(cb.toolkit_dirs(NVCC)["root"][0]) / "bin" / "cuobjdump"
    if cuobjdump.exists():
        res = subprocess.run([str(cuobjdump), "--list-elf", "--list-ptx", backend], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "sm_90" in res.stdout and ("ptx" in res.stdout or "compute_90" in res.stdout), res.stdout
        return
    # no cuobjdump (pip-installed toolkits): the fat binary holds the PTX as text and the
    # sm_90 machine code's build options
    data = Path(backend).read_bytes()
    assert b".nv_fatbin" in data
    assert b".target sm_90" in data, "no compute_90 PTX in the object"
    assert b"-arch sm_90" in data, "no sm_90 machine code in the object"


def test_links_with_no_undefined_symbols(objects, core_c_objects, toolchain, tmp_path):
    so = tmp_path / "libarmorm_cuda_check.so"
    res = subprocess.run(["gcc", "-shared", "-o", str(so)] + objects + core_c_objects + _link_libs(toolchain) +
                         ["-Wl,--no-undefined"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    exported = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
    for sym in ("cuda_model_create", "cuda_forward", "cuda_model_free", "cuda_device_count", "cuda_plan_memory",
                "cuda_attn_plan", "cuda_batch_pack"):
        assert f" T {sym}\n" in exported, f"{sym} is not exported with C linkage"


def test_extension_args_link_the_backend(toolchain, tmp_path, monkeypatch):
    monkeypatch.delenv("ARMORM_NO_CUDA", raising=False)
    args = cb.cuda_extension_args(ROOT, build_dir=tmp_path / "objs")
    assert set(args) == {"extra_objects", "libraries", "library_dirs", "runtime_library_dirs", "define_macros"}
    assert ("ARMORM_WITH_CUDA", "1") in args["define_macros"]
    reason = dict(args["define_macros"])["ARMORM_CUDA_BUILD_REASON"]
    assert reason.startswith('"built with nvcc ') and "cuBLASLt" in reason
    assert any("cublasLt" in lib for lib in args["libraries"])
    assert sorted(Path(o).name for o in args["extra_objects"]) == sorted(p.stem + ".o" for p in cb.cuda_sources(ROOT))


# ---- cuda_build's switches ------------------------------------------------------------------


def test_no_cuda_env_disables(monkeypatch):
    monkeypatch.setenv("ARMORM_NO_CUDA", "1")
    args = cb.cuda_extension_args(ROOT)
    assert set(args) == {"define_macros"}
    assert "ARMORM_NO_CUDA=1" in dict(args["define_macros"])["ARMORM_CUDA_BUILD_REASON"]


def test_without_nvcc_builds_cpu_only(monkeypatch):
    monkeypatch.delenv("ARMORM_NO_CUDA", raising=False)
    monkeypatch.delenv("ARMORM_REQUIRE_CUDA", raising=False)
    monkeypatch.setattr(cb, "find_nvcc", lambda: None)
    args = cb.cuda_extension_args(ROOT)
    assert set(args) == {"define_macros"}
    assert "nvcc was not found" in dict(args["define_macros"])["ARMORM_CUDA_BUILD_REASON"]
    monkeypatch.setenv("ARMORM_REQUIRE_CUDA", "1")
    with pytest.raises(cb.CudaBuildError, match="nvcc was not found"):
        cb.cuda_extension_args(ROOT)


def test_compile_error_raises(tmp_path, toolchain):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "broken.cu").write_text("__global__ void k(float *x) { x[0] = undefined_name; }\n")
    with pytest.raises(cb.CudaBuildError, match=r"broken\.cu[\s\S]*undefined_name"):
        cb.compile_cuda_objects(tmp_path, tmp_path / "objs", nvcc=NVCC)


def test_build_code_is_not_in_the_runtime_package():
    assert not (ROOT / "armorm" / "cuda_build.py").exists()
    code = "import sys, armorm; print(sorted(m for m in sys.modules if 'cuda_build' in m))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        pytest.skip(f"armorm does not import here: {res.stderr.strip().splitlines()[-1:]}")
    assert res.stdout.strip() == "[]"


def test_kernel_harnesses_build(tmp_path):
    res = subprocess.run(["make", "-C", str(ROOT / "benchmarks" / "cuda"), f"BUILD={tmp_path}", f"NVCC={NVCC}",
                          f"-j{min(4, os.cpu_count() or 1)}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for t in ("attention", "rmsnorm", "rope", "glu", "head"):
        assert (tmp_path / t).exists()


# ---- host-side planning ---------------------------------------------------------------------

ALIGN = 256


def _up(x, a=ALIGN):
    return (x + a - 1) // a * a


def _expected_layout(H, I, L, NH, NKV, HD, V, arch, K, D, NHID, NL, attb, mlpb, qkvb=0, qknorm=0, postnorms=0):
    """CudaWeightLayout recomputed from the documented order: embed, final_norm, inv_freq, layers, heads."""
    QD, KD = NH * HD, NKV * HD
    cur = 0
    out = {}

    def carve(name, nbytes):
        nonlocal cur
        off = _up(cur)
        cur = off + nbytes
        out[name] = off

    carve("embed", V * H * 2)
    carve("final_norm", H * 4)
    carve("inv_freq", HD // 2 * 4)
    lay = {}
    lc = 0
    for name, nbytes in [("wqkv", (QD + 2 * KD) * H * 2), ("wo", H * QD * 2), ("wgu", 2 * I * H * 2),
                         ("wdown", H * I * 2), ("attn_norm", H * 4), ("mlp_norm", H * 4)] + \
            ([("bqkv", (QD + 2 * KD) * 4)] if attb or qkvb else []) + ([("bo", H * 4)] if attb else []) + \
            ([("bgu", 2 * I * 4), ("bdown", H * 4)] if mlpb else []) + \
            ([("q_norm", HD * 4), ("k_norm", HD * 4)] if qknorm else []) + \
            ([("attn_post_norm", H * 4), ("mlp_post_norm", H * 4)] if postnorms else []):
        off = _up(lc)
        lc = off + nbytes
        lay[name] = off
    stride = _up(lc)
    carve("layers", stride * L)
    if arch == 1:
        carve("regression", K * H * 4)
        carve("transform", K * K * 4)
        for j in range(NHID + 1):
            i_dim, o_dim = (H if j == 0 else D), (K if j == NHID else D)
            carve(f"gate_w{j}", o_dim * i_dim * 4)
            carve(f"gate_b{j}", o_dim * 4)
    elif arch == 2:
        carve("score", NL * H * 4)
    return out, lay, stride, _up(cur)


CONFIGS = {
    # H, I, L, NH, NKV, HD, V, arch, K, D, NHID, NL, attention_bias, mlp_bias
    "armorm_8b": (4096, 14336, 32, 32, 8, 128, 128257, 1, 19, 1024, 3, 0, 0, 0),
    "tiny_biases": (48, 96, 2, 4, 1, 24, 300, 1, 19, 48, 3, 0, 1, 1),
    "seqcls": (64, 96, 3, 4, 2, 16, 300, 2, 0, 0, 0, 3, 0, 0),
}
# family switches after MAXTOK: QKVB QKNORM POSTNORMS (Qwen2: q/k/v biases, Qwen3: q/k norms, Gemma-2: post-norms)
FAMILY_SWITCHES = {"armorm_8b": (0, 0, 0), "tiny_biases": (0, 0, 0), "seqcls": (0, 0, 0),
                   "qwen2_seqcls": (1, 0, 0), "qwen3_armorm": (0, 1, 0), "gemma2_armorm": (0, 0, 1)}
CONFIGS.update({
    "qwen2_seqcls": (64, 96, 2, 4, 2, 16, 300, 2, 0, 0, 0, 1, 0, 0),
    "qwen3_armorm": (1024, 3072, 2, 16, 8, 128, 1000, 1, 19, 64, 3, 0, 0, 0),
    "gemma2_armorm": (2304, 9216, 2, 8, 4, 256, 1000, 1, 19, 64, 3, 0, 0, 0),
})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_and_activation_layout(host_test, name):
    cfg = CONFIGS[name]
    H, I, L, NH, NKV, HD, V, arch, K, D, NHID, NL, attb, mlpb = cfg
    qkvb, qknorm, postnorms = FAMILY_SWITCHES[name]
    maxtok = 8192
    got = {k: int(v) for k, v in run_host(host_test, "plan", *cfg, maxtok, qkvb, qknorm, postnorms).items()}
    assert "error" not in got
    glob_, lay, stride, total = _expected_layout(*cfg, qkvb, qknorm, postnorms)
    assert got["weights"] == total == got["plan_weights"]
    assert got["layer_stride"] == stride
    for k, v in glob_.items():
        assert got[k] == v, k
    for k in ("wqkv", "wo", "wgu", "wdown", "attn_norm", "mlp_norm", "bqkv", "bo", "bgu", "bdown", "q_norm",
              "k_norm", "attn_post_norm", "mlp_post_norm"):
        assert got[k] == lay.get(k, -1), k
    if arch != 1:
        assert got["regression"] == got["transform"] == -1
    if arch != 2:
        assert got["score"] == -1
    # activations: x f32, xn bf16, qkv, att, then the MLP chunk buffers
    T, QKV, QD = maxtok, (NH + 2 * NKV) * HD, NH * HD
    chunk = min(T, 8192)
    offs = []
    cur = 0
    for nbytes in (T * H * 4, T * H * 2, T * QKV * 2, T * QD * 2, chunk * 2 * I * 2, chunk * I * 2):
        offs.append(_up(cur))
        cur = offs[-1] + nbytes
    assert [got[k] for k in ("act_x", "act_xn", "act_qkv", "act_att", "act_gu", "act_h")] == offs
    if postnorms:  # (T, H) f32 for a projection's output before its post-norm
        offs.append(_up(cur))
        cur = offs[-1] + T * H * 4
    assert got["act_y"] == (offs[-1] if postnorms else -1)
    assert got["act_total"] == got["plan_act"] == _up(cur)
    assert got["mlp_chunk"] == chunk
    assert got["plan_ws"] == (32 << 20) + 2 * (32 << 20)
    assert got["plan_total"] == sum(got[k] for k in ("plan_weights", "plan_act", "plan_batch", "plan_ws",
                                                      "plan_reserve"))


def test_8b_weights_are_bf16_backbone_plus_f32_head(host_test):
    got = {k: int(v) for k, v in run_host(host_test, "plan", *CONFIGS["armorm_8b"], 8192).items()}
    backbone = 128257 * 4096 + 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    head = 19 * 4096 + 19 * 19 + 1024 * 4096 + 2 * 1024 * 1024 + 19 * 1024 + 3 * 1024 + 19
    norms = 65 * 4096 + 64  # two norms per layer, the final norm, inv_freq
    exact = backbone * 2 + (head + norms) * 4
    assert exact <= got["weights"] < exact + 400 * 256  # only alignment padding on top
    assert 14.9e9 < got["weights"] < 15.1e9


def test_tiles_heaviest_first(host_test):
    got = run_host(host_test, "tiles", 64, 10, 130, 64, 1)
    assert got["count"] == got["planned"] == "6"
    tiles = [tuple(map(int, t.split(":"))) for t in got["tiles"].split(",")]
    # sequence 1 (130 tokens) has tiles at 0, 64, 128; the others one tile at 0
    assert tiles == [(1, 128), (1, 64), (0, 0), (1, 0), (2, 0), (3, 0)]
    assert got["short_cap"] == "-1"


def test_tiles_cover_every_query_once(host_test):
    lens = [1, 63, 64, 65, 127, 128, 129, 1000]
    got = run_host(host_test, "tiles", 64, *lens)
    tiles = [tuple(map(int, t.split(":"))) for t in got["tiles"].split(",")]
    covered = {}
    for s, q0 in tiles:
        assert q0 % 64 == 0 and 0 <= q0 < lens[s]
        for q in range(q0, min(q0 + 64, lens[s])):
            covered[(s, q)] = covered.get((s, q), 0) + 1
    assert covered == {(s, q): 1 for s, n in enumerate(lens) for q in range(n)}
    q0s = [q0 for _, q0 in tiles]
    assert q0s == sorted(q0s, reverse=True)


def test_batch_pack(host_test):
    got = run_host(host_test, "pack", 3, 5)
    assert got["rc"] == "0"
    T, B = 8, 2
    n = {k: int(v) for k, v in got.items() if k not in ("buf",)}
    assert (n["off_tokens"], n["off_pos"], n["off_cu"], n["off_rows"], n["off_tiles"]) == (0, T, 2 * T,
                                                                                       2 * T + B + 1,
                                                                                       2 * T + B + 1 + 2 * B)
    assert n["ntiles"] == 2 and n["off_seg"] == n["off_tiles"] + 2 * n["ntiles"]
    assert n["n_ints"] == n["off_seg"] + 2 * B
    buf = list(map(int, got["buf"].split(",")))
    assert buf[0:8] == list(range(1000, 1008))                  # token ids
    assert buf[8:16] == [0, 1, 2, 0, 1, 2, 3, 4]                # positions restart per sequence
    assert buf[16:19] == [0, 3, 8]                              # cu_seqlens
    assert buf[19:21] == [2, 7]                                 # reward rows: last token of each
    assert buf[21:23] == [0 + 1, 3 + 2]                         # gating rows: start + len // 2
    assert buf[23:27] == [0, 0, 1, 0]                           # tiles (seq, q0)
    assert buf[27:31] == [0, 0, -1, -1]                         # offsets, parents: no shared prefix
    # results: 64-float aligned sections, all_hidden present (T x H)
    H, K = 8, 3
    assert n["hidden"] == 0 and n["prompt"] == 64 and n["rewards"] == 128 and n["gating"] == 192
    assert n["score"] == 256 and n["logits"] == 320 and n["all_hidden"] == 320
    assert n["n_floats"] == 320 + _up(T * H, 64)
    assert n["scratch_floats"] == 2 * B * max(5, K)
    assert n["host_bytes"] == _up(n["n_ints"] * 4) + _up(n["n_floats"] * 4)
    assert n["device_bytes"] == n["host_bytes"] + _up(n["scratch_floats"] * 4)


def test_batch_pack_shared_prefixes(host_test):
    """Sequences continuing others (csrc/prefix.h): positions go on from the prefix, head rows read through it."""
    # 0: 4 tokens; 1: 3 more after 0 (full 7); 2: 2 more after 1 (full 9); 3: 1 more after 0 (full 5); 4: plain 2
    got = run_host(host_test, "pack", 4, "3/0", "2/1", "1/0", 2)
    assert got["rc"] == "0"
    n = {k: int(v) for k, v in got.items() if k != "buf"}
    buf = list(map(int, got["buf"].split(",")))
    T, B = 12, 5
    pos = buf[n["off_pos"]:n["off_pos"] + T]
    assert pos == [0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 0, 1]
    cu = buf[n["off_cu"]:n["off_cu"] + B + 1]
    assert cu == [0, 4, 7, 9, 10, 12]
    full = [4, 7, 9, 5, 2]
    # packed row of position j of each full sequence, walked by hand
    own = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4, 5, 6], 2: [0, 1, 2, 3, 4, 5, 6, 7, 8], 3: [0, 1, 2, 3, 9],
           4: [10, 11]}
    rows = buf[n["off_rows"]:n["off_rows"] + 2 * B]
    assert rows[:B] == [own[b][full[b] - 1] for b in range(B)]           # reward: last token of each
    assert rows[B:] == [own[b][full[b] // 2] for b in range(B)]          # gating: half way, maybe in a prefix
    assert rows[B + 2] == 4 and rows[B + 3] == 2                           # ... inside the shared prefixes
    seg = buf[n["off_seg"]:n["off_seg"] + 2 * B]
    assert seg == [0, 4, 7, 4, 0, -1, 0, 1, 0, -1]                        # offsets, then parents
    # tiles count own tokens: one per sequence here
    assert n["ntiles"] == 5


def test_launch_shapes(host_test):
    got = run_host(host_test, "launch")
    shape = {k: tuple(int(x) for x in v.split(",")) for k, v in got.items() if "," in v}
    assert shape["rows_4096x4096"] == (4096, 1, 1, 1024, 0)     # one float4 per thread
    assert shape["rows_10x48"] == (10, 1, 1, 32, 0)              # at least a warp
    assert shape["rows_3x100000"] == (3, 1, 1, 1024, 0)          # capped at 1024
    assert shape["elem_1000_1"] == (4, 1, 1, 256, 0)
    assert shape["elem_big_8"] == (132 * 16, 1, 1, 256, 0)      # grid-stride cap
    assert shape["attn_tc"] == (300, 32, 1, 128, 0)              # (tiles, heads), 4 warps
    assert shape["attn_fallback"] == (100, 4, 1, 32, 24 * 2 * 4)  # (tokens, heads), 1 warp, q + acc in smem
    assert shape["head_7x19"] == ((7 * 19 + 7) // 8, 1, 1, 256, 0)
    assert (got["tc16"], got["tc24"], got["tc128"], got["tc256"]) == ("1", "0", "1", "0")


def test_out_of_memory_message_names_needed_and_free(host_test):
    got = run_host(host_test, "fits", 17_000_000_000, 9_000_000_000)
    assert got["rc"] == "-1"
    assert "not enough GPU memory on cuda:0" in got["msg"]
    assert "needs 17000000000 bytes" in got["msg"] and "only 9000000000 bytes" in got["msg"]
    assert run_host(host_test, "fits", 100, 100)["rc"] == "0"


# ---- the no-GPU paths -----------------------------------------------------------------------


def nvidia_smi_gpu_count():
    """(count, None) of the GPUs `nvidia-smi -L` lists, or (None, why it cannot say)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None, "CUDA_VISIBLE_DEVICES is set: nvidia-smi's count is not what CUDA sees"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "an NVIDIA driver is present but nvidia-smi is not on PATH"
    res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return None, f"nvidia-smi -L failed: {(res.stdout + res.stderr).strip()[:200]}"
    return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU ")), None


def check_device_count(n: int, describe: str = "") -> None:
    """Without a driver: 0. With one: nvidia-smi's count, or 0 when the CUDA runtime of this build
    cannot use the driver (then it says why, e.g. a driver too old for it)."""
    if not HAS_GPU_DRIVER:
        assert n == 0
        return
    expected, why = nvidia_smi_gpu_count()
    if expected is None:
        pytest.skip(why)
    if n != expected:
        assert n == 0, f"CUDA sees {n} device(s), nvidia-smi -L lists {expected}"
        if describe:
            assert describe.startswith("no CUDA device is available (cudaGetDeviceCount: "), describe


def test_device_count(host_test):
    got = run_host(host_test, "devcount")
    n = int(got["count"])
    check_device_count(n, got["describe"])
    if n == 0:
        assert got["describe_rc"] == "-1"
        assert got["describe"].startswith("no CUDA device is available (cudaGetDeviceCount: ")
    else:
        assert "sm_" in got["describe"] and "GiB" in got["describe"], got["describe"]


def test_create_fails_cleanly_before_allocating(host_test):
    # a 65536-wide, 512-layer model: no GPU here, and far beyond any GPU's memory where there is one
    got = run_host(host_test, "create", 65536, 512)
    assert got["rc"] == "-1"
    if int(run_host(host_test, "devcount")["count"]) == 0:
        assert got["msg"].startswith("device_map='cuda:0': no CUDA device is available")
    else:
        assert "not enough GPU memory on cuda:0" in got["msg"] or "compute capability" in got["msg"]


def test_python_sees_the_devices_cuda_sees():
    """_core.cuda_device_count() (exposed by csrc/python/module.c): 0 without a GPU (not a crash), nvidia-smi's count with one."""
    code = ("from armorm import _core; f = getattr(_core, 'cuda_device_count', None); "
            "print(-1 if f is None else f(), _core.CUDA_BUILT)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        pytest.skip("armorm._core is not built here")
    n, built = (int(v) for v in res.stdout.split())
    assert n >= 0, "cuda_device_count is missing from armorm._core"
    if not built:
        assert n == 0  # a CPU-only build sees no device, whatever the machine has
        return
    check_device_count(n)


def test_gpu_bench_script_smoke(tmp_path):
    """benchmarks/gpu_bench.py end to end on a tiny shape on the CPU, so the GPU run does not find its bugs."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--n", "6",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json
    summary = json.loads(out.read_text())
    assert [r["system"] for r in summary["rows"]] == ["armorm", "hf-single", "hf-padded-8"]
    assert summary["score_rel_diff_vs_hf_bf16"] < 0.05  # same weights, both bf16: same scores up to rounding
    assert res.stdout.strip().splitlines()[-1].startswith("hf-padded-8")
