// k_embedding.cuh: x (T, H) f32 = rows of the bf16 embedding table at the
// token ids (bounds-checked on the host by batch_validate).
#ifndef ARMORM_CUDA_K_EMBEDDING_CUH
#define ARMORM_CUDA_K_EMBEDDING_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

// One block per token. emb is (V, H) bf16.
static __global__ void embedding_kernel(float *x, const int32_t *tokens, const bf16 *emb, int H) {
    const int64_t t = blockIdx.x;
    const bf16 *row = emb + (int64_t)tokens[t] * H;
    float *xr = x + t * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) xr[i] = bf2f(row[i]);
}

static void launch_embedding(float *x, const int32_t *tokens, const bf16 *emb, int64_t T, int H, cudaStream_t st) {
    const CudaLaunch l = cuda_launch_rows(T, H);
    LAUNCH_KERNEL(embedding_kernel, l.grid_x, l.block, 0, st)(x, tokens, emb, H);
}

#endif
