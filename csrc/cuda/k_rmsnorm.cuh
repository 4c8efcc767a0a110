// k_rmsnorm.cuh: out (R, H) = w * x * 1/sqrt(mean(x^2) + eps), one block per row.
//
// x is the fp32 residual stream (T, H). The residual add itself happens in
// the epilogue of the projection GEMM that precedes each norm (cuBLASLt with
// beta = 1 accumulates straight into x), so this kernel is the second half of
// "residual add + RMSNorm" and reads each row once more, from L2.
// `rows` (R), when given, picks the rows of x to normalise (the head's reward
// and gating positions); otherwise row r of out is row r of x.
// The sum of squares accumulates in fp32 per thread, then a block reduction.
// (Norms that scale by 1 + w arrive here as w' = 1 + w: model.c adds the one
// at load, before the upload.) Also here: the post-norm residual add and the
// per-head q/k norm.
#ifndef ARMORM_CUDA_K_RMSNORM_CUH
#define ARMORM_CUDA_K_RMSNORM_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

template <typename OutT>
static __global__ void rmsnorm_kernel(OutT *out, const float *x, const float *w, const int32_t *rows, int H,
                                      float eps) {
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float *xr = x + (int64_t)(rows ? rows[r] : r) * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
    OutT *o = out + r * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) store_as(o + i, w[i] * (xr[i] * inv));
}

// H % 4 == 0: float4 loads of x and w.
template <typename OutT>
static __global__ void rmsnorm_vec4_kernel(OutT *out, const float *x, const float *w, const int32_t *rows, int H,
                                           float eps) {
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float4 *xr = (const float4 *)(x + (int64_t)(rows ? rows[r] : r) * H);
    const float4 *w4 = (const float4 *)w;
    const int H4 = H / 4;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H4; i += blockDim.x) {
        const float4 v = xr[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
    OutT *o = out + r * H;
    for (int i = threadIdx.x; i < H4; i += blockDim.x) {
        const float4 v = xr[i], g = w4[i];
        store_as(o + 4 * i + 0, g.x * (v.x * inv));
        store_as(o + 4 * i + 1, g.y * (v.y * inv));
        store_as(o + 4 * i + 2, g.z * (v.z * inv));
        store_as(o + 4 * i + 3, g.w * (v.w * inv));
    }
}

// out (R, H); rows may be NULL (R = T, every row).
template <typename OutT>
static void launch_rmsnorm(OutT *out, const float *x, const float *w, const int32_t *rows, int64_t R, int H,
                           float eps, cudaStream_t st) {
    if (H % 4 == 0) {
        const CudaLaunch l = cuda_launch_rows(R, H);  // about one float4 per thread
        LAUNCH_KERNEL(rmsnorm_vec4_kernel<OutT>, l.grid_x, l.block, 0, st)(out, x, w, rows, H, eps);
    } else {
        const CudaLaunch l = cuda_launch_rows(R, H);
        LAUNCH_KERNEL(rmsnorm_kernel<OutT>, l.grid_x, l.block, 0, st)(out, x, w, rows, H, eps);
    }
}

// x (R, H) += w * y / sqrt(mean(y^2) + eps), one block per row: a sublayer's
// f32 output (y, from its projection GEMM) normed before the residual add
// (Gemma-2's post-attention and post-feedforward norms; csrc/cpu/rmsnorm.h
// rmsnorm_add).
static __global__ void rmsnorm_add_kernel(float *x, const float *y, const float *w, int H, float eps) {
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float *yr = y + r * H;
    float *xr = x + r * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) ss += yr[i] * yr[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) xr[i] = xr[i] + w[i] * (yr[i] * inv);
}

static void launch_rmsnorm_add(float *x, const float *y, const float *w, int64_t R, int H, float eps,
                               cudaStream_t st) {
    const CudaLaunch l = cuda_launch_rows(R, H);
    LAUNCH_KERNEL(rmsnorm_add_kernel, l.grid_x, l.block, 0, st)(x, y, w, H, eps);
}

// Per-head RMSNorm of q and k in place on the fused projection output (Qwen3,
// before RoPE): qkv (T, (nh + 2 nkv) * hd) bf16; head h < nh scales by wq,
// nh <= h < nh + nkv by wk (hd each); values are left alone. One warp per
// (token, head), fp32 sums, one rounding to bf16. Grid (T, ceil((nh + nkv) / 4)), block 128.
static __global__ void head_rmsnorm_kernel(bf16 *qkv, const float *wq, const float *wk, int nh, int nkv, int hd,
                                           float eps) {
    const int h = blockIdx.y * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (h >= nh + nkv) return;  // whole warps leave together
    bf16 *v = qkv + (int64_t)blockIdx.x * (nh + 2 * nkv) * hd + (int64_t)h * hd;
    const float *w = h < nh ? wq : wk;
    float ss = 0.0f;
    for (int d = lane; d < hd; d += 32) {
        const float a = bf2f(v[d]);
        ss += a * a;
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)hd + eps);
    for (int d = lane; d < hd; d += 32) v[d] = f2bf(w[d] * (bf2f(v[d]) * inv));
}

static void launch_head_rmsnorm(bf16 *qkv, const float *wq, const float *wk, int64_t T, int nh, int nkv, int hd,
                                float eps, cudaStream_t st) {
    const dim3 grid((unsigned)T, (unsigned)((nh + nkv + 3) / 4));
    LAUNCH_KERNEL(head_rmsnorm_kernel, grid, 128, 0, st)(qkv, wq, wk, nh, nkv, hd, eps);
}

#endif
