// swiglu.h: g (T,I) = silu(g) * u, the Llama MLP's gated activation.
#ifndef ARMORM_CPU_SWIGLU_H
#define ARMORM_CPU_SWIGLU_H

#include <math.h>
#include <stdint.h>
#include "cpu_features.h"

// g[i] = silu(g[i]) * u[i] for i in [0, n), AVX-512 (swiglu_avx512.c)
void swiglu_avx512(float *g, const float *u, int64_t n);

// Elementwise, so any split across threads gives the same bits. The avx512
// paths use a vector exp (vmath_avx512.h); the others libm's expf.
static void swiglu(float *g, const float *u, int64_t n, int nthreads, int kernel) {
    if (kernel >= ARM_KERNEL_AVX512) {
        const int64_t chunk = 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i += chunk) swiglu_avx512(g + i, u + i, n - i < chunk ? n - i : chunk);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = (x / (1.0f + expf(-x))) * u[i];
    }
}

#endif
