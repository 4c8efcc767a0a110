// kernels_test.cpp: every kernel of csrc/cuda (through its launcher, as the
// backend calls it) on the CPU emulation (emu.h), against the kernel's CPU
// reference in benchmarks/cuda/reference.h, for tests/test_cuda_emulation.py.
//
//   kernels_test [GROUP...]    groups: selftest attention rmsnorm rope swiglu head embedding convert gemm
//                              (default: all); "quick" is a small subset for the mutation builds
//
// "gemm" checks the cuBLASLt call the backend makes for every projection: the
// values cuda_gemm_call plans (transposes, leading dimensions, row-major
// outputs, beta = 1 accumulation), run by a CPU stand-in of cublasLtMatmul.
//
// Device buffers are heap blocks of exactly the bytes the kernel may touch (the
// last sequence ends at the last byte), outputs start as NaN, so an access past
// an end is an ASan report and an unwritten output fails the comparison.
// Prints one line per check and a summary; exits 1 when any check failed.
#include <cuda_bf16.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "check.h"
#include "reference.h"

#include "k_attention.cuh"
#include "k_convert.cuh"
#include "k_embedding.cuh"
#include "k_head.cuh"
#include "k_rmsnorm.cuh"
#include "k_rope.cuh"
#include "k_swiglu.cuh"
#include "lt_standin.h"

namespace {

int g_checks = 0, g_failed = 0;

void count(int bad) {
    g_checks++;
    g_failed += bad != 0;
}

// A "device" allocation: exactly n elements, 256-byte aligned like cudaMalloc.
template <class T>
T *dev_alloc(int64_t n) {
    void *p = nullptr;
    if (posix_memalign(&p, 256, sizeof(T) * (size_t)(n > 0 ? n : 1))) abort();
    memset(p, 0xff, sizeof(T) * (size_t)(n > 0 ? n : 1));  // NaN for float and bf16
    return static_cast<T *>(p);
}

template <class T>
T *dev_copy(const T *h, int64_t n) {
    T *d = dev_alloc<T>(n);
    memcpy(d, h, sizeof(T) * (size_t)n);
    return d;
}

// bf16 copy of x, and x itself rounded to the values the kernel reads.
bf16 *dev_bf16(float *x, int64_t n) {
    bf16 *d = dev_alloc<bf16>(n);
    for (int64_t i = 0; i < n; i++) {
        d[i] = __float2bfloat16_rn(x[i]);
        x[i] = __bfloat162float(d[i]);
    }
    return d;
}

std::vector<float> host_of(const bf16 *d, int64_t n) {
    std::vector<float> v((size_t)n);
    for (int64_t i = 0; i < n; i++) v[(size_t)i] = __bfloat162float(d[i]);
    return v;
}

std::vector<float> uniform(int64_t n, float scale, uint64_t seed) {
    std::vector<float> v((size_t)n);
    fill_uniform(v.data(), n, scale, seed);
    return v;
}

// ---- attention -------------------------------------------------------------------------------

// qkv for sequences `lens` with nh query / nkv key-value heads; `warp_kernel` runs the portable
// kernel directly (as the harness's version 1), otherwise launch_attention picks.
void attention_case(int hd, int nh, int nkv, const std::vector<int> &lens, float amp, bool warp_kernel,
                    uint64_t seed) {
    const int B = (int)lens.size();
    std::vector<int64_t> cu((size_t)B + 1, 0);
    for (int b = 0; b < B; b++) cu[(size_t)b + 1] = cu[(size_t)b] + lens[(size_t)b];
    const int64_t T = cu[(size_t)B], stride = (int64_t)(nh + 2 * nkv) * hd, QD = (int64_t)nh * hd;
    std::vector<float> qkv = uniform(T * stride, amp, seed);
    bf16 *dqkv = dev_bf16(qkv.data(), T * stride), *dout = dev_alloc<bf16>(T * QD);
    std::vector<int32_t> pos((size_t)T), cu32((size_t)B + 1);
    for (int b = 0; b <= B; b++) cu32[(size_t)b] = (int32_t)cu[(size_t)b];
    for (int b = 0; b < B; b++)
        for (int64_t i = cu[(size_t)b]; i < cu[(size_t)b + 1]; i++) pos[(size_t)i] = (int32_t)(i - cu[(size_t)b]);
    const int64_t ntiles = cuda_attn_tile_count(cu.data(), B, CUDA_ATTN_BLOCK_Q);
    std::vector<CudaAttnTile> tiles((size_t)ntiles);
    if (cuda_attn_plan(cu.data(), B, CUDA_ATTN_BLOCK_Q, tiles.data(), ntiles) != ntiles) abort();
    int32_t *dpos = dev_copy(pos.data(), T), *dcu = dev_copy(cu32.data(), B + 1);
    CudaAttnTile *dtiles = dev_copy(tiles.data(), ntiles);
    if (warp_kernel)
        LAUNCH_KERNEL(attention_warp_kernel, dim3((unsigned)T, (unsigned)nh), 32, sizeof(float) * 2 * hd, nullptr)(
            dout, dqkv, dpos, nh, nkv, hd, 1.0f / sqrtf((float)hd));
    else
        launch_attention(dout, dqkv, dcu, dpos, dtiles, ntiles, T, nh, nkv, hd, nullptr);
    std::vector<float> ref((size_t)(T * QD)), got = host_of(dout, T * QD);
    attention_ref(ref.data(), qkv.data(), cu.data(), B, nh, nkv, hd, nullptr, 0);
    char name[96];
    snprintf(name, sizeof name, "attention %s hd %d %d:%d T %lld amp %g", warp_kernel ? "warp" : "launch", hd, nh, nkv,
             (long long)T, amp);
    // P is rounded to bf16 for the tensor-core product and the output is bf16: ~2^-8 relative
    count(validate(name, got.data(), ref.data(), T * QD, 2e-2));
    free(dqkv);
    free(dout);
    free(dpos);
    free(dcu);
    free(dtiles);
}

void test_attention(bool quick) {
    // the edge lengths: 1 token, one short of / exactly / one past a 64-query tile, two tiles
    const std::vector<int> edges = {1, 2, 63, 64, 65, 128, 129};
    const int ratios[4][2] = {{2, 2}, {4, 2}, {4, 1}, {8, 1}};  // GQA 1:1, 2:1, 4:1, 8:1
    if (quick) {
        attention_case(32, 4, 2, {65, 7, 130}, 2.0f, false, 1);
        return;
    }
    for (int hd : {16, 32, 64, 128})
        for (int r = 0; r < 4; r++) attention_case(hd, ratios[r][0], ratios[r][1], hd == 128 && r > 1 ? std::vector<int>{65, 3} : edges, 2.0f, false, (uint64_t)(hd + r));
    // long and odd lengths, one block of several tiles each
    attention_case(64, 2, 1, {700, 333}, 2.0f, false, 7);
    attention_case(16, 4, 1, {511, 1, 190}, 2.0f, false, 8);
    // large amplitudes: scores in the hundreds, a near-one-hot softmax (exp2 of large negatives)
    attention_case(64, 4, 2, {129, 40}, 40.0f, false, 9);
    attention_case(128, 2, 2, {70}, 12.0f, false, 10);
    // the portable kernel: head dims without a tensor-core kernel, and one with
    attention_case(24, 4, 2, {1, 65, 30}, 2.0f, false, 11);
    attention_case(40, 8, 1, {33, 2}, 2.0f, false, 12);
    attention_case(64, 4, 1, {64, 17}, 2.0f, true, 13);
    attention_case(48, 2, 2, {100}, 40.0f, false, 14);
}

// ---- rmsnorm ---------------------------------------------------------------------------------

template <class OutT>
void rmsnorm_case(int64_t T, int H, bool gather, float amp, uint64_t seed) {
    const float eps = 1e-5f;
    std::vector<float> x = uniform(T * H, amp, seed), w = uniform(H, 1.0f, seed + 1);
    for (float &v : w) v += 1.0f;
    std::vector<int32_t> rows;
    int64_t R = T;
    if (gather) {
        R = 5;
        for (int64_t r = 0; r < R; r++) rows.push_back((int32_t)((r * 7 + 3) % T));
        rows[(size_t)R - 1] = (int32_t)(T - 1);  // the last row of x: its end is the buffer's end
    }
    float *dx = dev_copy(x.data(), T * H), *dw = dev_copy(w.data(), H);
    int32_t *drows = gather ? dev_copy(rows.data(), R) : nullptr;
    OutT *dout = dev_alloc<OutT>(R * H);
    launch_rmsnorm<OutT>(dout, dx, dw, drows, R, H, eps, nullptr);
    std::vector<float> ref((size_t)(R * H)), got((size_t)(R * H));
    rmsnorm_ref(ref.data(), x.data(), w.data(), gather ? rows.data() : nullptr, R, H, eps);
    for (int64_t i = 0; i < R * H; i++) got[(size_t)i] = (float)dout[i];
    const bool bf = sizeof(OutT) == 2;
    char name[96];
    snprintf(name, sizeof name, "rmsnorm %s H %d R %lld%s amp %g", bf ? "bf16" : "f32", H, (long long)R,
             gather ? " rows" : "", amp);
    count(validate(name, got.data(), ref.data(), R * H, bf ? 8e-3 : 2e-6));
    free(dx);
    free(dw);
    free(drows);
    free(dout);
}

void test_rmsnorm(bool quick) {
    rmsnorm_case<bf16>(3, 64, false, 3.0f, 1);     // float4 path, one warp
    if (quick) return;
    rmsnorm_case<bf16>(2, 4096, false, 3.0f, 2);   // float4 path, 1024 threads: every warp in the block sum
    rmsnorm_case<bf16>(3, 50, false, 3.0f, 3);     // scalar path (H % 4 != 0)
    rmsnorm_case<bf16>(2, 1030, false, 1e4f, 4);   // scalar path, 288 threads, large residuals
    rmsnorm_case<float>(9, 96, true, 3.0f, 5);     // the head's gathered rows, f32 out
    rmsnorm_case<float>(4, 50, true, 1e4f, 6);
}

// ---- rope ------------------------------------------------------------------------------------

void rope_case(int hd, int nh, int nkv, const std::vector<int> &lens, double theta, float amp, uint64_t seed) {
    const int half = hd / 2;
    int64_t T = 0;
    for (int l : lens) T += l;
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd;
    std::vector<int32_t> pos;
    for (int l : lens)
        for (int p = 0; p < l; p++) pos.push_back(p);
    std::vector<float> inv_freq((size_t)half);
    for (int i = 0; i < half; i++) inv_freq[(size_t)i] = (float)(1.0 / pow(theta, (double)(2 * i) / hd));
    std::vector<float> x = uniform(T * stride, amp, seed);
    bf16 *d = dev_bf16(x.data(), T * stride);
    int32_t *dpos = dev_copy(pos.data(), T);
    float *dfreq = dev_copy(inv_freq.data(), half);
    launch_rope(d, dpos, dfreq, T, nh, nkv, hd, nullptr);
    rope_ref(x.data(), pos.data(), inv_freq.data(), T, nh, nkv, hd);
    std::vector<float> got = host_of(d, T * stride);
    char name[96];
    snprintf(name, sizeof name, "rope hd %d %d:%d T %lld", hd, nh, nkv, (long long)T);
    count(validate(name, got.data(), x.data(), T * stride, 8e-3));
    free(d);
    free(dpos);
    free(dfreq);
}

void test_rope(bool quick) {
    rope_case(16, 4, 2, {3, 5}, 10000.0, 2.0f, 1);
    if (quick) return;
    rope_case(128, 4, 1, {2, 70}, 500000.0, 2.0f, 2);  // 64 frequencies: two warps
    rope_case(24, 2, 2, {700}, 500000.0, 50.0f, 3);      // long positions, odd half (12), large values
    rope_case(256, 2, 1, {3}, 10000.0, 2.0f, 4);         // 128 frequencies
}

// ---- swiglu ----------------------------------------------------------------------------------

void swiglu_case(int64_t n, int I, float amp, uint64_t seed) {
    std::vector<float> gu = uniform(n * 2 * I, amp, seed);
    bf16 *dgu = dev_bf16(gu.data(), n * 2 * I), *dh = dev_alloc<bf16>(n * I);
    launch_swiglu(dh, dgu, n, I, nullptr);
    std::vector<float> ref((size_t)(n * I)), got = host_of(dh, n * I);
    swiglu_ref(ref.data(), gu.data(), n, I);
    char name[96];
    snprintf(name, sizeof name, "swiglu %s n %lld I %d amp %g", I % 8 ? "scalar" : "vec8", (long long)n, I, amp);
    count(validate(name, got.data(), ref.data(), n * I, 8e-3));
    free(dgu);
    free(dh);
}

void test_swiglu(bool quick) {
    swiglu_case(3, 24, 6.0f, 1);
    if (quick) return;
    swiglu_case(5, 20, 6.0f, 2);
    swiglu_case(7, 1000, 80.0f, 3);  // exp(-g) overflows for g < -88: silu must give -0, not NaN
    swiglu_case(300, 8, 6.0f, 4);
}

// ---- head ------------------------------------------------------------------------------------

void head_case(int B, int N, int K, bool bias, bool relu, uint64_t seed) {
    std::vector<float> x = uniform((int64_t)B * K, 2.0f, seed), W = uniform((int64_t)N * K, 0.3f, seed + 1),
                       b = uniform(N, 0.5f, seed + 2);
    float *dx = dev_copy(x.data(), (int64_t)B * K), *dW = dev_copy(W.data(), (int64_t)N * K);
    float *db = bias ? dev_copy(b.data(), N) : nullptr, *dout = dev_alloc<float>((int64_t)B * N);
    launch_head_linear(dout, dx, dW, db, B, N, K, relu, nullptr);
    std::vector<float> ref((size_t)B * N);
    head_linear_ref(ref.data(), x.data(), W.data(), bias ? b.data() : nullptr, B, N, K, relu);
    char name[96];
    snprintf(name, sizeof name, "head_linear B %d N %d K %d%s%s", B, N, K, bias ? " bias" : "", relu ? " relu" : "");
    count(validate(name, dout, ref.data(), (int64_t)B * N, 1e-6));
    free(dx);
    free(dW);
    free(db);
    free(dout);
}

void finish_case(int B, int K, uint64_t seed) {
    const float temperature = 10.0f, logit_scale = 1.7f;
    std::vector<float> z = uniform((int64_t)B * K, 30.0f, seed), r = uniform((int64_t)B * K, 2.0f, seed + 1),
                       tr = uniform((int64_t)K * K, 0.2f, seed + 2);
    for (int k = 0; k < K; k++) tr[(size_t)k * K + k] += 1.0f;
    float *dz = dev_copy(z.data(), (int64_t)B * K), *dr = dev_copy(r.data(), (int64_t)B * K);
    float *dtr = dev_copy(tr.data(), (int64_t)K * K), *dg = dev_alloc<float>((int64_t)B * K), *ds = dev_alloc<float>(B);
    launch_armorm_finish(dg, ds, dz, dr, dtr, B, K, temperature, logit_scale, nullptr);
    std::vector<float> g((size_t)B * K), s((size_t)B);
    armorm_finish_ref(g.data(), s.data(), z.data(), r.data(), tr.data(), B, K, temperature, logit_scale);
    char name[96];
    snprintf(name, sizeof name, "armorm_finish gating B %d K %d", B, K);
    count(validate(name, dg, g.data(), (int64_t)B * K, 1e-6));
    snprintf(name, sizeof name, "armorm_finish score B %d K %d", B, K);
    count(validate(name, ds, s.data(), B, 1e-6));
    // SequenceClassification: the first logit is the score
    float *dsc = dev_alloc<float>(B);
    launch_first_column(dsc, dz, B, K, nullptr);
    std::vector<float> fc((size_t)B);
    first_column_ref(fc.data(), z.data(), B, K);
    snprintf(name, sizeof name, "first_column B %d NL %d", B, K);
    count(validate(name, dsc, fc.data(), B, 0.0));
    free(dz);
    free(dr);
    free(dtr);
    free(dg);
    free(ds);
    free(dsc);
}

void test_head(bool quick) {
    head_case(3, 19, 64, false, false, 1);  // 57 warps: the last block's trailing warps return early
    if (quick) return;
    head_case(2, 33, 100, true, true, 2);
    head_case(5, 7, 31, true, false, 3);
    finish_case(3, 19, 4);
    finish_case(2, 300, 5);  // more objectives than threads: the strided loops
    finish_case(1, 1, 6);
}

// ---- embedding -------------------------------------------------------------------------------

void embedding_case(int64_t V, int H, int64_t T, uint64_t seed) {
    std::vector<float> emb = uniform(V * H, 1.0f, seed);
    bf16 *demb = dev_bf16(emb.data(), V * H);
    std::vector<int32_t> tok((size_t)T);
    for (int64_t t = 0; t < T; t++) tok[(size_t)t] = (int32_t)((t * 2654435761u) % (uint64_t)V);
    tok[(size_t)T - 1] = (int32_t)(V - 1);  // the table's last row
    int32_t *dtok = dev_copy(tok.data(), T);
    float *dx = dev_alloc<float>(T * H);
    launch_embedding(dx, dtok, demb, T, H, nullptr);
    std::vector<float> ref((size_t)(T * H));
    embedding_ref(ref.data(), tok.data(), emb.data(), T, H);
    char name[96];
    snprintf(name, sizeof name, "embedding V %lld H %d T %lld", (long long)V, H, (long long)T);
    count(validate(name, dx, ref.data(), T * H, 0.0));
    free(demb);
    free(dtok);
    free(dx);
}

void test_embedding(bool) {
    embedding_case(50, 64, 9, 1);
    embedding_case(7, 130, 3, 2);
}

// ---- conversion and bias -----------------------------------------------------------------------

void to_bf16_case(int dtype, int64_t n, uint64_t seed) {
    std::vector<float> src = uniform(n, 100.0f, seed);
    void *dsrc;
    if (dtype == 0) {
        dsrc = dev_copy(src.data(), n);
    } else if (dtype == 1) {
        dsrc = dev_bf16(src.data(), n);
    } else {
        __half *h = dev_alloc<__half>(n);
        for (int64_t i = 0; i < n; i++) {
            h[i] = __float2half_rn(src[(size_t)i]);
            src[(size_t)i] = __half2float(h[i]);
        }
        dsrc = h;
    }
    bf16 *dst = dev_alloc<bf16>(n);
    launch_to_bf16(dst, dsrc, dtype, n, nullptr);
    std::vector<float> ref((size_t)n), got = host_of(dst, n);
    to_bf16_ref(ref.data(), src.data(), n);
    char name[96];
    snprintf(name, sizeof name, "to_bf16 from %s n %lld", dtype == 0 ? "f32" : dtype == 1 ? "bf16" : "f16", (long long)n);
    count(validate(name, got.data(), ref.data(), n, 0.0));
    free(dsrc);
    free(dst);
}

void add_bias_case(bool bf, int64_t T, int N, uint64_t seed) {
    std::vector<float> y = uniform(T * N, 4.0f, seed), b = uniform(N, 1.0f, seed + 1);
    float *db = dev_copy(b.data(), N);
    std::vector<float> got((size_t)(T * N));
    if (bf) {
        bf16 *dy = dev_bf16(y.data(), T * N);
        launch_add_bias<bf16>(dy, db, T, N, nullptr);
        got = host_of(dy, T * N);
        free(dy);
    } else {
        float *dy = dev_copy(y.data(), T * N);
        launch_add_bias<float>(dy, db, T, N, nullptr);
        memcpy(got.data(), dy, sizeof(float) * (size_t)(T * N));
        free(dy);
    }
    add_bias_ref(y.data(), b.data(), T, N, bf);
    char name[96];
    snprintf(name, sizeof name, "add_bias %s T %lld N %d", bf ? "bf16" : "f32", (long long)T, N);
    count(validate(name, got.data(), y.data(), T * N, 0.0));
    free(db);
}

void test_convert(bool quick) {
    to_bf16_case(0, 1000, 1);
    if (quick) return;
    to_bf16_case(1, 777, 2);
    to_bf16_case(2, 513, 3);
    add_bias_case(true, 5, 37, 4);
    add_bias_case(false, 3, 300, 5);
}

// ---- the projections' cuBLASLt calls ----------------------------------------------------------

// y (T, N) [+]= x (T, K) W^T through cuda_gemm_call and the stand-in, against head_linear_ref.
// `flip` plants a transposition error: it must be refused or give a mismatch.
int gemm_case(int64_t T, int64_t N, int64_t K, bool y_f32, bool accumulate, bool flip, uint64_t seed) {
    std::vector<float> x = uniform(T * K, 2.0f, seed), W = uniform(N * K, 0.5f, seed + 1), y0 = uniform(T * N, 3.0f, seed + 2);
    bf16 *dx = dev_bf16(x.data(), T * K), *dW = dev_bf16(W.data(), N * K);
    void *dy = y_f32 ? (void *)dev_copy(y0.data(), T * N) : (void *)dev_bf16(y0.data(), T * N);
    if (!accumulate && !y_f32) memset(dy, 0xff, sizeof(bf16) * (size_t)(T * N));  // beta = 0: C is never read
    CudaGemmCall c;
    if (cuda_gemm_call(&c, dy, y_f32, accumulate, dx, dW, T, N, K)) abort();
    if (flip) c.transa ^= 1;
    char why[256] = "", name[96];
    snprintf(name, sizeof name, "gemm%s T %lld N %lld K %lld %s%s", flip ? " flipped" : "", (long long)T, (long long)N,
             (long long)K, y_f32 ? "f32" : "bf16", accumulate ? " +=" : "");
    int bad = 1;
    if (lt_standin_run(&c, why, sizeof why) == 0) {
        std::vector<float> ref((size_t)(T * N)), got((size_t)(T * N));
        head_linear_ref(ref.data(), x.data(), W.data(), nullptr, (int)T, (int)N, (int)K, 0);
        for (int64_t i = 0; i < T * N; i++) {
            if (accumulate) ref[(size_t)i] += y0[(size_t)i];
            got[(size_t)i] = y_f32 ? ((float *)dy)[i] : (float)((bf16 *)dy)[i];
        }
        bad = validate(name, got.data(), ref.data(), T * N, y_f32 ? 1e-6 : 8e-3);
    } else {
        printf("%-36s refused: %s  MISMATCH\n", name, why);
    }
    free(dx);
    free(dW);
    free(dy);
    return bad;
}

void test_gemm(bool quick) {
    count(gemm_case(5, 7, 3, false, false, false, 1));
    if (quick) return;
    count(gemm_case(1, 1, 1, false, false, false, 2));
    count(gemm_case(33, 48, 64, false, false, false, 3));  // the fused q|k|v projection shape of a small model
    count(gemm_case(33, 64, 40, true, true, false, 4));    // o_proj / down_proj: the residual add (beta = 1)
    count(gemm_case(9, 17, 130, true, false, false, 5));   // f32 output without accumulation
    // a transposition error must not pass: refused (shapes do not chain) or wrong values
    printf("(the two flipped calls below must be refused or mismatch)\n");
    count(!gemm_case(6, 8, 5, true, true, true, 6));
    count(!gemm_case(6, 8, 8, false, false, true, 7));
}

// ---- the emulator's own instructions, checked against each other --------------------------------

// ldmatrix .x4 of a row-major 16x16 A and .x2.trans of a row-major 16x8 B feed mma exactly (the
// layouts are documented to match): the warp's D must be A * B, element by element.
void mma_selftest_kernel(const bf16 *A, const bf16 *B, float *D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    __shared__ __align__(16) bf16 As[16 * 16];
    __shared__ __align__(16) bf16 Bs[16 * 8];
    for (int i = lane; i < 256; i += 32) As[i] = A[i];
    for (int i = lane; i < 128; i += 32) Bs[i] = B[i];
    __syncthreads();
    uint32_t a[4], b[2];
    // matrices 0..3 of A: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15 (registers a0..a3)
    emu_ldmatrix_x(a, &As[(lane % 16) * 16 + (lane / 16) * 8]);
    // B (k, n) row-major: matrix 0 = k rows 0-7, matrix 1 = k rows 8-15, transposed into col fragments
    emu_ldmatrix_x_trans(b, &Bs[(lane % 16) * 8]);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    emu_mma_m16n8k16_bf16(d, a, b[0], b[1]);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

void shfl_selftest_kernel(int *out) {
    const int lane = threadIdx.x & 31;
    int *o = out + threadIdx.x * 4;
    o[0] = __shfl_xor_sync(0xffffffffu, lane * 10, 5);
    o[1] = __shfl_sync(0xffffffffu, lane * 10, 3, 8);
    o[2] = __shfl_down_sync(0xffffffffu, lane * 10, 2);
    o[3] = __shfl_up_sync(0xffffffffu, lane * 10, 1, 16);
}

void barrier_selftest_kernel(int *out) {
    __shared__ int s[96];
    s[threadIdx.x] = (int)threadIdx.x + 1;
    __syncthreads();  // without it, thread 0 would read neighbours that have not run yet
    out[threadIdx.x] = s[(threadIdx.x + 1) % 96] + s[(threadIdx.x + 95) % 96];
}

void test_selftest(bool) {
    std::vector<float> a = uniform(256, 2.0f, 1), b = uniform(128, 2.0f, 2);
    bf16 *dA = dev_bf16(a.data(), 256), *dB = dev_bf16(b.data(), 128);
    float *dD = dev_alloc<float>(128);
    LAUNCH_KERNEL(mma_selftest_kernel, 1, 32, 0, nullptr)(dA, dB, dD);
    std::vector<float> ref(128, 0.0f);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 8; j++) {
            double s = 0.0;
            for (int k = 0; k < 16; k++) s += (double)a[(size_t)i * 16 + k] * b[(size_t)k * 8 + j];
            ref[(size_t)i * 8 + j] = (float)s;
        }
    count(validate("selftest ldmatrix + mma = A B", dD, ref.data(), 128, 1e-6));
    int *sh = dev_alloc<int>(64 * 4);
    LAUNCH_KERNEL(shfl_selftest_kernel, 1, 64, 0, nullptr)(sh);
    int bad = 0;
    for (int i = 0; i < 64; i++) {
        const int l = i & 31;
        const int want[4] = {(l ^ 5) * 10, ((l & ~7) + 3) * 10, (l + 2 < 32 ? l + 2 : l) * 10,
                             ((l & 15) >= 1 ? l - 1 : l) * 10};
        for (int k = 0; k < 4; k++) bad += sh[i * 4 + k] != want[k];
    }
    printf("%-36s %d wrong  %s\n", "selftest shuffles", bad, bad ? "MISMATCH" : "OK");
    count(bad);
    int *bo = dev_alloc<int>(96);
    LAUNCH_KERNEL(barrier_selftest_kernel, 1, 96, 0, nullptr)(bo);
    bad = 0;
    for (int i = 0; i < 96; i++) bad += bo[i] != ((i + 1) % 96 + 1) + ((i + 95) % 96 + 1);
    printf("%-36s %d wrong  %s\n", "selftest __syncthreads", bad, bad ? "MISMATCH" : "OK");
    count(bad);
    free(dA);
    free(dB);
    free(dD);
    free(sh);
    free(bo);
}

// Deliberately broken kernels: the emulator must refuse them (the process aborts with a message).
void divergent_barrier_kernel() {
    if (threadIdx.x < 16) __syncthreads();
}
void exited_lane_kernel(float *out) {
    if (threadIdx.x == 31) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

struct Group {
    const char *name;
    void (*run)(bool quick);
};
const Group GROUPS[] = {{"selftest", test_selftest}, {"attention", test_attention}, {"rmsnorm", test_rmsnorm},
                        {"rope", test_rope},         {"swiglu", test_swiglu},       {"head", test_head},
                        {"embedding", test_embedding}, {"convert", test_convert},   {"gemm", test_gemm}};

}  // namespace

int main(int argc, char **argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::vector<std::string> want(argv + 1, argv + argc);
    if (want.size() == 1 && want[0] == "divergent-barrier") {
        LAUNCH_KERNEL(divergent_barrier_kernel, 1, 64, 0, nullptr)();
        return 0;
    }
    if (want.size() == 1 && want[0] == "exited-lane") {
        float *o = dev_alloc<float>(32);
        LAUNCH_KERNEL(exited_lane_kernel, 1, 32, 0, nullptr)(o);
        free(o);
        return 0;
    }
    const bool quick = want.size() == 1 && want[0] == "quick";
    for (const Group &g : GROUPS) {
        bool run = want.empty() || quick;
        for (const std::string &w : want) run |= w == g.name;
        if (run) g.run(quick);
    }
    printf("cuda_emu: %d checks, %d failed\n", g_checks, g_failed);
    return g_failed ? 1 : 0;
}
