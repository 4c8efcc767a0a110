// k_convert.cuh: weight conversion while uploading, and bias adds.
#ifndef ARMORM_CUDA_K_CONVERT_CUH
#define ARMORM_CUDA_K_CONVERT_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

// dst (n) bf16 = src (n) stored as f32 (dtype 0), bf16 (1) or f16 (2).
static __global__ void to_bf16_kernel(bf16 *dst, const void *src, int dtype, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v;
        if (dtype == 0) v = ((const float *)src)[i];
        else if (dtype == 1) v = bf2f(((const bf16 *)src)[i]);
        else v = __half2float(((const __half *)src)[i]);
        dst[i] = f2bf(v);
    }
}

static void launch_to_bf16(bf16 *dst, const void *src, int dtype, int64_t n, cudaStream_t st) {
    const CudaLaunch l = cuda_launch_elementwise(n, 4);
    LAUNCH_KERNEL(to_bf16_kernel, l.grid_x, l.block, 0, st)(dst, src, dtype, n);
}

// y (T, N) += bias (N); y in bf16 (projection outputs) or f32 (residual stream).
template <typename Y>
static __global__ void add_bias_kernel(Y *y, const float *bias, int64_t T, int N) {
    const int64_t n = T * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = (float)y[i] + bias[i % N];
        store_as(y + i, v);
    }
}

template <typename Y>
static void launch_add_bias(Y *y, const float *bias, int64_t T, int N, cudaStream_t st) {
    const CudaLaunch l = cuda_launch_elementwise(T * N, 1);
    LAUNCH_KERNEL(add_bias_kernel<Y>, l.grid_x, l.block, 0, st)(y, bias, T, N);
}

#endif
