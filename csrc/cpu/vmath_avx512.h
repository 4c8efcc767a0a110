// vmath_avx512.h: vector math on AVX-512 registers, shared by the AVX-512
// operations (attention's softmax, SwiGLU's sigmoid).
//
// Header-only (static inline, with the target attribute): each file that
// uses it is compiled without -march flags and reaches this code only when
// cpu_features.c found AVX-512 F/BW/VL. The build has no FP contraction
// (-std=c11), so every caller rounds identically.
#ifndef ARMORM_CPU_VMATH_AVX512_H
#define ARMORM_CPU_VMATH_AVX512_H

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// exp(x) for a vector, about 1 ulp: x = n ln2 + r, |r| <= ln2/2, e^r by its
// degree-7 Taylor polynomial (truncation < 0.1 ulp), times 2^n via scalef
// (which gives 0 and +inf at the ends of the range). exp(-inf) = 0.
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f), ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-110.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2hi, x);
    r = _mm512_fnmadd_ps(n, ln2lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif
#endif
