// matmul_avx512.c: AVX-512 packers and micro-kernels for gemm_driver.c.
//
// Why: the matmuls are nearly all of the forward pass; these kernels keep the
// FMA (or vdpbf16ps) pipes busy. Compiled without -march flags: every function
// carries a target attribute and is only reached after cpu_features.c has
// confirmed the CPU supports it.
//
// Two kernels, both register-blocked MM5_MR tokens x 32 output columns (2 zmm
// per token row: 24 accumulators, 2 weight registers, broadcast operands):
//  - f32:  fp32 FMA. W (F32, BF16 or F16) is converted to fp32 while packed,
//          activations stay exact fp32. Packed panel: [k][32] floats.
//  - bf16: vdpbf16ps, BF16 weights only. Activations are rounded to bf16
//          (round-to-nearest-even, vcvtne2ps2bf16), products summed in fp32.
//          Packed panel: [k/2][32] pairs of bf16 (one dword per column).
// Packing transposes 16x16 blocks of dwords in registers.
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <string.h>

#ifndef MM5_MR
#define MM5_MR 12  // tokens per micro-tile
#endif
_Static_assert(MM5_MR >= 1 && MM5_MR <= 16, "an x tile is packed through one 16x16 transpose");
#define MM5_NW 32  // output columns per panel
#ifndef MM5_KC_F32
#define MM5_KC_F32 512   // k per cache block, fp32 kernel: a packed panel is 64 KiB (L2)
#endif
#ifndef MM5_KC_BF16
#define MM5_KC_BF16 512  // k per cache block, bf16 kernel: a packed panel is 32 KiB
#endif

#include "avx512_util.h"

// ---- fp32 kernel -------------------------------------------------------------

// 16 consecutive elements (k .. k+16, the first `valid`) of W row n as fp32 bits.
T512 static inline __m512i w_row16_f32(const WTensor *w, int64_t n, int64_t k, int64_t valid) {
    const __mmask16 m = mask16(valid);
    const int64_t off = n * w->cols + k;
    if (w->dtype == WT_F32) return _mm512_maskz_loadu_epi32(m, (const float *)w->data + off);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w->data + off);
    if (w->dtype == WT_BF16) return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    return _mm512_castps_si512(_mm512_cvtph_ps(h));
}

T512 static void pack_w_f32(void *dst, const void *wv, int64_t n0, int64_t k0, int64_t kc) {
    const WTensor *w = wv;
    uint32_t *d = dst;
    const int64_t N = w->rows;
    for (int jb = 0; jb < MM5_NW; jb += 16)
        for (int64_t kb = 0; kb < kc; kb += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++)
                r[j] = n0 + jb + j < N ? w_row16_f32(w, n0 + jb + j, k0 + kb, kc - kb) : _mm512_setzero_si512();
            tr16x16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(d + (kb + i) * MM5_NW + jb), r[i]);
        }
}

// Activations, packed as [K][mr] floats: 16 rows (rows >= T and past mr zero)
// x 16 k are loaded, transposed, and the first mr lanes of each column stored.
T512 static void pack_x_f32(void *dst, const void *xv, int64_t T, int64_t K, int64_t t0) {
    const float *inp = xv;
    float *d = dst;
    const __mmask16 keep = (__mmask16)((1u << MM5_MR) - 1);
    for (int64_t k = 0; k < K; k += 16) {
        __m512i r[16];
        for (int j = 0; j < 16; j++)
            r[j] = j < MM5_MR && t0 + j < T ? _mm512_maskz_loadu_epi32(mask16(K - k), inp + (t0 + j) * K + k)
                                              : _mm512_setzero_si512();
        tr16x16(r);
        const int64_t n = K - k < 16 ? K - k : 16;
        for (int64_t i = 0; i < n; i++) _mm512_mask_storeu_epi32(d + (k + i) * MM5_MR, keep, r[i]);
    }
}

T512 static void ukr_f32(float *c, int64_t ldc, const void *xpv, const void *wpv, int64_t ks, int first) {
    const float *xp = xpv, *wp = wpv;
    __m512 a[MM5_MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < MM5_MR; r++) {
        a[r][0] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc);
        a[r][1] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc + 16);
    }
    for (int64_t s = 0; s < ks; s++) {
        const __m512 w0 = _mm512_load_ps(wp + s * MM5_NW), w1 = _mm512_load_ps(wp + s * MM5_NW + 16);
        const float *x = xp + s * MM5_MR;
#pragma GCC unroll 16
        for (int r = 0; r < MM5_MR; r++) {
            const __m512 b = _mm512_set1_ps(x[r]);
            a[r][0] = _mm512_fmadd_ps(b, w0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(b, w1, a[r][1]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MM5_MR; r++) {
        _mm512_store_ps(c + r * ldc, a[r][0]);
        _mm512_store_ps(c + r * ldc + 16, a[r][1]);
    }
}

// ---- bf16 kernel (vdpbf16ps) -------------------------------------------------

// W must be BF16: a dword of row n at pair p is (W[n][2p], W[n][2p+1]).
T512BF static void pack_w_bf16(void *dst, const void *wv, int64_t n0, int64_t k0, int64_t kc) {
    const WTensor *w = wv;
    uint32_t *d = dst;
    const int64_t N = w->rows, K = w->cols;
    const uint16_t *W = w->data;
    for (int jb = 0; jb < MM5_NW; jb += 16)
        for (int64_t kb = 0; kb < kc; kb += 32) {  // 32 elements = 16 pairs per row
            __m512i r[16];
            const __mmask32 m = mask32(kc - kb);
            for (int j = 0; j < 16; j++) {
                const int64_t n = n0 + jb + j;
                r[j] = n < N ? _mm512_maskz_loadu_epi16(m, W + n * K + k0 + kb) : _mm512_setzero_si512();
            }
            tr16x16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(d + (kb / 2 + i) * MM5_NW + jb), r[i]);
        }
}

// Activations rounded to bf16 (RNE, vcvtne2ps2bf16), packed as [ceil(K/2)][mr]
// dwords of pairs: 16 rows x 16 pairs converted, transposed, mr lanes stored.
T512BF static void pack_x_bf16(void *dst, const void *xv, int64_t T, int64_t K, int64_t t0) {
    const float *inp = xv;
    uint32_t *d = dst;
    const int64_t Kp = (K + 1) / 2;
    const __mmask16 keep = (__mmask16)((1u << MM5_MR) - 1);
    for (int64_t k = 0; k < K; k += 32) {
        __m512i r[16];
        for (int j = 0; j < 16; j++) {
            if (j < MM5_MR && t0 + j < T) {
                const float *x = inp + (t0 + j) * K + k;
                const __m512 lo = _mm512_maskz_loadu_ps(mask16(K - k), x);
                const __m512 hi = _mm512_maskz_loadu_ps(mask16(K - k - 16), x + 16);
                r[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo fills the low 16 bf16
            } else {
                r[j] = _mm512_setzero_si512();
            }
        }
        tr16x16(r);
        const int64_t n = Kp - k / 2 < 16 ? Kp - k / 2 : 16;
        for (int64_t i = 0; i < n; i++) _mm512_mask_storeu_epi32(d + (k / 2 + i) * MM5_MR, keep, r[i]);
    }
}

T512BF static void ukr_bf16(float *c, int64_t ldc, const void *xpv, const void *wpv, int64_t ks, int first) {
    const int32_t *xp = xpv;
    const __m512i *wp = wpv;
    __m512 a[MM5_MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < MM5_MR; r++) {
        a[r][0] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc);
        a[r][1] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc + 16);
    }
    for (int64_t s = 0; s < ks; s++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wp + 2 * s), w1 = (__m512bh)_mm512_load_si512(wp + 2 * s + 1);
        const int32_t *x = xp + s * MM5_MR;
#pragma GCC unroll 16
        for (int r = 0; r < MM5_MR; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(x[r]);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], b, w0);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], b, w1);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MM5_MR; r++) {
        _mm512_store_ps(c + r * ldc, a[r][0]);
        _mm512_store_ps(c + r * ldc + 16, a[r][1]);
    }
}

static const GemmKernel k_f32 = {"avx512-f32", MM5_MR, MM5_NW, MM5_KC_F32, 1, pack_x_f32, pack_w_f32, ukr_f32};
static const GemmKernel k_bf16 = {"avx512-bf16", MM5_MR, MM5_NW, MM5_KC_BF16, 2, pack_x_bf16, pack_w_bf16, ukr_bf16};

const GemmKernel *gemm_kernel_avx512_f32(void) { return &k_f32; }
const GemmKernel *gemm_kernel_avx512_bf16(void) { return &k_bf16; }

#else  // not x86-64 GCC/clang: no AVX-512 path in this build

const GemmKernel *gemm_kernel_avx512_f32(void) { return 0; }
const GemmKernel *gemm_kernel_avx512_bf16(void) { return 0; }

#endif
