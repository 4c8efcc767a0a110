// matmul.h: the model's product, out (T,N) [+]= inp (T,K) @ W(N,K)^T + bias(N),
// fp32 accumulation: activations times a checkpoint weight, the forward pass's
// only matrix product. (Training's op(A) @ op(B) between two arrays is
// gemm_general.h; both run on gemm_driver.c's loops, see gemm.h.)
//
// W may be F32, BF16 or F16 (read in place from the checkpoint mapping), or
// prepacked at load in the SIMD kernel's layout (WTensor.packed). Work
// is split across threads by blocks of W rows, so every output element is
// computed by the same instructions whatever the thread count or the batch it
// belongs to: tail rows are copied into a zero-padded tile and run through the
// same micro-kernel. That makes results bit-identical across runs, thread
// counts and batchings (a sequence scored alone equals it scored in a batch).
// matmul_portable is plain C the compiler vectorises, with clones for AVX-512 /
// AVX2 picked at run time. matmul() dispatches on the kernel path resolved at
// model load (Model.kernel): the register-blocked SIMD kernels of gemm.h
// (matmul_avx512.c, matmul_avx2.c), or this portable code.
#ifndef ARMORM_CPU_MATMUL_H
#define ARMORM_CPU_MATMUL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../model.h"
#include "../dtype.h"
#include "cpu_features.h"
#include "gemm.h"

#define MM_TR 4     // tokens per micro-tile
#define MM_NR 4     // weight rows per micro-tile
#define MM_LANES 8  // independent partial sums per dot product
#define MM_NB 32    // weight rows converted to fp32 per block
#define MM_TB 64    // tokens per cache block

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ARMORM_NO_CLONES)
#define MM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MM_CLONES
#endif

// acc (MM_TR x MM_NR) = x rows (MM_TR, K, stride ldx) . w rows (MM_NR, K, stride K)
MM_CLONES
static void mm_micro(float *restrict acc, const float *restrict x, int64_t ldx,
                     const float *restrict w, int64_t K) {
    float s[MM_TR][MM_NR][MM_LANES];
    memset(s, 0, sizeof s);
    int64_t k = 0;
    for (; k + MM_LANES <= K; k += MM_LANES)
        for (int r = 0; r < MM_TR; r++)
            for (int n = 0; n < MM_NR; n++)
                for (int l = 0; l < MM_LANES; l++)
                    s[r][n][l] += x[r * ldx + k + l] * w[n * K + k + l];
    for (; k < K; k++)
        for (int r = 0; r < MM_TR; r++)
            for (int n = 0; n < MM_NR; n++) s[r][n][k % MM_LANES] += x[r * ldx + k] * w[n * K + k];
    for (int r = 0; r < MM_TR; r++)
        for (int n = 0; n < MM_NR; n++) {
            // fixed pairwise reduction of the lanes
            float a = (s[r][n][0] + s[r][n][1]) + (s[r][n][2] + s[r][n][3]);
            float b = (s[r][n][4] + s[r][n][5]) + (s[r][n][6] + s[r][n][7]);
            acc[r * MM_NR + n] = a + b;
        }
}

static void mm_convert_rows(float *dst, const WTensor *w, int64_t row0, int64_t nrows) {
    const int64_t K = w->cols;
    if (w->dtype == WT_F32) {
        memcpy(dst, (const float *)w->data + row0 * K, (size_t)(nrows * K) * sizeof(float));
        return;
    }
    const uint16_t *src = (const uint16_t *)w->data + row0 * K;
    if (w->dtype == WT_BF16)
        for (int64_t i = 0; i < nrows * K; i++) dst[i] = bf16_to_f32(src[i]);
    else
        for (int64_t i = 0; i < nrows * K; i++) dst[i] = f16_to_f32(src[i]);
}

// Returns 0, or -1 when a scratch allocation fails.
static int matmul_portable(float *out, const float *inp, const WTensor *w, const WTensor *bias, int64_t T,
                           int accumulate, int nthreads) {
    const int64_t N = w->rows, K = w->cols;
    const int64_t nblocks = (N + MM_NB - 1) / MM_NB;
    const float *b = bias && bias->data ? (const float *)bias->data : NULL;  // vectors are fp32
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *wf = malloc((size_t)(MM_NB * K) * sizeof(float));
        float *xpad = malloc((size_t)(MM_TR * K) * sizeof(float));
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                if (!wf || !xpad) { failed = 1; continue; }  // every thread must reach the loop
                const int64_t n0 = nb * MM_NB;
                const int64_t nn = N - n0 < MM_NB ? N - n0 : MM_NB;
                mm_convert_rows(wf, w, n0, nn);
                if (nn < MM_NB) memset(wf + nn * K, 0, (size_t)((MM_NB - nn) * K) * sizeof(float));
                for (int64_t t0 = 0; t0 < T; t0 += MM_TB) {
                    const int64_t t1 = t0 + MM_TB < T ? t0 + MM_TB : T;
                    for (int64_t t = t0; t < t1; t += MM_TR) {
                        const int64_t tr = t1 - t < MM_TR ? t1 - t : MM_TR;
                        const float *x = inp + t * K;
                        if (tr < MM_TR) {  // same kernel on a zero-padded copy
                            memcpy(xpad, x, (size_t)(tr * K) * sizeof(float));
                            memset(xpad + tr * K, 0, (size_t)((MM_TR - tr) * K) * sizeof(float));
                            x = xpad;
                        }
                        for (int64_t n = 0; n < nn; n += MM_NR) {
                            float acc[MM_TR * MM_NR];
                            mm_micro(acc, x, K, wf + n * K, K);
                            for (int64_t r = 0; r < tr; r++)
                                for (int64_t j = 0; j < MM_NR && n + j < nn; j++) {
                                    float v = acc[r * MM_NR + j];
                                    if (b) v += b[n0 + n + j];
                                    float *o = &out[(t + r) * N + n0 + n + j];
                                    *o = accumulate ? *o + v : v;
                                }
                        }
                    }
                }
            }
        free(wf);
        free(xpad);
    }
    return failed ? -1 : 0;
}

// out (T,N) [+]= inp (T,K) @ W^T + bias on the given kernel path (ArmKernel).
// BF16 weights take vdpbf16ps on ARM_KERNEL_AVX512BF16 (activations rounded to
// bf16); everything else on the SIMD paths is fp32 arithmetic.
// Returns 0, or -1 when a scratch allocation fails.
// A prepacked W (w->packed, model.c) was packed at load for this same kernel
// (gemm_kernel_for of the same path and dtype), and is read in place of w->data.
static int matmul(float *out, const float *inp, const WTensor *w, const WTensor *bias, int64_t T,
                  int accumulate, int nthreads, int kernel) {
    const GemmKernel *g = gemm_kernel_for(kernel, w->dtype);
    if (!g) return matmul_portable(out, inp, w, bias, T, accumulate, nthreads);
    const float *b = bias && bias->data ? (const float *)bias->data : NULL;  // vectors are fp32
    return gemm_run(g, out, inp, w, w->packed, T, w->rows, w->cols, b, accumulate, nthreads);
}

#endif
