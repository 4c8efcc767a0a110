// swiglu.h: g (T,I) = silu(g) * u, the Llama MLP's gated activation.
#ifndef ARMORM_CPU_SWIGLU_H
#define ARMORM_CPU_SWIGLU_H

#include <math.h>
#include <stdint.h>

static void swiglu(float *g, const float *u, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = (x / (1.0f + expf(-x))) * u[i];
    }
}

#endif
