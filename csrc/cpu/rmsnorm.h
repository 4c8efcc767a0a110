// rmsnorm.h: out (H) = w * x / sqrt(mean(x^2) + eps) for one row.
// The mean is accumulated in double so long rows lose no precision.
#ifndef ARMORM_CPU_RMSNORM_H
#define ARMORM_CPU_RMSNORM_H

#include <math.h>
#include <stdint.h>

static void rmsnorm_row(float *out, const float *x, const float *w, int64_t H, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < H; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / (double)H + (double)eps));
    for (int64_t i = 0; i < H; i++) out[i] = w[i] * (x[i] * inv);
}

// out, x are (T,H)
static void rmsnorm(float *out, const float *x, const float *w, int64_t T, int64_t H, float eps,
                    int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) rmsnorm_row(out + t * H, x + t * H, w, H, eps);
}

#endif
