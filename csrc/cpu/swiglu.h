// swiglu.h: g (T,I) = silu(g) * u, the Llama MLP's gated activation.
#ifndef ARMORM_CPU_SWIGLU_H
#define ARMORM_CPU_SWIGLU_H

#include <math.h>
#include <stdint.h>
#include "cpu_features.h"
#include "attention_simd.h"

// Elementwise, so any split across threads gives the same bits. The avx512
// paths use a vector exp (attention_avx512.c); the others libm's expf.
static void swiglu(float *g, const float *u, int64_t n, int nthreads, int kernel) {
    if (kernel >= ARM_KERNEL_AVX512) {
        const int64_t chunk = 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i += chunk) arm_swiglu_avx512(g + i, u + i, n - i < chunk ? n - i : chunk);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = (x / (1.0f + expf(-x))) * u[i];
    }
}

#endif
