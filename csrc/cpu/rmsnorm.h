// rmsnorm.h: out (H) = w * x / sqrt(mean(x^2) + eps) for one row, and the
// residual add of a normed row. (Families whose norms scale by (1 + w) hold
// 1 + w as w: model.c adds the one at load.)
// The mean is accumulated in double so long rows lose no precision, in 8
// fixed lanes (element i feeds lane i % 8, lanes summed pairwise) so the loop
// vectorises and is not one long chain of dependent adds; the order is the
// same for every row, batch and thread count.
#ifndef ARMORM_CPU_RMSNORM_H
#define ARMORM_CPU_RMSNORM_H

#include <math.h>
#include <stdint.h>

// 1 / sqrt(mean(x^2) + eps) of one row.
static inline float rms_inv(const float *x, int64_t H, float eps) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= H; i += 8)
        for (int j = 0; j < 8; j++) l[j] += (double)x[i + j] * x[i + j];
    for (int j = 0; i < H; i++, j++) l[j] += (double)x[i] * x[i];
    const double ss = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    return (float)(1.0 / sqrt(ss / (double)H + (double)eps));
}

// In place (out == x) is fine: the row's scale is computed before any write.
static void rmsnorm_row(float *out, const float *x, const float *w, int64_t H, float eps) {
    const float inv = rms_inv(x, H, eps);
    for (int64_t c = 0; c < H; c++) out[c] = w[c] * (x[c] * inv);
}

// out, x are (T,H). Also serves the per-head q/k norms: q (T, nh*hd) is a
// (T*nh, hd) matrix of rows.
static void rmsnorm(float *out, const float *x, const float *w, int64_t T, int64_t H, float eps,
                    int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) rmsnorm_row(out + t * H, x + t * H, w, H, eps);
}

// x (T,H) += rmsnorm(y): a sublayer's output normed before the residual add
// (Gemma-2's post-attention and post-feedforward norms).
static void rmsnorm_add(float *x, const float *y, const float *w, int64_t T, int64_t H, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *yr = y + t * H;
        float *xr = x + t * H;
        const float inv = rms_inv(yr, H, eps);
        for (int64_t c = 0; c < H; c++) xr[c] = xr[c] + w[c] * (yr[c] * inv);
    }
}

#endif
