// immintrin.h (test shim): the AVX-512 intrinsics csrc/cpu/attention_avx512.c uses, emulated in portable C
// by SIMDe (libsimde-dev, system headers), plus the few SIMDe 0.7 lacks, lane by lane. Only for
// tests/test_avx512_emulated.py: it lets a CPU without AVX-512 run the avx512 attention path's code.
#ifndef ARMORM_TEST_IMMINTRIN_SHIM_H
#define ARMORM_TEST_IMMINTRIN_SHIM_H

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>

#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
typedef simde__mmask16 __mmask16;

// masked loads read only the selected lanes (a row of O ends at its last used lane)
static inline simde__m512 emu_maskz_load(simde__mmask16 k, const void *p) {
    simde__m512_private r;
    const float *f = (const float *)p;
    for (int i = 0; i < 16; i++) r.f32[i] = ((k >> i) & 1) ? f[i] : 0.0f;
    return simde__m512_from_private(r);
}
static inline void emu_mask_store(void *p, simde__mmask16 k, simde__m512 v) {
    simde__m512_private a = simde__m512_to_private(v);
    float *f = (float *)p;
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) f[i] = a.f32[i];
}
static inline float emu_reduce_max(simde__m512 v) {
    simde__m512_private a = simde__m512_to_private(v);
    float m = a.f32[0];
    for (int i = 1; i < 16; i++) m = a.f32[i] > m ? a.f32[i] : m;
    return m;
}
static inline float emu_reduce_add(simde__m512 v) {  // halves added pairwise, as GCC's expansion does
    simde__m512_private a = simde__m512_to_private(v);
    float t[16];
    for (int i = 0; i < 16; i++) t[i] = a.f32[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] = t[i] + t[i + w];
    return t[0];
}
#define _mm512_maskz_loadu_ps emu_maskz_load
#define _mm512_maskz_load_ps emu_maskz_load
#define _mm512_mask_storeu_ps emu_mask_store
#define _mm512_mask_store_ps emu_mask_store
#define _mm512_reduce_max_ps emu_reduce_max
#define _mm512_reduce_add_ps emu_reduce_add

#endif
