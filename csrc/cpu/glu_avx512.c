// glu_avx512.c: the gated activation g = act(g) * u (glu.h) on AVX-512, 16
// lanes at a time (masked tail), for both activations.
//
// Why: with libm's scalar expf the MLP's activation costs more than its share
// once the matrix products run on AVX-512. Both activations are x times a
// sigmoid, x / (1 + exp(-z)), with z = x (SiLU) or 2 sqrt(2/pi) (x + 0.044715
// x^3) (tanh GELU), using vmath_avx512.h's exp. Compiled without -march
// flags; reached only when cpu_features.c found AVX-512 F/BW/VL (glu.h
// dispatches on the kernel path).
#include "glu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "vmath_avx512.h"

__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void glu_avx512(float *g, const float *u, int64_t n,
                                                                         int act) {
    const __m512 one = _mm512_set1_ps(1.0f), m2k = _mm512_set1_ps(-GELU_TANH_2K);
    const __m512 c = _mm512_set1_ps(GELU_TANH_C);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(m, g + i), y = _mm512_maskz_loadu_ps(m, u + i);
        const __m512 negz = act == ACT_GELU_TANH
                                ? _mm512_mul_ps(m2k, _mm512_fmadd_ps(_mm512_mul_ps(c, _mm512_mul_ps(x, x)), x, x))
                                : _mm512_sub_ps(_mm512_setzero_ps(), x);
        const __m512 e = exp512(negz);
        _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), y));
    }
}

#else

void glu_avx512(float *g, const float *u, int64_t n, int act) { (void)g; (void)u; (void)n; (void)act; }

#endif
