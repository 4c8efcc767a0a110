// avx512_util.h: AVX-512 helpers shared by the packers (matmul_avx512.c,
// gemm_general.c): target attributes, the 16x16 dword transpose that turns
// rows into k-major panels, and tail masks.
//
// Include only from x86-64 GCC/clang code; every function carries a target
// attribute and runs only after cpu_features.c confirmed the instructions.
#ifndef ARMORM_CPU_AVX512_UTIL_H
#define ARMORM_CPU_AVX512_UTIL_H

#include <immintrin.h>
#include <stdint.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,avx512bf16")))

// In-register transpose of 16 rows of 16 dwords: r[j] becomes column j.
T512 static inline void tr16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g .. 4g+3
    for (int g = 0; g < 4; g++) {
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // 4x4 transpose of 128-bit lanes among u[c], u[4+c], u[8+c], u[12+c]
    for (int c = 0; c < 4; c++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        r[0 + c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

// the low min(max(n, 0), 16 or 32) bits
static inline __mmask16 mask16(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}
static inline __mmask32 mask32(int64_t n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? 0 : (__mmask32)((1u << n) - 1);
}

#endif
