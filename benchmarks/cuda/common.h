// common.h: shared helpers of the llm.c-style kernel harnesses in this folder.
//
// Each harness: a CPU reference, one or more numbered kernel versions (the
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

#define CHECK(call)                                                                                    \
    do {                                                                                               \
        cudaError_t err_ = (call);                                                                     \
        if (err_ != cudaSuccess) {                                                                     \
            fprintf(stderr, "CUDA error at %s:%d: %s: %s\n", __FILE__, __LINE__, #call,              \
                    cudaGetErrorString(err_));                                                         \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)

// Deterministic uniform floats in [-scale, scale) (xorshift; no libc rand state).
static void fill_uniform(float *x, int64_t n, float scale, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x[i] = ((float)(s >> 40) / (float)(1ull << 24) * 2.0f - 1.0f) * scale;
    }
}

// Host bf16 round trip (round to nearest even), so the CPU reference sees the values the GPU reads.
static float host_bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

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

// max |got - ref| / max |ref| over n values; prints it and whether it is within tol. Returns 0 when ok.
static int validate(const char *name, const float *got, const float *ref, int64_t n, double tol) {
    double md = 0.0, mr = 0.0;
    int64_t worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - ref[i]);
        if (!(d <= md)) { md = d; worst = i; }  // NaN counts as worst
        if (fabs((double)ref[i]) > mr) mr = fabs((double)ref[i]);
    }
    const double rel = md / (mr > 0 ? mr : 1.0);
    const int ok = rel <= tol;
    printf("%-28s max|err| %.3e  rel %.3e (tol %.1e) at %lld: got %.6f ref %.6f  %s\n", name, md, rel, tol,
           (long long)worst, got[worst], ref[worst], ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
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
