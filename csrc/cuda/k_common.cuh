// k_common.cuh: device helpers shared by the kernels (conversions, reductions).
#ifndef ARMORM_CUDA_K_COMMON_CUH
#define ARMORM_CUDA_K_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// The two CUDA spellings host C++ cannot parse, as macros: on the GPU they are
// exactly `kernel<<<grid, block, smem, stream>>>` and `extern __shared__ type
// name[]`; the CPU emulation of the kernels (tests/cuda_emu, which defines
// ARMORM_CUDA_EMU) supplies its own, so the kernel sources run there unchanged.
#ifndef ARMORM_CUDA_EMU
#define LAUNCH_KERNEL(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

static __device__ __forceinline__ float bf2f(bf16 v) { return __bfloat162float(v); }
// round to nearest even, as torch's .to(bfloat16)
static __device__ __forceinline__ bf16 f2bf(float v) { return __float2bfloat16_rn(v); }

// Stores an fp32 value as the output type of a kernel.
static __device__ __forceinline__ void store_as(float *p, float v) { *p = v; }
static __device__ __forceinline__ void store_as(bf16 *p, float v) { *p = f2bf(v); }

template <typename T>
static __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
static __device__ __forceinline__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the total. `red` is shared scratch of 32 elements; the
// trailing barrier lets a caller reuse it at once.
template <typename T>
static __device__ __forceinline__ T block_sum(T v, T *red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (T)0;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

template <typename T>
static __device__ __forceinline__ T block_max(T v, T *red, T lowest) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : lowest;
    v = warp_max(v);
    __syncthreads();
    return v;
}

#endif
