// attention_check.c (test program, tests/test_avx512_emulated.py): the attention of csrc/cpu/attention.h on the
// portable path and on the avx512 path (attention_avx512.c, built against the emulating immintrin.h shim).
// For each shape, N sequences P + c_i scored as N full sequences and as one prefix plus N continuations
// (Batch.parent, csrc/prefix.h) must give bit-identical rows; the two paths must agree to fp32 rounding.
// Shapes include sliding windows with soft-capping (AttnParams, model.h). Prints one line per case:
// "<kernel> <nh> <nkv> <hd> <P> <N> window=<w> identical=<0|1>", then "max_path_diff=<x>".
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cpu/attention.h"

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((*s >> 8) / 16777216.0f) * 4.0f - 2.0f;
}

#define MAXB 16

// Scores the case both ways on `kernel`; writes the shared layout's output to out_shared (Ts x nh*hd).
static int run(int kernel, int nh, int nkv, int hd, int P, const int *cl, int N, const AttnParams *ap,
               float *out_shared) {
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    int64_t Tf = 0, Ts = P;
    for (int i = 0; i < N; i++) Tf += P + cl[i], Ts += cl[i];
    float *qf = malloc(sizeof(float) * Tf * qs), *kf = malloc(sizeof(float) * Tf * ks);
    float *vf = malloc(sizeof(float) * Tf * ks), *of = malloc(sizeof(float) * Tf * qs);
    float *qh = malloc(sizeof(float) * Ts * qs), *kh = malloc(sizeof(float) * Ts * ks);
    float *vh = malloc(sizeof(float) * Ts * ks), *oh = out_shared;
    unsigned seed = 7;
    for (int64_t i = 0; i < Ts * qs; i++) qh[i] = frand(&seed);
    for (int64_t i = 0; i < Ts * ks; i++) kh[i] = frand(&seed), vh[i] = frand(&seed);
    int64_t cuf[MAXB + 1] = {0}, cus[MAXB + 2] = {0, P}, offf[MAXB] = {0}, offs[MAXB + 1] = {0};
    int32_t par[MAXB + 1] = {-1};
    for (int64_t i = 0, dst = 0, src = P; i < N; i++) {  // full layout: copies of the prefix rows, then own rows
        const int64_t c = cl[i];
        memcpy(qf + dst * qs, qh, sizeof(float) * P * qs);
        memcpy(kf + dst * ks, kh, sizeof(float) * P * ks);
        memcpy(vf + dst * ks, vh, sizeof(float) * P * ks);
        memcpy(qf + (dst + P) * qs, qh + src * qs, sizeof(float) * c * qs);
        memcpy(kf + (dst + P) * ks, kh + src * ks, sizeof(float) * c * ks);
        memcpy(vf + (dst + P) * ks, vh + src * ks, sizeof(float) * c * ks);
        dst += P + c, src += c;
        cuf[i + 1] = dst, cus[i + 2] = src, offs[i + 1] = P, par[i + 1] = 0;
    }
    const SeqIndex full = {cuf, offf, NULL}, shared = {cus, offs, par};
    int same = !attention(of, qf, kf, vf, &full, N, nh, nkv, hd, ap, 1, kernel, NULL, NULL) &&
               !attention(oh, qh, kh, vh, &shared, N + 1, nh, nkv, hd, ap, 2, kernel, NULL, NULL);
    for (int64_t i = 0, dst = 0, src = P; i < N && same; i++) {
        same = !memcmp(of + dst * qs, oh, sizeof(float) * P * qs) &&
               !memcmp(of + (dst + P) * qs, oh + src * qs, sizeof(float) * cl[i] * qs);
        dst += P + cl[i], src += cl[i];
    }
    printf("%s %d %d %d %d %d window=%lld identical=%d\n", kernel ? "avx512" : "portable", nh, nkv, hd, P, N,
           (long long)ap->window, same);
    free(qf), free(kf), free(vf), free(of), free(qh), free(kh), free(vh);
    return same;
}

int main(void) {
    static const int conts[] = {1, 17, 64, 65, 130, 3};
    static const int shapes[][6] = {  // nh, nkv, hd, P, N, sliding window (0: none; soft-capping with it)
        {8, 2, 16, 150, 6, 0}, {2, 1, 24, 1, 6, 0}, {2, 2, 80, 200, 4, 0}, {4, 4, 16, 64, 6, 0},
        {8, 2, 16, 1000, 3, 0}, {4, 2, 32, 150, 6, 37}, {2, 1, 24, 100, 6, 70}};
    double worst = 0.0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int *c = shapes[s];
        int64_t Ts = c[3];
        for (int i = 0; i < c[4]; i++) Ts += conts[i];
        const int64_t n = Ts * c[0] * c[2];
        float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
        const AttnParams ap = {1.0f / sqrtf((float)c[2]), c[5] ? 3.0f : 0.0f, c[5]};
        run(ARM_KERNEL_PORTABLE, c[0], c[1], c[2], c[3], conts, c[4], &ap, a);
        run(ARM_KERNEL_AVX512, c[0], c[1], c[2], c[3], conts, c[4], &ap, b);
        for (int64_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - b[i]));
        free(a), free(b);
    }
    printf("max_path_diff=%g\n", worst);
    return 0;
}
