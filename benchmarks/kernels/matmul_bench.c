// matmul_bench.c: standalone check + benchmark of every matmul path (llm.c style).
//
// Build and run from the repository root:
//   gcc -O3 -std=c11 -fopenmp -Icsrc -o /tmp/matmul_bench benchmarks/kernels/matmul_bench.c
//       csrc/cpu/cpu_features.c csrc/cpu/gemm_driver.c csrc/cpu/matmul_avx512.c csrc/cpu/matmul_avx2.c csrc/cpu/gemm_general.c -lm
//   /tmp/matmul_bench [threads] [reps]          (or: make -C benchmarks/kernels run)
//
// 1. Correctness: every path this CPU runs, every weight dtype, odd shapes,
//    bias and accumulate, against a double-precision reference (for the bf16
//    path the reference uses the same bf16-rounded activations); plus
//    bit-identity of a row computed alone vs in a batch, across thread counts,
//    and with W prepacked in the kernel's layout (as model.c holds it).
// 2. Speed: GFLOP/s per path on 4096-sized shapes (T=512, K=4096, N=4096 and
//    N=14336; K=14336 -> N=4096), median of reps.
// 3. Peak: a register-only loop of independent vdpbf16ps (each zmm instruction
//    is 16 lanes x 2 bf16 products + 2 adds = 64 flops) and of fp32 zmm FMAs
//    (32 flops), on 1 thread and on all threads; the fraction of the bf16 peak
//    the bf16 GEMM reaches. BENCH_ONLY=peak measures and prints only these two
//    peak lines (benchmarks/prefill_profile.py parses them).
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model.h"
#include "cpu/matmul.h"
#include "cpu/gemm_general.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// CPU seconds of the whole process (all threads): on a machine shared with
// other jobs, flops per CPU-second measure the kernel, not the neighbours.
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static uint64_t rng_state = 88172645463325252ull;
static float frand(void) {  // uniform in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static const char *dt_name[] = {"f32", "bf16", "f16"};

// W (N,K) random in the given dtype; wf gets the same values as fp32.
static void *make_w(WDType dt, int64_t N, int64_t K, float *wf) {
    size_t n = (size_t)(N * K);
    void *w = malloc(n * (dt == WT_F32 ? 4 : 2));
    for (size_t i = 0; i < n; i++) {
        float v = frand() * 0.1f;
        if (dt == WT_F32) ((float *)w)[i] = v;
        else if (dt == WT_BF16) ((uint16_t *)w)[i] = f32_to_bf16(v);
        else ((uint16_t *)w)[i] = f32_to_f16(v);
        if (wf) wf[i] = load_as_f32(w, (int)dt, (int64_t)i);
    }
    return w;
}

static int uses_bf16_dot(int kernel, WDType dt) { return kernel == ARM_KERNEL_AVX512BF16 && dt == WT_BF16; }

static float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

static int check_case(int kernel, WDType dt, int64_t T, int64_t N, int64_t K, int use_bias, int acc) {
    float *x = malloc(sizeof(float) * T * K), *wf = malloc(sizeof(float) * N * K), *b = malloc(sizeof(float) * N);
    float *out = malloc(sizeof(float) * T * N), *init = malloc(sizeof(float) * T * N), *one = malloc(sizeof(float) * N);
    for (int64_t i = 0; i < T * K; i++) x[i] = frand();
    for (int64_t i = 0; i < N; i++) b[i] = frand();
    for (int64_t i = 0; i < T * N; i++) init[i] = frand();
    void *wd = make_w(dt, N, K, wf);
    WTensor w = {.data = wd, .dtype = dt, .rows = N, .cols = K};
    WTensor bias = {.data = use_bias ? b : NULL, .dtype = WT_F32, .rows = 1, .cols = N};
    memcpy(out, init, sizeof(float) * T * N);
    int rc = matmul(out, x, &w, &bias, T, acc, 2, kernel);
    const int rb = uses_bf16_dot(kernel, dt);
    double maxerr = 0, maxref = 0;
    int bad = rc != 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0, mag = 0;
            for (int64_t k = 0; k < K; k++) {
                double xv = rb ? round_bf16(x[t * K + k]) : x[t * K + k];
                s += xv * wf[n * K + k];
                mag += fabs(xv * wf[n * K + k]);
            }
            if (use_bias) s += b[n], mag += fabs(b[n]);
            if (acc) s += init[t * N + n], mag += fabs(init[t * N + n]);
            double err = fabs(out[t * N + n] - s) / (mag + 1e-30);
            if (err > maxerr) maxerr = err;
            if (fabs(s) > maxref) maxref = fabs(s);
        }
    // fp32 accumulation of K terms: error <= ~K * 2^-24 * sum|x w|; be generous but meaningful
    double tol = 1e-6 * (1 + K / 64.0);
    if (maxerr > tol) bad = 1;
    // bit-identity: each row alone, and other thread counts
    for (int nt = 1; nt <= 3 && !bad; nt++) {
        float *o2 = malloc(sizeof(float) * T * N);
        memcpy(o2, init, sizeof(float) * T * N);
        matmul(o2, x, &w, &bias, T, acc, nt, kernel);
        if (memcmp(o2, out, sizeof(float) * T * N)) { bad = 1; printf("    thread count %d differs\n", nt); }
        free(o2);
    }
    const GemmKernel *g = gemm_kernel_for(kernel, dt);
    if (g && !bad) {  // W packed whole (gemm.h's prepacked layout), its source not read
        const int64_t pw = gemm_panel_words(g, K), np = (N + g->nw - 1) / g->nw;
        uint32_t *packed = aligned_alloc(64, (size_t)(np * pw) * 4);
        float *o3 = malloc(sizeof(float) * T * N);
        for (int64_t p = 0; p < np; p++) gemm_pack_panel(g, packed + p * pw, &w, p * g->nw, K);
        const WTensor wpk = {.data = NULL, .dtype = dt, .rows = N, .cols = K, .packed = packed};
        memcpy(o3, init, sizeof(float) * T * N);
        matmul(o3, x, &wpk, &bias, T, acc, 2, kernel);
        if (memcmp(o3, out, sizeof(float) * T * N)) { bad = 1; printf("    prepacked W differs\n"); }
        free(o3);
        free(packed);
    }
    for (int64_t t = 0; t < T && !bad; t += (T > 8 ? 7 : 1)) {
        memcpy(one, init + t * N, sizeof(float) * N);
        matmul(one, x + t * K, &w, &bias, 1, acc, 2, kernel);
        if (memcmp(one, out + t * N, sizeof(float) * N)) { bad = 1; printf("    row %lld alone differs\n", (long long)t); }
    }
    if (bad)
        printf("  FAIL %-10s w=%-4s T=%lld N=%lld K=%lld bias=%d acc=%d: max rel err %.3g (tol %.3g)\n",
               arm_kernel_name(kernel), dt_name[dt], (long long)T, (long long)N, (long long)K, use_bias, acc, maxerr, tol);
    free(x); free(wf); free(b); free(out); free(init); free(one); free(wd);
    return bad;
}

// ---- peak ------------------------------------------------------------------

#if defined(__x86_64__)
#include <immintrin.h>
#define PEAK_ITERS 20000000L
__attribute__((target("avx512f,avx512bf16"), noinline)) static float peak_bf16_loop(long iters) {
    // distinct starting values: identical chains could be merged by the compiler
    __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2), a3 = _mm512_set1_ps(3),
           a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5), a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7),
           a8 = _mm512_set1_ps(8), a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x3f003f00);
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+v"(x), "+v"(y));  // keep the loop from being folded
        a0 = _mm512_dpbf16_ps(a0, x, y); a1 = _mm512_dpbf16_ps(a1, x, y); a2 = _mm512_dpbf16_ps(a2, x, y);
        a3 = _mm512_dpbf16_ps(a3, x, y); a4 = _mm512_dpbf16_ps(a4, x, y); a5 = _mm512_dpbf16_ps(a5, x, y);
        a6 = _mm512_dpbf16_ps(a6, x, y); a7 = _mm512_dpbf16_ps(a7, x, y); a8 = _mm512_dpbf16_ps(a8, x, y);
        a9 = _mm512_dpbf16_ps(a9, x, y); a10 = _mm512_dpbf16_ps(a10, x, y); a11 = _mm512_dpbf16_ps(a11, x, y);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}
__attribute__((target("avx512f"), noinline)) static float peak_fma_loop(long iters) {
    // distinct starting values: identical chains could be merged by the compiler
    __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2), a3 = _mm512_set1_ps(3),
           a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5), a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7),
           a8 = _mm512_set1_ps(8), a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
    __m512 x = _mm512_set1_ps(1e-7f), y = _mm512_set1_ps(1e-7f);
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+v"(x), "+v"(y));
        a0 = _mm512_fmadd_ps(x, y, a0); a1 = _mm512_fmadd_ps(x, y, a1); a2 = _mm512_fmadd_ps(x, y, a2);
        a3 = _mm512_fmadd_ps(x, y, a3); a4 = _mm512_fmadd_ps(x, y, a4); a5 = _mm512_fmadd_ps(x, y, a5);
        a6 = _mm512_fmadd_ps(x, y, a6); a7 = _mm512_fmadd_ps(x, y, a7); a8 = _mm512_fmadd_ps(x, y, a8);
        a9 = _mm512_fmadd_ps(x, y, a9); a10 = _mm512_fmadd_ps(x, y, a10); a11 = _mm512_fmadd_ps(x, y, a11);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}

// Best of reps. *wall: GFLOP/s of nthreads threads each running the loop, by
// wall clock; returns GFLOP/s per CPU-second (per core while it runs).
static double peak(int bf16, int nthreads, int reps, double *wall) {
    double best = 0, bestw = 0;
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now(), c0 = cpu_now();
#pragma omp parallel num_threads(nthreads)
        {
            float v = bf16 ? peak_bf16_loop(PEAK_ITERS) : peak_fma_loop(PEAK_ITERS);
#pragma omp atomic
            sink += v;
        }
        double dt = now() - t0, dc = cpu_now() - c0;
        double gf = (double)nthreads * PEAK_ITERS * 12 * (bf16 ? 64 : 32) / 1e9;
        if (gf / dc > best) best = gf / dc;
        if (gf / dt > bestw) bestw = gf / dt;
    }
    (void)sink;
    *wall = bestw;
    return best;
}
#endif

// ---- timing ----------------------------------------------------------------

// name is one of the comma-separated items of list
static int in_list(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Runs run(ctx) once to warm up, then reps times: median GFLOP/s by wall clock;
// *percore: median GFLOP per CPU-second.
static double median_rate(void (*run)(void *), void *ctx, double gflop, int reps, double *percore) {
    double *ts = malloc(sizeof(double) * (reps + 1)), *cs = malloc(sizeof(double) * (reps + 1));
    run(ctx);
    for (int r = 0; r < reps; r++) {
        double t0 = now(), c0 = cpu_now();
        run(ctx);
        ts[r] = now() - t0;
        cs[r] = cpu_now() - c0;
    }
    qsort(ts, reps, sizeof(double), cmp_d);
    qsort(cs, reps, sizeof(double), cmp_d);
    *percore = gflop / cs[reps / 2];
    const double wall = gflop / ts[reps / 2];
    free(ts); free(cs);
    return wall;
}

typedef struct { float *out; const float *x; const WTensor *w, *bias; int64_t T; int nthreads, kernel; } MatmulRun;
static void run_matmul(void *p) {
    const MatmulRun *r = p;
    matmul(r->out, r->x, r->w, r->bias, r->T, 0, r->nthreads, r->kernel);
}

// The model's matmul path `kernel` with weights of dtype dt: median GFLOP/s (see median_rate).
static double time_gemm(int kernel, WDType dt, int64_t T, int64_t N, int64_t K, int nthreads, int reps,
                        double *percore) {
    float *x = malloc(sizeof(float) * T * K), *out = malloc(sizeof(float) * T * N);
    for (int64_t i = 0; i < T * K; i++) x[i] = frand();
    void *wd = make_w(dt, N, K, NULL);
    WTensor w = {.data = wd, .dtype = dt, .rows = N, .cols = K};
    WTensor bias = {.data = NULL, .dtype = WT_F32, .rows = 1, .cols = N};
    MatmulRun r = {out, x, &w, &bias, T, nthreads, kernel};
    const double wall = median_rate(run_matmul, &r, 2.0 * T * N * K / 1e9, reps, percore);
    free(x); free(out); free(wd);
    return wall;
}

typedef struct { float *c; const GemmOperand *a, *b; int nthreads; } GeneralRun;
static void run_general(void *p) {
    const GeneralRun *r = p;
    gemm_general(r->c, r->a, r->b, 0, r->nthreads, gemm_general_best());
}

// Training GEMM (gemm_general.c): median GFLOP/s of C (M,N) = op(A) op(B), fp32 operands.
static double time_general(int64_t M, int64_t N, int64_t K, int ta, int tb, int nthreads, int reps, double *percore) {
    float *a = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * K * N), *c = malloc(sizeof(float) * M * N);
    for (int64_t i = 0; i < M * K; i++) a[i] = frand();
    for (int64_t i = 0; i < K * N; i++) b[i] = frand();
    GemmOperand oa = {a, WT_F32, ta ? K : M, ta ? M : K, ta}, ob = {b, WT_F32, tb ? N : K, tb ? K : N, tb};
    GeneralRun r = {c, &oa, &ob, nthreads};
    const double wall = median_rate(run_general, &r, 2.0 * M * N * K / 1e9, reps, percore);
    free(a); free(b); free(c);
    return wall;
}

int main(int argc, char **argv) {
    int nthreads = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    const char *only = getenv("BENCH_ONLY");    // "checks", "speed" or "peak" (default: checks + speed)
    const char *paths = getenv("BENCH_PATHS");  // e.g. "avx512bf16,avx512" (default: every path)
    printf("paths this CPU runs:");
    for (int k = 0; k < ARM_KERNEL_COUNT; k++)
        if (arm_kernel_supported(k)) printf(" %s", arm_kernel_name(k));
    printf("  (best: %s)\n", arm_kernel_name(arm_kernel_best()));

    int fails = 0, cases = 0;
    if (!only || !strcmp(only, "checks")) {
        static const int64_t shapes[][3] = {{1, 1, 1}, {5, 17, 3}, {13, 33, 31}, {37, 100, 65}, {12, 32, 512},
                                            {25, 70, 300}, {3, 64, 1029}, {40, 96, 48}};
        for (int k = 0; k < ARM_KERNEL_COUNT; k++) {
            if (!arm_kernel_supported(k)) continue;
            for (int dt = 0; dt < 3; dt++)
                for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
                    for (int v = 0; v < 2; v++) {
                        fails += check_case(k, dt, shapes[s][0], shapes[s][1], shapes[s][2], v, v);
                        cases++;
                    }
        }
        printf("correctness: %d/%d cases pass (double reference, batch, thread and prepacked-W bit-identity)\n", cases - fails,
               cases);
    }
    if (only && !strcmp(only, "checks")) return fails != 0;
    if (only && strcmp(only, "speed") && strcmp(only, "peak")) {
        fprintf(stderr, "BENCH_ONLY must be checks, speed or peak, not '%s'\n", only);
        return 2;
    }

    double pkc = 0, pkw = 0, pfc = 0, pfw = 0;
#if defined(__x86_64__)
    if (arm_kernel_supported(ARM_KERNEL_AVX512BF16)) pkc = peak(1, nthreads, 7, &pkw);
    if (arm_kernel_supported(ARM_KERNEL_AVX512)) pfc = peak(0, nthreads, 7, &pfw);
    printf("peak vdpbf16ps zmm: %.1f GFLOP/s per core (per CPU-second), %.1f wall on %d threads\n", pkc, pkw, nthreads);
    printf("peak fp32 FMA zmm:  %.1f GFLOP/s per core (per CPU-second), %.1f wall on %d threads\n", pfc, pfw, nthreads);
#else
    printf("peak: not measured (the register loops are x86-64 only)\n");
#endif
    if (only && !strcmp(only, "peak")) return 0;
    static const int64_t big[][3] = {{512, 4096, 4096}, {512, 14336, 4096}, {512, 4096, 14336}};
    printf("\nGEMM GFLOP/s, %d threads, median of %d; wall clock (per core = per CPU-second)\n", nthreads, reps);
    printf("%-12s %-5s %22s %22s %22s\n", "path", "W", "512x4096x4096", "512x14336x4096", "512x4096x14336");
    double best_bf16[3] = {0}, best_bf16c[3] = {0};
    for (int k = ARM_KERNEL_COUNT - 1; k >= 0; k--) {
        if (!arm_kernel_supported(k)) continue;
        if (paths && !in_list(paths, arm_kernel_name(k))) continue;
        for (int dt = 0; dt < 3; dt++) {
            if (k == ARM_KERNEL_AVX512BF16 && dt != WT_BF16) continue;  // same code as avx512 there
            if (k == ARM_KERNEL_PORTABLE && dt == WT_F16) continue;
            printf("%-12s %-5s", arm_kernel_name(k), dt_name[dt]);
            for (int s = 0; s < 3; s++) {
                int r = k == ARM_KERNEL_PORTABLE ? 1 : reps;
                double pc, g = time_gemm(k, dt, big[s][0], big[s][1], big[s][2], nthreads, r, &pc);
                if (uses_bf16_dot(k, dt)) best_bf16[s] = g, best_bf16c[s] = pc;
                printf(" %9.1f (%5.1f/core)", g, pc);
                fflush(stdout);
            }
            printf("\n");
        }
    }
    if (!paths || in_list(paths, "general")) {
        // the stage-2 gating MLP's products (batch 1024, H 4096, hidden 1024) in each layout
        static const int64_t gs[][3] = {{1024, 1024, 4096}, {1024, 4096, 1024}, {4096, 4096, 1024}};
        printf("\ntraining GEMM (gemm_general, %s, fp32 operands rounded while packed), GFLOP/s wall (per CPU-second)\n",
               gemm_general_name(gemm_general_best()));
        printf("%-8s %22s %22s %22s\n", "layout", "1024x1024x4096", "1024x4096x1024", "4096x4096x1024");
        for (int l = 0; l < 4; l++) {
            const int ta = l >> 1, tb = l & 1;
            printf("%-8s", ta ? (tb ? "A^T B^T" : "A^T B") : (tb ? "A B^T" : "A B"));
            for (int s = 0; s < 3; s++) {
                double pc, g = time_general(gs[s][0], gs[s][1], gs[s][2], ta, tb, nthreads, reps, &pc);
                printf(" %9.1f (%5.1f/core)", g, pc);
            }
            printf("\n");
            fflush(stdout);
        }
    }
    if (pkc > 0) {
        printf("\nbf16 GEMM / measured vdpbf16ps peak, per core:  %.0f%%  %.0f%%  %.0f%%  (goal >= 70%%)\n",
               100 * best_bf16c[0] / pkc, 100 * best_bf16c[1] / pkc, 100 * best_bf16c[2] / pkc);
        printf("bf16 GEMM / measured vdpbf16ps peak, wall:      %.0f%%  %.0f%%  %.0f%%\n",
               100 * best_bf16[0] / pkw, 100 * best_bf16[1] / pkw, 100 * best_bf16[2] / pkw);
    }
    return fails != 0;
}
