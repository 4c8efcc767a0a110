// Standalone tests of csrc/cpu/gemm_driver.c's prepacked W (gemm.h): for
// kernels of one and of two k elements per packed step (the latter is the
// layout of the avx512-bf16 kernel, which this test needs no AVX-512 to
// exercise), W packed whole with gemm_pack_panel and handed to gemm_run gives
// the same bits as gemm_run packing it block by block, for shapes with panel
// tails, k tails, one and many k blocks, any thread count, bias and
// accumulation. The packed buffer is allocated at exactly the size gemm.h
// states, so ASan catches a read past it.
//
// The kernels here are plain C stand-ins with the driver's contract: pack_w
// writes [round16(ceil(kc/kstep))][nw] steps (zero past W's rows and k), and the
// micro-kernel sums the steps in order.
#include "../../csrc/cpu/gemm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_pass, g_fail;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            g_pass++;                                                        \
        } else {                                                             \
            g_fail++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
            fprintf(stderr, __VA_ARGS__);                                    \
            fputc('\n', stderr);                                             \
        }                                                                    \
    } while (0)

#define MR 3
#define NW 16
#define KC1 32  // k per block, one element per step
#define KC2 64  // k per block, two elements (16-bit halves) per step

typedef struct {
    const float *data;
    int64_t rows, cols;
} Mat;

// the high 16 bits of a float (truncated to bf16), for the two-element steps
static uint32_t half_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u >> 16;
}
static float half_value(uint32_t h) {
    uint32_t u = h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// element k of row t of m, zero outside it
static float at(const Mat *m, int64_t t, int64_t k) { return t < m->rows && k < m->cols ? m->data[t * m->cols + k] : 0; }

// one step of kstep elements at k of row r, as a 4-byte word
static uint32_t step_word(const Mat *m, int64_t r, int64_t k, int kstep) {
    if (kstep == 1) {
        const float f = at(m, r, k);
        uint32_t u;
        memcpy(&u, &f, 4);
        return u;
    }
    return half_bits(at(m, r, k)) | half_bits(at(m, r, k + 1)) << 16;
}

static void pack_x(int kstep, void *dst, const void *x, int64_t T, int64_t K, int64_t t0) {
    const Mat m = {x, T, K};
    uint32_t *d = dst;
    for (int64_t s = 0; s < (K + kstep - 1) / kstep; s++)
        for (int r = 0; r < MR; r++) d[s * MR + r] = step_word(&m, t0 + r, s * kstep, kstep);
}

static void pack_w(int kstep, void *dst, const void *w, int64_t n0, int64_t k0, int64_t kc) {
    const Mat *m = w;
    uint32_t *d = dst;
    const int64_t steps = (kc + kstep - 1) / kstep, rounded = (steps + 15) / 16 * 16;
    for (int64_t s = 0; s < rounded; s++)
        for (int j = 0; j < NW; j++) {
            // past this block's kc: zero
            // (an odd kc is W's last block: the element past it is past K, read as zero)
            d[s * NW + j] = s < steps ? step_word(m, n0 + j, k0 + s * kstep, kstep) : 0;
        }
}

static float step_dot(uint32_t x, uint32_t w, int kstep) {
    if (kstep == 1) {
        float a, b;
        memcpy(&a, &x, 4);
        memcpy(&b, &w, 4);
        return a * b;
    }
    return half_value(x & 0xffffu) * half_value(w & 0xffffu) + half_value(x >> 16) * half_value(w >> 16);
}

static void ukr(int kstep, float *c, int64_t ldc, const void *xp, const void *wp, int64_t ks, int first) {
    const uint32_t *x = xp, *w = wp;
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NW; j++) {
            float a = first ? 0.0f : c[r * ldc + j];
            for (int64_t s = 0; s < ks; s++) a += step_dot(x[s * MR + r], w[s * NW + j], kstep);
            c[r * ldc + j] = a;
        }
}

static void pack_x1(void *d, const void *x, int64_t T, int64_t K, int64_t t0) { pack_x(1, d, x, T, K, t0); }
static void pack_x2(void *d, const void *x, int64_t T, int64_t K, int64_t t0) { pack_x(2, d, x, T, K, t0); }
static void pack_w1(void *d, const void *w, int64_t n0, int64_t k0, int64_t kc) { pack_w(1, d, w, n0, k0, kc); }
static void pack_w2(void *d, const void *w, int64_t n0, int64_t k0, int64_t kc) { pack_w(2, d, w, n0, k0, kc); }
static void ukr1(float *c, int64_t ldc, const void *x, const void *w, int64_t ks, int first) {
    ukr(1, c, ldc, x, w, ks, first);
}
static void ukr2(float *c, int64_t ldc, const void *x, const void *w, int64_t ks, int first) {
    ukr(2, c, ldc, x, w, ks, first);
}

static const GemmKernel K1 = {"c-f32", MR, NW, KC1, 1, pack_x1, pack_w1, ukr1};
static const GemmKernel K2 = {"c-pairs", MR, NW, KC2, 2, pack_x2, pack_w2, ukr2};

static float *random_floats(int64_t n, unsigned seed) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!p) abort();
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (float)((int)(seed >> 9 & 0xffff) - 32768) / 8192.0f;
    }
    return p;
}

static void check_shape(const GemmKernel *g, int64_t T, int64_t N, int64_t K, int nthreads, int with_bias, int acc) {
    float *x = random_floats(T * K, 1u + (unsigned)(T * 31 + K));
    float *wd = random_floats(N * K, 2u + (unsigned)(N * 17 + K));
    float *bias = with_bias ? random_floats(N, 3u) : NULL;
    float *base = random_floats(T * N, 4u);
    const Mat w = {wd, N, K};
    const int64_t npanels = (N + g->nw - 1) / g->nw, pw = gemm_panel_words(g, K);
    CHECK(pw == ((K + g->kstep - 1) / g->kstep + 15) / 16 * 16 * g->nw, "%s K %lld: %lld words", g->name,
          (long long)K, (long long)pw);
    uint32_t *packed = aligned_alloc(64, (size_t)(npanels * pw) * 4);  // exactly the stated size
    float *a = malloc((size_t)(T * N) * sizeof(float)), *b = malloc((size_t)(T * N) * sizeof(float));
    if (!packed || !a || !b) abort();
    for (int64_t p = 0; p < npanels; p++) gemm_pack_panel(g, packed + p * pw, &w, p * g->nw, K);
    memcpy(a, base, (size_t)(T * N) * sizeof(float));
    memcpy(b, base, (size_t)(T * N) * sizeof(float));
    const int ra = gemm_run(g, a, x, &w, NULL, T, N, K, bias, acc, nthreads);
    const int rb = gemm_run(g, b, x, NULL, packed, T, N, K, bias, acc, nthreads);  // w never read
    CHECK(ra == 0 && rb == 0, "%s: gemm_run failed", g->name);
    CHECK(memcmp(a, b, (size_t)(T * N) * sizeof(float)) == 0,
          "%s T %lld N %lld K %lld threads %d bias %d acc %d: prepacked differs", g->name, (long long)T,
          (long long)N, (long long)K, nthreads, with_bias, acc);
    // and both are the product (a dropped or misplaced block would not be)
    double worst = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) {
            double s = acc ? base[t * N + n] : 0.0;
            if (bias) s += bias[n];
            for (int64_t k = 0; k < K; k++) {
                const double xv = g->kstep == 1 ? x[t * K + k] : half_value(half_bits(x[t * K + k]));
                const double wv = g->kstep == 1 ? wd[n * K + k] : half_value(half_bits(wd[n * K + k]));
                s += xv * wv;
            }
            const double e = b[t * N + n] - s;
            worst = e > worst ? e : -e > worst ? -e : worst;
        }
    CHECK(worst < 1e-3 * (double)(K + 1), "%s T %lld N %lld K %lld: error %g", g->name, (long long)T, (long long)N,
          (long long)K, worst);
    free(x), free(wd), free(bias), free(base), free(packed), free(a), free(b);
}

int main(void) {
    const GemmKernel *kernels[] = {&K1, &K2};
    // K: under one block, exactly one, odd tails, several blocks; N: under a panel, tails, several tasks
    const int64_t Ks[] = {1, 2, 7, 31, 32, 33, 63, 64, 65, 100, 129, 200};
    const int64_t Ns[] = {1, 15, 16, 17, 40, 129};
    const int64_t Ts[] = {1, 2, 3, 4, 11};
    for (int gi = 0; gi < 2; gi++)
        for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++)
            for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
                for (size_t ti = 0; ti < sizeof Ts / sizeof *Ts; ti++) {
                    const int v = (int)(ki + ni + ti);
                    check_shape(kernels[gi], Ts[ti], Ns[ni], Ks[ki], 1 + v % 3, v % 2, v / 2 % 2);
                }
    printf("test_gemm_prepack: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
