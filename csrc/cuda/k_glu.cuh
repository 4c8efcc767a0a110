// k_glu.cuh: the MLP's gated activation on the fused gate|up output, the CUDA
// twin of csrc/cpu/glu.h. gu (n, 2I) bf16 holds gate in columns [0, I) and up
// in [I, 2I) (one GEMM against the stacked gate and up weights); h (n, I) bf16
// = act(gate) * up, computed in fp32 and rounded once, act by Config.hidden_act:
//   SwiGLU: silu(g)      = g / (1 + exp(-g))
//   GeGLU:  gelu_tanh(g) = g / (1 + exp(-z)), z = 2 sqrt(2/pi) (g + 0.044715 g^3)
#ifndef ARMORM_CUDA_K_GLU_CUH
#define ARMORM_CUDA_K_GLU_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

static __device__ __forceinline__ float glu_mul(float g, float u, int act) {
    const float z = act == ACT_GELU_TANH ? 1.5957691216057308f * (g + 0.044715f * g * g * g) : g;
    return g / (1.0f + expf(-z)) * u;
}

// Any I: one element per iteration.
static __global__ void glu_kernel(bf16 *h, const bf16 *gu, int64_t n, int I, int act) {
    const int64_t total = n * I;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = k / I, i = k - t * I;
        const bf16 *row = gu + t * 2 * I;
        h[k] = f2bf(glu_mul(bf2f(row[i]), bf2f(row[I + i]), act));
    }
}

// I % 8 == 0: eight elements (16 bytes) per load and store.
static __global__ void glu_vec8_kernel(bf16 *h, const bf16 *gu, int64_t n, int I, int act) {
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
        for (int j = 0; j < 8; j++) o[j] = f2bf(glu_mul(bf2f(g[j]), bf2f(u[j]), act));
        *(uint4 *)(h + t * I + i) = ov;
    }
}

// act: ACT_SILU or ACT_GELU_TANH (model.h).
static void launch_glu(bf16 *h, const bf16 *gu, int64_t n, int I, int act, cudaStream_t st) {
    if (I % 8 == 0) {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 8);
        LAUNCH_KERNEL(glu_vec8_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I, act);
    } else {
        const CudaLaunch l = cuda_launch_elementwise(n * I, 1);
        LAUNCH_KERNEL(glu_kernel, l.grid_x, l.block, 0, st)(h, gu, n, I, act);
    }
}

#endif
