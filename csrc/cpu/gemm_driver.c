// gemm_driver.c: loops, threads and scratch of gemm.h's driver: the SIMD paths
// of the model's x @ W^T (matmul.h) and training's op(A) @ op(B) (gemm_general.c).
//
// Why a separate, generic (no target attribute) file: the OpenMP regions and
// allocations live here, compiled for baseline x86-64, and call the packers
// and micro-kernels of the chosen path through a GemmKernel (see gemm.h), so
// the AVX code never runs unless the dispatcher proved the CPU has it.
//
// Loop nest:
//   for token block (GEMM_TB tokens; all threads):
//     pack the block's activations (threads split the tiles; shared)
//     for block of nc output columns (threads, dynamic schedule):
//       for k block (kc):
//         pack W[n-block, k-block] into panels (L2), unless W comes prepacked
//         for token tile: for panel: micro-kernel into C (x tile stays in L1)
//           last k block: epilogue of the tile, out = [out +] (C + bias)
// Scratch is bounded by the token block, whatever T is.
#include "gemm.h"

#include <stdlib.h>
#include <string.h>

#ifndef GEMM_TB
#define GEMM_TB 1024  // tokens per block: bounds the scratch; W is packed once per block
#endif
#ifndef GEMM_NPAN
#define GEMM_NPAN 4   // most W panels per task (an x tile is reused across them from L1)
#endif
#ifndef GEMM_TASKS_PER_THREAD
#define GEMM_TASKS_PER_THREAD 8  // aim for at least this many tasks per thread
#endif

static void *alloc64(size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

// out rows t0 .. t0+nr (those < T), columns n0 .. n0+nn = [out +] (C + bias):
// the same two roundings for every element, in the same order. Runs on a
// tile the micro-kernel has just stored, so C is read from L1.
static void epilogue(float *out, const float *c, int64_t ldc, const float *bias, int64_t T, int64_t N, int64_t t0,
                     int64_t nr, int64_t n0, int64_t nn, int accumulate) {
    for (int64_t r = 0; r < nr && t0 + r < T; r++, c += ldc) {
        float *o = out + (t0 + r) * N + n0;
        if (accumulate) {
            if (bias) for (int64_t j = 0; j < nn; j++) o[j] += c[j] + bias[n0 + j];
            else for (int64_t j = 0; j < nn; j++) o[j] += c[j];
        } else {
            if (bias) for (int64_t j = 0; j < nn; j++) o[j] = c[j] + bias[n0 + j];
            else memcpy(o, c, (size_t)nn * sizeof(float));
        }
    }
}

int64_t gemm_panel_words(const GemmKernel *g, int64_t K) {
    return ((K + g->kstep - 1) / g->kstep + 15) / 16 * 16 * g->nw;
}

void gemm_pack_panel(const GemmKernel *g, uint32_t *dst, const void *w, int64_t n0, int64_t K) {
    for (int64_t k0 = 0; k0 < K; k0 += g->kc)
        g->pack_w(dst + k0 / g->kstep * g->nw, w, n0, k0, K - k0 < g->kc ? K - k0 : g->kc);
}

const GemmKernel *gemm_kernel_for(int path, WDType wdtype) {
    if (path == ARM_KERNEL_AVX512BF16 && wdtype == WT_BF16) return gemm_kernel_avx512_bf16();
    if (path >= ARM_KERNEL_AVX512) return gemm_kernel_avx512_f32();
    if (path == ARM_KERNEL_AVX2) return gemm_kernel_avx2_f32();
    return NULL;
}

int gemm_run(const GemmKernel *g, float *out, const void *inp, const void *w, const uint32_t *wpacked, int64_t T,
             int64_t N, int64_t K, const float *bias, int accumulate, int nthreads) {
    const int64_t mr = g->mr, nw = g->nw, ks = g->kstep;
    const int64_t Ks = (K + ks - 1) / ks;                   // packed k-steps of a whole row
    const int64_t ntiles = (T + mr - 1) / mr;
    const int64_t xtile = Ks * mr;                          // 4-byte words per packed x tile
    const int64_t kcs16 = ((g->kc / ks) + 15) / 16 * 16;    // packed k-steps per W block, rounded
    const int64_t pstride = kcs16 * nw;                     // words per panel packed per call
    const int64_t ppanel = gemm_panel_words(g, K);          // words per prepacked panel (all of K)
    const int64_t npanels = (N + nw - 1) / nw;
    // Panels per task: enough tasks for the threads to balance, at most GEMM_NPAN.
    int64_t npan = npanels / (GEMM_TASKS_PER_THREAD * (int64_t)(nthreads > 0 ? nthreads : 1));
    if (npan < 1) npan = 1;
    if (npan > GEMM_NPAN) npan = GEMM_NPAN;
    const int64_t nc = npan * nw, ntasks = (npanels + npan - 1) / npan;
    int64_t tbt = (GEMM_TB + mr - 1) / mr;                  // tiles per token block: GEMM_TB tokens fit in one
    if (tbt < 1) tbt = 1;
    if (tbt > ntiles) tbt = ntiles;

    uint32_t *xp = alloc64((size_t)(tbt * xtile) * 4);  // one token block of packed activations
    if (!xp) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint32_t *wp = wpacked ? NULL : alloc64((size_t)(npan * pstride) * 4);
        float *cb = alloc64((size_t)(tbt * mr * nc) * sizeof(float));
        for (int64_t tb0 = 0; tb0 < ntiles; tb0 += tbt) {  // every thread runs every block
            const int64_t tbn = ntiles - tb0 < tbt ? ntiles - tb0 : tbt;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < tbn; i++) g->pack_x(xp + i * xtile, inp, T, K, (tb0 + i) * mr);
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < ntasks; task++) {
                if ((!wp && !wpacked) || !cb) { failed = 1; continue; }  // every thread must reach the loop
                const int64_t n0 = task * nc, nn = N - n0 < nc ? N - n0 : nc;
                const int64_t np = (nn + nw - 1) / nw;
                for (int64_t k0 = 0; k0 < K; k0 += g->kc) {
                    const int64_t kcl = K - k0 < g->kc ? K - k0 : g->kc;
                    const int64_t steps = (kcl + ks - 1) / ks;
                    const int last = k0 + kcl >= K;
                    // this k block of the task's first panel, and the words from one panel to the next
                    const uint32_t *wb = wp;
                    int64_t wstride = pstride;
                    if (wpacked) {
                        wb = wpacked + (n0 / nw) * ppanel + (k0 / ks) * nw;
                        wstride = ppanel;
                    } else {
                        for (int64_t p = 0; p < np; p++) g->pack_w(wp + p * pstride, w, n0 + p * nw, k0, kcl);
                    }
                    for (int64_t i = 0; i < tbn; i++) {
                        const uint32_t *xt = xp + i * xtile + (k0 / ks) * mr;
                        float *ct = cb + i * mr * nc;
                        for (int64_t p = 0; p < np; p++)
                            g->ukr(ct + p * nw, nc, xt, wb + p * wstride, steps, k0 == 0);
                        if (last) epilogue(out, ct, nc, bias, T, N, (tb0 + i) * mr, mr, n0, nn, accumulate);
                    }
                }
            }
        }
        free(wp);
        free(cb);
    }
    free(xp);
    return failed ? -1 : 0;
}
