// k_head.cuh: the reward heads on the final-norm states (docs/model.md, 'ArmoRM head').
//
// The heads are tiny (K = 19 objectives, a 3 x 1024 gating MLP) next to the
// backbone, so these kernels aim at exactness, not speed: fp32 weights and
// inputs, fp64 accumulation, like the CPU head (csrc/cpu/head.h).
//   rewards (B, K)       = hidden (B, H) @ W_reg^T
//   gating logits (B, K) = MLP(prompt): n_hidden x (Linear, ReLU), Linear
//   gating (B, K)        = softmax(logits / temperature) * logit_scale
//   score (B)            = sum_j gating[j] * (rewards @ T)[j]
// SequenceClassification: logits (B, NL) = hidden @ W_score^T, score = logits[:, 0].
#ifndef ARMORM_CUDA_K_HEAD_CUH
#define ARMORM_CUDA_K_HEAD_CUH

#include <math.h>
#include "k_common.cuh"
#include "backend_cuda.h"

// out (B, N) = x (B, Kin) @ W^T + bias, W (N, Kin), optional ReLU. One warp per output.
static __global__ void head_linear_kernel(float *out, const float *x, const float *W, const float *bias, int B, int N,
                                          int Kin, int relu) {
    const int64_t o = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (o >= (int64_t)B * N) return;  // whole warps leave together: o is uniform within a warp
    const int b = (int)(o / N), n = (int)(o % N);
    const float *xr = x + (int64_t)b * Kin, *wr = W + (int64_t)n * Kin;
    double s = 0.0;
    for (int k = lane; k < Kin; k += 32) s += (double)wr[k] * xr[k];
    s = warp_sum(s);
    if (lane == 0) {
        float v = (float)(s + (bias ? (double)bias[n] : 0.0));
        out[o] = relu && v < 0.0f ? 0.0f : v;
    }
}

static void launch_head_linear(float *out, const float *x, const float *W, const float *bias, int B, int N, int Kin,
                               int relu, cudaStream_t st) {
    const CudaLaunch l = cuda_launch_head_linear(B, N);
    LAUNCH_KERNEL(head_linear_kernel, l.grid_x, l.block, 0, st)(out, x, W, bias, B, N, Kin, relu);
}

// One block per sequence: the gating softmax and the score.
// logits, rewards (B, K); transform (K, K); gating (B, K) and score (B) out.
static __global__ void armorm_finish_kernel(float *gating, float *score, const float *logits, const float *rewards,
                                            const float *transform, int K, float temperature, float logit_scale) {
    __shared__ double red[32];
    const int b = blockIdx.x;
    const float *z = logits + (int64_t)b * K, *r = rewards + (int64_t)b * K;
    float *gt = gating + (int64_t)b * K;
    double mx = -INFINITY;
    for (int k = threadIdx.x; k < K; k += blockDim.x) mx = fmax(mx, (double)(z[k] / temperature));
    mx = block_max(mx, red, (double)-INFINITY);
    double zs = 0.0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) zs += exp((double)(z[k] / temperature) - mx);
    zs = block_sum(zs, red);
    for (int k = threadIdx.x; k < K; k += blockDim.x)
        gt[k] = (float)(exp((double)(z[k] / temperature) - mx) / zs * logit_scale);
    __syncthreads();  // gating values written above are read by other threads below
    double s = 0.0;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
        double adj = 0.0;  // (rewards @ T)[j]
        for (int k = 0; k < K; k++) adj += (double)r[k] * transform[(int64_t)k * K + j];
        s += (double)gt[j] * adj;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) score[b] = (float)s;
}

static void launch_armorm_finish(float *gating, float *score, const float *logits, const float *rewards,
                                 const float *transform, int B, int K, float temperature, float logit_scale,
                                 cudaStream_t st) {
    LAUNCH_KERNEL(armorm_finish_kernel, (unsigned)B, 128, 0, st)(gating, score, logits, rewards, transform, K, temperature,
                                                     logit_scale);
}

// score (B) = logits (B, NL)[:, 0]
static __global__ void first_column_kernel(float *score, const float *logits, int B, int NL) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < B) score[b] = logits[(int64_t)b * NL];
}

static void launch_first_column(float *score, const float *logits, int B, int NL, cudaStream_t st) {
    LAUNCH_KERNEL(first_column_kernel, (unsigned)((B + 255) / 256), 256, 0, st)(score, logits, B, NL);
}

#endif
