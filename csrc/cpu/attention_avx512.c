// attention_avx512.c: AVX-512 causal GQA attention block (flash-style). Scale,
// soft-capping (softcap.h, per row of scores) and sliding window come in an
// AttnParams.
//
// Why: scalar attention ran at a few GFLOP/s and, at 512-token prompts, took
// longer than all the matmuls together. One task is (sequence, KV group,
// block of ATT_QB queries); its rows are every query head of the group for
// those queries, so one transposed K block and each V row serve G heads. Per
// key block of 64: S = Q K^T (register-blocked, 6 rows x 64 keys), causal
// mask, online softmax (running max and sum), O = O*corr + P V (6 rows x 64
// head dims). Every row's arithmetic depends only on its own query, head and
// position within its sequence, never on the batch or the thread running it.
// Key j of a block is read from packed row seq_row(j) (prefix.h), so a
// sequence continuing a shared prefix reads the prefix's keys and values.
// Compiled without -march flags; reached only when cpu_features.c found
// AVX-512 F/BW/VL.
#include "attention_avx512.h"
#include "softcap.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "vmath_avx512.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

#define KB 64  // keys per block (4 zmm of scores per row)
#define RT 6   // rows per register tile

size_t attention_avx512_scratch(int nh, int nkv, int hd) {
    const size_t R = (size_t)(nh / nkv) * ATT_QB, hd16 = ((size_t)hd + 15) / 16 * 16;
    // floats: kt (hd16 x KB), S (R x KB), O (R x hd16), max, sum, corr (R); then R row pointers; + alignment slack
    return (hd16 * KB + R * KB + R * hd16 + 3 * R) * sizeof(float) + R * sizeof(float *) + 64;
}

static inline __mmask16 m16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

// S rows r0..r0+nr (nr <= RT) = (q row . kt) * scale, 64 keys.
T512 static inline void scores_tile(float *S, const float *const *qrow, int nr, const float *kt, int hd, float scale) {
    __m512 a[RT][4];
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < 4; j++) a[r][j] = _mm512_setzero_ps();
    for (int c = 0; c < hd; c++) {
        const __m512 k0 = _mm512_load_ps(kt + c * KB), k1 = _mm512_load_ps(kt + c * KB + 16);
        const __m512 k2 = _mm512_load_ps(kt + c * KB + 32), k3 = _mm512_load_ps(kt + c * KB + 48);
#pragma GCC unroll 8
        for (int r = 0; r < RT; r++) {
            if (r >= nr) break;
            const __m512 b = _mm512_set1_ps(qrow[r][c]);
            a[r][0] = _mm512_fmadd_ps(b, k0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(b, k1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(b, k2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(b, k3, a[r][3]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++) {
        if (r >= nr) break;
        for (int j = 0; j < 4; j++) _mm512_store_ps(S + r * KB + 16 * j, _mm512_mul_ps(a[r][j], sc));
    }
}

// O rows (nr <= RT), head dims c0..c0+64 (masked to hd) = O*corr + P V. Lanes past
// hd are neither read nor written (a row of O is only hd16 floats).
T512 static inline void pv_tile(float *O, int ldo, const float *P, const float *corr, int nr, const float *v,
                                int64_t ldv, const int64_t *vrow, int nk, int c0, int hd) {
    __m512 a[RT][4];
    __mmask16 mk[4];
    for (int j = 0; j < 4; j++) mk[j] = m16(hd - c0 - 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++) {
        if (r >= nr) break;
        const __m512 cr = _mm512_set1_ps(corr[r]);
        for (int j = 0; j < 4; j++) a[r][j] = _mm512_mul_ps(_mm512_maskz_load_ps(mk[j], O + r * ldo + c0 + 16 * j), cr);
    }
    for (int jk = 0; jk < nk; jk++) {
        const float *vr = v + vrow[jk] * ldv + c0;
        const __m512 v0 = _mm512_maskz_loadu_ps(mk[0], vr), v1 = _mm512_maskz_loadu_ps(mk[1], vr + 16);
        const __m512 v2 = _mm512_maskz_loadu_ps(mk[2], vr + 32), v3 = _mm512_maskz_loadu_ps(mk[3], vr + 48);
#pragma GCC unroll 8
        for (int r = 0; r < RT; r++) {
            if (r >= nr) break;
            const __m512 b = _mm512_set1_ps(P[r * KB + jk]);
            a[r][0] = _mm512_fmadd_ps(b, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(b, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(b, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(b, v3, a[r][3]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++) {
        if (r >= nr) break;
        for (int j = 0; j < 4; j++) _mm512_mask_store_ps(O + r * ldo + c0 + 16 * j, mk[j], a[r][j]);
    }
}

T512 void attention_avx512_task(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix,
                                int seq, int64_t q0, int nq, int g, int nh, int nkv, int hd, const AttnParams *ap,
                                void *scratch) {
    const int G = nh / nkv, hd16 = (hd + 15) / 16 * 16;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const int64_t start = ix->cu[seq] - ix->off[seq];  // packed row of query position qi: start + qi
    int64_t krow[KB];                                   // packed rows of the block's keys
    const int R = G * nq;  // row r: head g*G + r / nq, query q0 + r % nq
    const float scale = ap->scale;
    const int64_t W = ap->window;  // > 0: query qi sees keys (qi - W, qi]
    float *kt = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *S = kt + hd16 * KB, *O = S + (size_t)G * ATT_QB * KB, *mx = O + (size_t)G * ATT_QB * hd16;
    float *sum = mx + G * ATT_QB, *corr = sum + G * ATT_QB;
    const float **qrow = (const float **)(corr + G * ATT_QB);
    for (int r = 0; r < R; r++) {
        qrow[r] = q + (start + q0 + r % nq) * qs + (int64_t)(g * G + r / nq) * hd;
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
        memset(O + (size_t)r * hd16, 0, sizeof(float) * (size_t)hd16);
    }
    const int64_t kend = q0 + nq;  // keys needed: up to the last query (causal), from the window's start
    const int64_t kfirst = W > 0 && q0 - W + 1 > 0 ? (q0 - W + 1) / KB * KB : 0;
    for (int64_t k0 = kfirst; k0 < kend; k0 += KB) {
        const int nk = (int)(kend - k0 < KB ? kend - k0 : KB);
        seq_rows(krow, ix, seq, k0, nk);
        // kt[c][j] = K[k0 + j][c] for this group, zero for j >= nk
        for (int c = 0; c < hd; c++) {
            float *d = kt + c * KB;
            for (int j = 0; j < nk; j++) d[j] = k[krow[j] * ks + (int64_t)g * hd + c];
            for (int j = nk; j < KB; j++) d[j] = 0.0f;
        }
        for (int r0 = 0; r0 < R; r0 += RT)
            scores_tile(S + (size_t)r0 * KB, qrow + r0, R - r0 < RT ? R - r0 : RT, kt, hd, scale);
        if (ap->softcap > 0.0f)
            for (int r = 0; r < R; r++) softcap_row(S + (size_t)r * KB, nk, ap->softcap);
        // causal (and window) mask, online softmax: P = exp(S - running max), corr rescales what came before
        for (int r = 0; r < R; r++) {
            const int64_t qi = q0 + r % nq;
            int64_t lim = qi - k0 + 1;  // keys [lo, lim) of this block are visible
            if (lim > nk) lim = nk;
            const int64_t lo = W > 0 && qi - W + 1 - k0 > 0 ? qi - W + 1 - k0 : 0;
            float *s = S + (size_t)r * KB;
            if (lim <= lo) {  // no visible key in this block: the row is unchanged
                corr[r] = 1.0f;
                for (int j = 0; j < 4; j++) _mm512_store_ps(s + 16 * j, _mm512_setzero_ps());
                continue;
            }
            __m512 sv[4], vmax = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < 4; j++) {
                const __mmask16 m = m16(lim - 16 * j) & (__mmask16)~m16(lo - 16 * j);
                sv[j] = _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), _mm512_load_ps(s + 16 * j));
                vmax = _mm512_max_ps(vmax, sv[j]);
            }
            const float bm = _mm512_reduce_max_ps(vmax);
            const float mnew = bm > mx[r] ? bm : mx[r];
            const __m512 mv = _mm512_set1_ps(mnew);
            __m512 ps = _mm512_setzero_ps();
            for (int j = 0; j < 4; j++) {
                const __mmask16 m = m16(lim - 16 * j) & (__mmask16)~m16(lo - 16 * j);
                const __m512 p = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(sv[j], mv)));
                _mm512_store_ps(s + 16 * j, p);
                ps = _mm512_add_ps(ps, p);
            }
            const float c = expf(mx[r] - mnew);  // exp(-inf) = 0 on the first block
            corr[r] = c;
            sum[r] = sum[r] * c + _mm512_reduce_add_ps(ps);
            mx[r] = mnew;
        }
        for (int c0 = 0; c0 < hd; c0 += 64)
            for (int r0 = 0; r0 < R; r0 += RT) {
                // rows of one tile may mix heads; each row's V is the group's V, the same for all
                pv_tile(O + (size_t)r0 * hd16, hd16, S + (size_t)r0 * KB, corr + r0, R - r0 < RT ? R - r0 : RT,
                        v + (int64_t)g * hd, ks, krow, nk, c0, hd);
            }
    }
    for (int r = 0; r < R; r++) {
        float *o = out + (start + q0 + r % nq) * qs + (int64_t)(g * G + r / nq) * hd;
        const float inv = 1.0f / sum[r];
        const float *a = O + (size_t)r * hd16;
        for (int c = 0; c < hd; c++) o[c] = a[c] * inv;
    }
}

#else

size_t attention_avx512_scratch(int nh, int nkv, int hd) { (void)nh; (void)nkv; (void)hd; return 0; }
void attention_avx512_task(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix, int seq,
                           int64_t q0, int nq, int g, int nh, int nkv, int hd, const AttnParams *ap, void *scratch) {
    (void)out; (void)q; (void)k; (void)v; (void)ix; (void)seq; (void)q0; (void)nq; (void)g; (void)nh; (void)nkv;
    (void)hd; (void)ap; (void)scratch;
}

#endif
