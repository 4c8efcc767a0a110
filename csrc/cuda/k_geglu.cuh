// k_geglu.cuh: the Gemma MLP's gated activation on the fused gate|up output,
// the CUDA twin of csrc/cpu/geglu.h. gu (n, 2I) bf16 holds gate in columns
// [0, I) and up in [I, 2I); h (n, I) bf16 = gelu_tanh(gate) * up, computed in
// fp32 as gate / (1 + exp(-2u)) * up, u = sqrt(2/pi) (gate + 0.044715 gate^3)
// (the tanh GELU without the cancellation of 1 + tanh), rounded once.
#ifndef ARMORM_CUDA_K_GEGLU_CUH
#define ARMORM_CUDA_K_GEGLU_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

static __device__ __forceinline__ float gelu_tanh_mul(float g, float u) {
    const float k = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return g / (1.0f + expf(-2.0f * k)) * u;
}

// Any I: one element per iteration.
static __global__ void geglu_kernel(bf16 *h, const bf16 *gu, int64_t n, int I) {
    const int64_t total = n * I;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = k / I, i = k - t * I;
        const bf16 *row = gu + t * 2 * I;
        h[k] = f2bf(gelu_tanh_mul(bf2f(row[i]), bf2f(row[I + i])));
    }
}

// I % 8 == 0: eight elements (16 bytes) per load and store.
static __global__ void geglu_vec8_kernel(bf16 *h, const bf16 *gu, int64_t n, int I) {
    const int I8 = I / 8;
    const int64_t total = n * I8;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = k / I8, i = (k - t * I8) * 8;
        const uint4 gv = *(const uint4 *)(gu + t * 2 * I + i);
        const uint4 uv = *(const uint4 *)(gu + t * 2 * I + I + i);
        const bf16 *g = (const bf16 *)&gv, *u = (const bf16 *)&uv;
        uint4 ov;
        bf16 *o = (bf16 *)&ov;
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = f2bf(gelu_tanh_mul(bf2f(g[j]), bf2f(u[j])));
        *(uint4 *)(h + t * I + i) = ov;
    }
}

static void launch_geglu(bf16 *h, const bf16 *gu, int64_t n, int I, cudaStream_t st) {
    if (I % 8 == 0) {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 8);
        LAUNCH_KERNEL(geglu_vec8_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I);
    } else {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 1);
        LAUNCH_KERNEL(geglu_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I);
    }
}

#endif
