// matmul_avx2.c: AVX2+FMA packer and micro-kernel for gemm_driver.c.
//
// Why: the fallback fast path for x86-64 CPUs without AVX-512 (Haswell and
// later, Zen 1-3). fp32 arithmetic for F32, BF16 and F16 weights (converted
// to fp32 while packed; F16 through F16C). Register block: MM2_MR tokens x 16
// output columns (2 ymm per token row: 12 accumulators, 2 weight registers,
// one broadcast). Compiled without -march flags; every function carries a
// target attribute and is reached only when cpu_features.c found AVX2, FMA
// and F16C.
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "../dtype.h"

#define MM2_MR 6
#define MM2_NW 16
#define MM2_KC 256

#define T256 __attribute__((target("avx2,fma,f16c")))

T256 static void pack_w_f32(void *dst, const void *wv, int64_t n0, int64_t k0, int64_t kc) {
    const WTensor *w = wv;
    float *d = dst;
    const int64_t N = w->rows, K = w->cols, kc16 = (kc + 15) / 16 * 16;
    for (int j = 0; j < MM2_NW; j++) {
        const int64_t n = n0 + j;
        int64_t k = 0;
        if (n < N) {
            const int64_t off = n * K + k0;
            if (w->dtype == WT_F32) {
                const float *s = (const float *)w->data + off;
                for (; k < kc; k++) d[k * MM2_NW + j] = s[k];
            } else if (w->dtype == WT_BF16) {
                const uint16_t *s = (const uint16_t *)w->data + off;
                for (; k < kc; k++) d[k * MM2_NW + j] = bf16_to_f32(s[k]);
            } else {
                const uint16_t *s = (const uint16_t *)w->data + off;
                float tmp[8];
                for (; k + 8 <= kc; k += 8) {
                    _mm256_storeu_ps(tmp, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + k))));
                    for (int i = 0; i < 8; i++) d[(k + i) * MM2_NW + j] = tmp[i];
                }
                for (; k < kc; k++) d[k * MM2_NW + j] = f16_to_f32(s[k]);
            }
        }
        for (; k < kc16; k++) d[k * MM2_NW + j] = 0.0f;
    }
}

T256 static void pack_x_f32(void *dst, const void *xv, int64_t T, int64_t K, int64_t t0) {
    const float *inp = xv;
    float *d = dst;
    for (int r = 0; r < MM2_MR; r++) {
        const int64_t t = t0 + r;
        if (t < T) {
            const float *x = inp + t * K;
            for (int64_t k = 0; k < K; k++) d[k * MM2_MR + r] = x[k];
        } else {
            for (int64_t k = 0; k < K; k++) d[k * MM2_MR + r] = 0.0f;
        }
    }
}

T256 static void ukr_f32(float *c, int64_t ldc, const void *xpv, const void *wpv, int64_t ks, int first) {
    const float *xp = xpv, *wp = wpv;
    __m256 a[MM2_MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MM2_MR; r++) {
        a[r][0] = first ? _mm256_setzero_ps() : _mm256_load_ps(c + r * ldc);
        a[r][1] = first ? _mm256_setzero_ps() : _mm256_load_ps(c + r * ldc + 8);
    }
    for (int64_t s = 0; s < ks; s++) {
        const __m256 w0 = _mm256_load_ps(wp + s * MM2_NW), w1 = _mm256_load_ps(wp + s * MM2_NW + 8);
        const float *x = xp + s * MM2_MR;
#pragma GCC unroll 8
        for (int r = 0; r < MM2_MR; r++) {
            const __m256 b = _mm256_broadcast_ss(x + r);
            a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MM2_MR; r++) {
        _mm256_store_ps(c + r * ldc, a[r][0]);
        _mm256_store_ps(c + r * ldc + 8, a[r][1]);
    }
}

static const GemmKernel k_f32 = {"avx2-f32", MM2_MR, MM2_NW, MM2_KC, 1, pack_x_f32, pack_w_f32, ukr_f32};

const GemmKernel *gemm_kernel_avx2_f32(void) { return &k_f32; }

#else

const GemmKernel *gemm_kernel_avx2_f32(void) { return 0; }

#endif
