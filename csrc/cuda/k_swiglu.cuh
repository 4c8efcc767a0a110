// k_swiglu.cuh: the Llama MLP's gated activation on the fused gate|up output.
// gu (n, 2I) bf16 holds gate in columns [0, I) and up in [I, 2I) (one GEMM
// against the stacked gate and up weights); h (n, I) bf16 = silu(gate) * up,
// computed in fp32 and rounded once.
#ifndef ARMORM_CUDA_K_SWIGLU_CUH
#define ARMORM_CUDA_K_SWIGLU_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

static __device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Any I: one element per iteration.
static __global__ void swiglu_kernel(bf16 *h, const bf16 *gu, int64_t n, int I) {
    const int64_t total = n * I;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = k / I, i = k - t * I;
        const bf16 *row = gu + t * 2 * I;
        h[k] = f2bf(silu_mul(bf2f(row[i]), bf2f(row[I + i])));
    }
}

// I % 8 == 0: eight elements (16 bytes) per load and store.
static __global__ void swiglu_vec8_kernel(bf16 *h, const bf16 *gu, int64_t n, int I) {
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
        for (int j = 0; j < 8; j++) o[j] = f2bf(silu_mul(bf2f(g[j]), bf2f(u[j])));
        *(uint4 *)(h + t * I + i) = ov;
    }
}

static void launch_swiglu(bf16 *h, const bf16 *gu, int64_t n, int I, cudaStream_t st) {
    if (I % 8 == 0) {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 8);
        LAUNCH_KERNEL(swiglu_vec8_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I);
    } else {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 1);
        LAUNCH_KERNEL(swiglu_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I);
    }
}

#endif
