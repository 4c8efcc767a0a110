// swiglu_avx512.c: g = silu(g) * u on AVX-512, 16 lanes at a time (masked tail).
//
// Why: with libm's scalar expf the MLP's activation costs more than its share
// once the matrix products run on AVX-512. silu(x) = x / (1 + exp(-x)) with
// vmath_avx512.h's exp. Compiled without -march flags; reached only when
// cpu_features.c found AVX-512 F/BW/VL (swiglu.h dispatches on the kernel path).
#include "swiglu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "vmath_avx512.h"

__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void swiglu_avx512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(m, g + i), y = _mm512_maskz_loadu_ps(m, u + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), y));
    }
}

#else

void swiglu_avx512(float *g, const float *u, int64_t n) { (void)g; (void)u; (void)n; }

#endif
