// check.h: host-only helpers shared by the kernel harnesses in this folder and by
// the CPU emulation of the kernels (tests/cuda_emu): deterministic inputs, the
// host bf16 rounding, and the comparison against a reference.
//
// No CUDA header here: both nvcc and a plain host C++ compiler build it.
#ifndef ARMORM_BENCH_CUDA_CHECK_H
#define ARMORM_BENCH_CUDA_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

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

// bf16 bits of f, rounded to nearest even (NaN stays NaN), as torch's .to(bfloat16).
static uint16_t host_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float host_bf16_float(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Host bf16 round trip, so a CPU reference sees the values the GPU reads.
static float host_bf16_round(float f) { return host_bf16_float(host_bf16_bits(f)); }

// max |got - ref| / max |ref| over n values; prints it and whether it is within tol.
// Returns 0 when ok. A NaN or inf in `got` where `ref` is finite (an unwritten or
// overflowed output) always fails, wherever it sits: the worst element reported is
// the first such one, else the largest finite difference.
static int validate(const char *name, const float *got, const float *ref, int64_t n, double tol) {
    double md = 0.0, mr = 0.0;
    int64_t worst = 0, bad = 0, first_bad = -1;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - ref[i]);
        if (!isfinite(d)) {
            if (first_bad < 0) first_bad = i;
            bad++;
        } else if (d > md) {
            md = d;
            worst = i;
        }
        if (isfinite(ref[i]) && fabs((double)ref[i]) > mr) mr = fabs((double)ref[i]);
    }
    if (first_bad >= 0) worst = first_bad;
    const double rel = md / (mr > 0 ? mr : 1.0);
    const int ok = bad == 0 && rel <= tol;
    printf("%-36s max|err| %.3e  rel %.3e (tol %.1e)", name, md, rel, tol);
    if (bad) printf("  %lld non-finite", (long long)bad);
    if (n > 0) printf(" at %lld: got %.6g ref %.6g", (long long)worst, got[worst], ref[worst]);
    printf("  %s\n", ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
}

#endif
