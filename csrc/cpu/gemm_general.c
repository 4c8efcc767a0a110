// gemm_general.c: training's op(A) @ op(B), any layout, bf16 operands (the
// model's x @ W^T is matmul.h).
//
// The AVX512_BF16 path feeds gemm_driver.c with packers that read a
// GemmOperand in either layout (see gemm_general.h) and the vdpbf16ps
// micro-kernel of matmul_avx512.c. Both operands are seen through the same
// "row view" R(i, k): for A, i runs over M; for B, i runs over N (the driver
// computes out = X . W^T, so W(n, k) = op(B)(k, n)). A view is k-contiguous
// (R(i, k) = data[i * ld + k]) or i-contiguous (R(i, k) = data[k * ld + i]);
// each has its packer:
//   k-contiguous: 16 rows x 32 k converted to 16 x 16 dwords of bf16 pairs,
//                 transposed in registers (as the model's packers do);
//   i-contiguous: rows k and k+1 are loaded 16 i's at a time and their bf16
//                 halves interleaved into dwords: no transpose needed.
// The portable path rounds the operands to bf16 into fp32 scratch and sums
// each dot product in fp32 with plain loops.
#include "gemm_general.h"

#include <stdlib.h>
#include <string.h>
#include "../dtype.h"
#include "cpu_features.h"
#include "gemm.h"

typedef struct {
    const void *data;
    WDType dtype;
    int64_t ld;     // elements between consecutive stored rows
    int64_t ni, K;  // the view is (ni, K)
    int kcontig;    // 1: R(i, k) = data[i * ld + k]; 0: R(i, k) = data[k * ld + i]
} RowView;

// op(A) as (M, K) rows
static RowView view_a(const GemmOperand *a) {
    RowView v = {a->data, a->dtype, a->cols, a->trans ? a->cols : a->rows, a->trans ? a->rows : a->cols, !a->trans};
    return v;
}

// op(B)^T as (N, K) rows
static RowView view_b(const GemmOperand *b) {
    RowView v = {b->data, b->dtype, b->cols, b->trans ? b->rows : b->cols, b->trans ? b->cols : b->rows, b->trans};
    return v;
}

static inline float view_get(const RowView *v, int64_t i, int64_t k) {
    const int64_t off = v->kcontig ? i * v->ld + k : k * v->ld + i;
    return v->dtype == WT_F32 ? ((const float *)v->data)[off] : bf16_to_f32(((const uint16_t *)v->data)[off]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx512_util.h"

// 32 elements R(i, k .. k+32) (the first `valid`; the rest zero) as 16 dwords of bf16 pairs
T512BF static inline __m512i load_pairs(const RowView *v, int64_t i, int64_t k, int64_t valid) {
    if (v->dtype == WT_BF16)
        return _mm512_maskz_loadu_epi16(mask32(valid), (const uint16_t *)v->data + i * v->ld + k);
    const float *p = (const float *)v->data + i * v->ld + k;
    const __m512 lo = _mm512_maskz_loadu_ps(mask16(valid), p);
    const __m512 hi = _mm512_maskz_loadu_ps(mask16(valid - 16), p + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo fills the low 16 bf16
}

// 16 elements R(i .. i+16, k) (the first `valid`) of an i-contiguous view, as bf16 in the low
// half of 16 dwords
T512BF static inline __m512i load_column16(const RowView *v, int64_t i, int64_t k, int64_t valid) {
    const int64_t off = k * v->ld + i;
    __m256i h;
    if (v->dtype == WT_BF16)
        h = _mm256_maskz_loadu_epi16(mask16(valid), (const uint16_t *)v->data + off);
    else
        h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask16(valid), (const float *)v->data + off));
    return _mm512_cvtepu16_epi32(h);
}

// dst [ceil(kc/2)][width] dwords: (R(i0+j, k0+2p), R(i0+j, k0+2p+1)) as bf16 pairs, zero for
// i >= ni and k >= k0+kc. width is a tile's (mr) or a panel's (nw) column count.
T512BF static void pack_view(uint32_t *d, int64_t width, const RowView *v, int64_t i0, int64_t k0, int64_t kc) {
    const int64_t np = (kc + 1) / 2;
    for (int64_t jb = 0; jb < width; jb += 16) {
        const int64_t w16 = width - jb < 16 ? width - jb : 16;
        const __mmask16 keep = mask16(w16);
        const int64_t valid = v->ni - (i0 + jb);  // rows of this group that exist
        if (v->kcontig) {
            for (int64_t kb = 0; kb < kc; kb += 32) {
                __m512i r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = j < w16 && j < valid ? load_pairs(v, i0 + jb + j, k0 + kb, kc - kb) : _mm512_setzero_si512();
                tr16x16(r);
                const int64_t n = np - kb / 2 < 16 ? np - kb / 2 : 16;
                for (int64_t p = 0; p < n; p++) _mm512_mask_storeu_epi32(d + (kb / 2 + p) * width + jb, keep, r[p]);
            }
        } else {
            const int64_t nv = valid < w16 ? valid : w16;
            for (int64_t p = 0; p < np; p++) {
                const int64_t k = k0 + 2 * p;
                const __m512i lo = load_column16(v, i0 + jb, k, nv);
                const __m512i hi = 2 * p + 1 < kc ? load_column16(v, i0 + jb, k + 1, nv) : _mm512_setzero_si512();
                _mm512_mask_storeu_epi32(d + p * width + jb, keep, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
    }
}

// The driver's pack_x: x is a RowView of op(A); a tile of mr rows over all of K.
T512BF static void pack_x_view(void *dst, const void *x, int64_t T, int64_t K, int64_t t0) {
    (void)T;
    const GemmKernel *g = gemm_kernel_avx512_bf16();
    pack_view(dst, g->mr, x, t0, 0, K);
}

// The driver's pack_w: w is a RowView of op(B)^T; a panel of nw rows, k0 .. k0+kc, rows of
// the panel padded to the driver's stride with zeros past ceil(kc/2).
T512BF static void pack_w_view(void *dst, const void *w, int64_t n0, int64_t k0, int64_t kc) {
    const GemmKernel *g = gemm_kernel_avx512_bf16();
    pack_view(dst, g->nw, w, n0, k0, kc);
}

static int gemm_avx512bf16(float *c, const RowView *va, const RowView *vb, int accumulate, int nthreads) {
    const GemmKernel *base = gemm_kernel_avx512_bf16();
    if (!base) return -2;
    GemmKernel g = *base;
    g.pack_x = pack_x_view;
    g.pack_w = pack_w_view;
    return gemm_run(&g, c, va, vb, NULL, va->ni, vb->ni, va->K, NULL, accumulate, nthreads);
}

#else
static int gemm_avx512bf16(float *c, const RowView *va, const RowView *vb, int accumulate, int nthreads) {
    (void)c, (void)va, (void)vb, (void)accumulate, (void)nthreads;
    return -2;
}
#endif

// rows (ni, K) of a view, rounded to bf16, as fp32
static void round_rows(float *dst, const RowView *v) {
    for (int64_t i = 0; i < v->ni; i++)
        for (int64_t k = 0; k < v->K; k++) dst[i * v->K + k] = bf16_to_f32(f32_to_bf16(view_get(v, i, k)));
}

static int gemm_portable(float *c, const RowView *va, const RowView *vb, int accumulate, int nthreads) {
    const int64_t M = va->ni, N = vb->ni, K = va->K;
    float *a = malloc((size_t)(M * K + 1) * sizeof(float)), *b = malloc((size_t)(N * K + 1) * sizeof(float));
    if (!a || !b) {
        free(a);
        free(b);
        return -1;
    }
    round_rows(a, va);
    round_rows(b, vb);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += a[m * K + k] * b[n * K + k];
            c[m * N + n] = accumulate ? c[m * N + n] + s : s;
        }
    free(a);
    free(b);
    return 0;
}

GemmGeneralPath gemm_general_best(void) {
    return arm_kernel_supported(ARM_KERNEL_AVX512BF16) && gemm_kernel_avx512_bf16() ? GEMM_GENERAL_AVX512BF16
                                                                                    : GEMM_GENERAL_PORTABLE;
}

const char *gemm_general_name(GemmGeneralPath p) {
    return p == GEMM_GENERAL_AVX512BF16 ? "avx512bf16" : "portable";
}

int gemm_general(float *c, const GemmOperand *a, const GemmOperand *b, int accumulate, int nthreads,
                 GemmGeneralPath path) {
    const RowView va = view_a(a), vb = view_b(b);
    const int64_t M = va.ni, N = vb.ni;
    if (M == 0 || N == 0) return 0;
    if (va.K == 0) {  // an empty sum
        if (!accumulate) memset(c, 0, (size_t)(M * N) * sizeof(float));
        return 0;
    }
    if (nthreads < 1) nthreads = 1;
    if (path == GEMM_GENERAL_AVX512BF16 && arm_kernel_supported(ARM_KERNEL_AVX512BF16)) {
        const int r = gemm_avx512bf16(c, &va, &vb, accumulate, nthreads);
        if (r != -2) return r;
    }
    return gemm_portable(c, &va, &vb, accumulate, nthreads);
}
