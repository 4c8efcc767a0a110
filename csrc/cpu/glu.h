// glu.h: the MLP's gated activation, g (T,I) = act(g) * u, for both of the
// activations the families use (Config.hidden_act):
//   SwiGLU (Llama, Qwen):  silu(x)      = x / (1 + exp(-x))
//   GeGLU (Gemma-2):       gelu_tanh(x) = x / (1 + exp(-z)), z = 2 sqrt(2/pi) (x + 0.044715 x^3)
// The second is transformers' "gelu_pytorch_tanh", 0.5 x (1 + tanh(z / 2)),
// written without the cancellation of 1 + tanh for large negative x; the fp32
// results differ from that formula's by rounding only. Both are x times a
// sigmoid, so one loop serves them. Elementwise, so any split across threads
// gives the same bits. The avx512 paths run glu_avx512.c (the vector exp of
// vmath_avx512.h), the others libm's expf. The CUDA twin is
// csrc/cuda/k_glu.cuh.
#ifndef ARMORM_CPU_GLU_H
#define ARMORM_CPU_GLU_H

#include <math.h>
#include <stdint.h>
#include "../model.h"
#include "cpu_features.h"

#define GELU_TANH_2K 1.5957691216057308f  // 2 sqrt(2 / pi)
#define GELU_TANH_C 0.044715f

// g[i] = act(g[i]) * u[i] for i in [0, n), AVX-512 (glu_avx512.c)
void glu_avx512(float *g, const float *u, int64_t n, int act);

// The sigmoid's argument for activation `act`.
static inline float glu_z(float x, int act) {
    return act == ACT_GELU_TANH ? GELU_TANH_2K * (x + GELU_TANH_C * x * x * x) : x;
}

static void glu(float *g, const float *u, int64_t n, int act, int nthreads, int kernel) {
    if (kernel >= ARM_KERNEL_AVX512) {
        const int64_t chunk = 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i += chunk) glu_avx512(g + i, u + i, n - i < chunk ? n - i : chunk, act);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = (x / (1.0f + expf(-glu_z(x, act)))) * u[i];
    }
}

#endif
