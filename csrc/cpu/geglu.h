// geglu.h: g (T,I) = gelu_tanh(g) * u, the Gemma MLP's gated activation.
//
// gelu_tanh(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)
// (transformers' "gelu_pytorch_tanh"). Written here as x / (1 + exp(-2u)),
// u = k (x + 0.044715 x^3), which is the same function (1 + tanh(u) =
// 2 / (1 + exp(-2u))) without the cancellation of 1 + tanh(u) for large
// negative x; the fp32 results differ from the reference's formula by
// rounding only. Elementwise, so any split across threads gives the same
// bits. The avx512 paths use the vector exp of attention_avx512.c, the others
// libm's expf, as swiglu.h does.
#ifndef ARMORM_CPU_GEGLU_H
#define ARMORM_CPU_GEGLU_H

#include <math.h>
#include <stdint.h>
#include "cpu_features.h"
#include "attention_simd.h"

#define GELU_TANH_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_TANH_C 0.044715f

static inline float gelu_tanh(float x) {
    const float u = GELU_TANH_K * (x + GELU_TANH_C * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
}

static void geglu(float *g, const float *u, int64_t n, int nthreads, int kernel) {
    if (kernel >= ARM_KERNEL_AVX512) {
        const int64_t chunk = 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i += chunk) arm_geglu_avx512(g + i, u + i, n - i < chunk ? n - i : chunk);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) g[i] = gelu_tanh(g[i]) * u[i];
}

#endif
