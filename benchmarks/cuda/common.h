// common.h: shared helpers of the llm.c-style kernel harnesses in this folder.
//
// Each harness: the kernel's CPU reference (reference.h, shared with the CPU
// emulation in tests/cuda_emu), one or more numbered kernel versions (the
// highest is the one csrc/cuda ships), a correctness check against the
// reference, then a timing loop. Usage: ./<harness> [kernel_version].
// These abort on any CUDA error: they are dev tools, not library code.
#ifndef ARMORM_BENCH_CUDA_COMMON_H
#define ARMORM_BENCH_CUDA_COMMON_H

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"      // fill_uniform, host_bf16_round, validate
#include "reference.h"  // the CPU reference of every kernel

#define CHECK(call)                                                                                    \
    do {                                                                                               \
        cudaError_t err_ = (call);                                                                     \
        if (err_ != cudaSuccess) {                                                                     \
            fprintf(stderr, "CUDA error at %s:%d: %s: %s\n", __FILE__, __LINE__, #call,              \
                    cudaGetErrorString(err_));                                                         \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)

static void to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = __float2bfloat16_rn(src[i]);
}

static void from_bf16(float *dst, const __nv_bfloat16 *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = __bfloat162float(src[i]);
}

template <typename T>
static T *to_device(const T *h, int64_t n) {
    T *d;
    CHECK(cudaMalloc(&d, sizeof(T) * (size_t)n));
    CHECK(cudaMemcpy(d, h, sizeof(T) * (size_t)n, cudaMemcpyHostToDevice));
    return d;
}

// Mean milliseconds of `launch()` over `iters` runs after a warm-up.
template <typename F>
static float time_ms(F launch, int iters) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    launch();
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < iters; i++) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float ms = 0.0f;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(b));
    return ms / (float)iters;
}

static int kernel_arg(int argc, char **argv, int dflt) { return argc > 1 ? atoi(argv[1]) : dflt; }

#endif
