// k_rmsnorm.cuh: out (R, H) = w * x * 1/sqrt(mean(x^2) + eps), one block per row.
//
// x is the fp32 residual stream (T, H). The residual add itself happens in
// the epilogue of the projection GEMM that precedes each norm (cuBLASLt with
// beta = 1 accumulates straight into x), so this kernel is the second half of
// "residual add + RMSNorm" and reads each row once more, from L2.
// `rows` (R), when given, picks the rows of x to normalise (the head's reward
// and gating positions); otherwise row r of out is row r of x.
// The sum of squares accumulates in fp32 per thread, then a block reduction.
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

#endif
