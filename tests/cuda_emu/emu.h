// emu.h: a CPU stand-in for the part of CUDA the kernels in csrc/cuda use, so
// the unchanged kernel sources compile as host C++ and run on the CPU, under
// ASan/UBSan, against the CPU references of benchmarks/cuda/reference.h.
//
// What it models (and so what a test through it can catch):
//   * a grid runs block by block; a block's threads are fibers on one OS thread,
//     each with its own stack, switched only at __syncthreads and at warp
//     collectives. A thread runs as far as it can before it waits, so a missing
//     barrier lets one warp race ahead of the others and shows up as wrong data.
//   * __syncthreads is a real barrier over the block's threads; one that not
//     every thread reaches (a thread exits or waits elsewhere) is reported, as
//     is a full-mask warp collective in a warp with an exited lane.
//   * __shfl_*_sync, mma.sync.m16n8k16 (bf16 -> f32) and ldmatrix exchange data
//     between the 32 lanes of a warp exactly as the PTX ISA's fragment layouts
//     document them (emu.cpp), written independently of the kernels.
//   * vector types carry CUDA's alignment (uint4/float4: 16 bytes), so UBSan
//     reports a misaligned vector access that would fault on the GPU; device
//     buffers are plain heap blocks of exactly the requested size, so ASan
//     reports any access past their ends.
//   * dynamic shared memory is filled with NaN bytes before every block.
// What it does not model: timing, memory ordering between blocks (blocks run
// one after another), bank conflicts, register pressure, the exact rounding
// order inside a tensor-core instruction (emulated in double, rounded once).
#ifndef ARMORM_CUDA_EMU_H
#define ARMORM_CUDA_EMU_H

#define ARMORM_CUDA_EMU 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <utility>

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one after another, so one static copy serves each block in turn.
#define __shared__ static

// ---- vector and launch types --------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

typedef struct CUstream_st *cudaStream_t;
typedef enum { cudaSuccess = 0, cudaErrorLaunchFailure = 4 } cudaError_t;

// Device-side min/max, as CUDA's overloads.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }

// ---- bf16 / f16 ---------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    operator float() const;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;  // x at the lower address: the low half of the 32-bit pair
};
struct __half {
    uint16_t bits;
};

float __bfloat162float(__nv_bfloat16 v);
__nv_bfloat16 __float2bfloat16_rn(float v);
__nv_bfloat162 __floats2bfloat162_rn(float lo, float hi);
float __half2float(__half v);
__half __float2half_rn(float v);
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }

// ---- the emulated machine -----------------------------------------------------------------
namespace emu {

struct Config {
    dim3 grid, block;
    size_t smem;  // dynamic shared memory bytes
};

// Runs `body` once per thread of every block of the grid (see the file comment).
void run_grid(const Config &cfg, const std::function<void()> &body);

const uint3 &thread_idx();
const uint3 &block_idx();
const dim3 &block_dim();
const dim3 &grid_dim();
void *dynamic_shared();
void sync_block();

enum ShflKind { SHFL_XOR, SHFL_IDX, SHFL_DOWN, SHFL_UP };
// Exchanges `n` bytes of *val across the warp: the calling lane receives the
// value of its source lane (PTX shfl.sync semantics; full mask only).
void shfl_bytes(unsigned mask, void *val, size_t n, ShflKind kind, int arg, int width);

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = A * B + d for the warp.
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16: `num` registers from the rows
// whose addresses lanes 0 .. 8*num-1 give.
void ldmatrix(uint32_t *r, int num, bool trans, const void *row_addr);

// A kernel launch: converts the arguments to the kernel's parameter types once
// (as a launch does), then every thread calls the kernel with its own copies.
template <class... P>
struct Launch {
    void (*kernel)(P...);
    Config cfg;
    template <class... A>
    void operator()(A &&...args) const {
        const std::tuple<P...> params(std::forward<A>(args)...);
        void (*k)(P...) = kernel;
        run_grid(cfg, [&] { std::apply(k, params); });
    }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
    return Launch<P...>{kernel, Config{grid, block, smem}};
}

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define __syncthreads() emu::sync_block()
#define LAUNCH_KERNEL(kernel, grid, block, smem, stream) emu::launch(kernel, grid, block, smem, stream)
#define EXTERN_SHARED(type, name) type *name = static_cast<type *>(emu::dynamic_shared())

template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    emu::shfl_bytes(mask, &v, sizeof v, emu::SHFL_XOR, lane_mask, width);
    return v;
}
template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    emu::shfl_bytes(mask, &v, sizeof v, emu::SHFL_IDX, src_lane, width);
    return v;
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::shfl_bytes(mask, &v, sizeof v, emu::SHFL_DOWN, (int)delta, width);
    return v;
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::shfl_bytes(mask, &v, sizeof v, emu::SHFL_UP, (int)delta, width);
    return v;
}

// The inline-PTX hooks the kernels call under ARMORM_CUDA_EMU.
static inline void emu_mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::mma_m16n8k16_bf16(d, a, b0, b1);
}
template <int N>
static inline void emu_ldmatrix_x(uint32_t (&r)[N], const void *row_addr) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    emu::ldmatrix(r, N, false, row_addr);
}
template <int N>
static inline void emu_ldmatrix_x_trans(uint32_t (&r)[N], const void *row_addr) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    emu::ldmatrix(r, N, true, row_addr);
}

#endif
