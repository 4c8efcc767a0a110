// k_rope.cuh: rotary position embedding in the Hugging Face "rotate half"
// layout, in place on the fused projection output.
//
// qkv (T, (nh + 2 nkv) * hd) bf16: the nh query heads, then the nkv key heads
// (contiguous, so nh + nkv heads in a row are rotated), then the value heads
// (left alone). For i < hd/2 the pair (v[i], v[i + hd/2]) turns by the angle
// pos * inv_freq[i]: an fp32 product as in the reference, cos and sin in fp32
// (full-precision sincosf: angles reach thousands of radians), one rounding
// to bf16 per element.
#ifndef ARMORM_CUDA_K_ROPE_CUH
#define ARMORM_CUDA_K_ROPE_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

// One block per token; each thread owns frequency i and walks the heads, so
// sin/cos are computed once per (token, frequency).
static __global__ void rope_kernel(bf16 *qkv, const int32_t *pos, const float *inv_freq, int nrot, int hd,
                                   int64_t stride) {
    const int64_t t = blockIdx.x;
    const int half = hd / 2;
    bf16 *row = qkv + t * stride;
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        for (int h = 0; h < nrot; h++) {
            bf16 *v = row + (int64_t)h * hd;
            const float a = bf2f(v[i]), b = bf2f(v[i + half]);
            v[i] = f2bf(a * c - b * s);
            v[i + half] = f2bf(b * c + a * s);
        }
    }
}

static void launch_rope(bf16 *qkv, const int32_t *pos, const float *inv_freq, int64_t T, int nh, int nkv, int hd,
                        cudaStream_t st) {
    const int half = hd / 2;
    unsigned block = (unsigned)((half + 31) / 32 * 32);
    if (block > 256) block = 256;
    LAUNCH_KERNEL(rope_kernel, (unsigned)T, block, 0, st)(qkv, pos, inv_freq, nh + nkv, hd, (int64_t)(nh + 2 * nkv) * hd);
}

#endif
