// attention.h: causal grouped-query attention over packed sequences.
//
// q (T, nh*hd), k and v (T, nkv*hd), out (T, nh*hd); sequences given by
// cu_seqlens (B+1). Each task is one (sequence, head, block of ATT_QB queries)
// and walks the keys in blocks of ATT_KB with an online softmax (running max
// and sum), so memory is O(ATT_QB * (ATT_KB + hd)) per thread, never L x L.
// Query blocks start at each sequence's first token, so a sequence's result
// does not depend on what else is in the batch. On the avx512 kernel paths a
// task is (sequence, KV group, query block) and runs attention_avx512_task
// (attention_avx512.c): the same scheme, vectorised.
#ifndef ARMORM_CPU_ATTENTION_H
#define ARMORM_CPU_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_features.h"
#include "attention_simd.h"

#define ATT_QB 16
#define ATT_KB 64

typedef struct {
    int64_t start;  // first token of the sequence
    int64_t len;    // tokens in the sequence
    int64_t q0;     // first query of the block, relative to start
    int head;
} AttTask;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ARMORM_NO_CLONES)
#define ATT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATT_CLONES
#endif

// Portable path. Scores are computed against a transposed key block so the
// inner loop runs over keys (contiguous, vectorised by the clones); each score
// is still the sequential sum over c of q[c] * k[c], times scale. The build has
// no FP contraction (-std=c11), so every clone rounds identically.
ATT_CLONES
static void attention_block(float *out, const float *q, const float *k, const float *v, const AttTask *tk,
                            int nh, int nkv, int hd, float *scratch) {
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const int g = tk->head / (nh / nkv);
    const int64_t nq = tk->len - tk->q0 < ATT_QB ? tk->len - tk->q0 : ATT_QB;
    const float scale = 1.0f / sqrtf((float)hd);
    float *acc = scratch;                  // (ATT_QB, hd)
    float *sc = acc + ATT_QB * hd;         // (ATT_QB, ATT_KB)
    float *kt = sc + ATT_QB * ATT_KB;      // (hd, ATT_KB): the key block, transposed
    float mx[ATT_QB], sum[ATT_QB];
    memset(acc, 0, sizeof(float) * (size_t)(ATT_QB * hd));
    for (int i = 0; i < ATT_QB; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
    const int64_t kend = tk->q0 + nq;  // keys needed: 0 .. last query (causal)
    for (int64_t k0 = 0; k0 < kend; k0 += ATT_KB) {
        const int64_t nk = kend - k0 < ATT_KB ? kend - k0 : ATT_KB;
        for (int64_t j = 0; j < nk; j++) {
            const float *kr = k + (tk->start + k0 + j) * ks + (int64_t)g * hd;
            for (int c = 0; c < hd; c++) kt[c * ATT_KB + j] = kr[c];
        }
        for (int64_t i = 0; i < nq; i++) {
            const int64_t qi = tk->q0 + i;
            const float *qr = q + (tk->start + qi) * qs + (int64_t)tk->head * hd;
            float m = mx[i];
            float *s = sc + i * ATT_KB;
            int64_t lim = qi - k0 + 1;  // keys of this block visible to query qi
            if (lim > nk) lim = nk;
            if (lim <= 0) continue;
            for (int64_t j = 0; j < lim; j++) s[j] = 0.0f;
            for (int c = 0; c < hd; c++) {
                const float qc = qr[c], *kc = kt + c * ATT_KB;
                for (int64_t j = 0; j < lim; j++) s[j] += qc * kc[j];
            }
            for (int64_t j = 0; j < lim; j++) {
                s[j] *= scale;
                if (s[j] > m) m = s[j];
            }
            const float corr = expf(mx[i] - m);  // exp(-inf) = 0 on the first block
            float *a = acc + i * hd;
            float l = sum[i] * corr;
            for (int c = 0; c < hd; c++) a[c] *= corr;
            for (int64_t j = 0; j < lim; j++) {
                const float p = expf(s[j] - m);
                l += p;
                const float *vr = v + (tk->start + k0 + j) * ks + (int64_t)g * hd;
                for (int c = 0; c < hd; c++) a[c] += p * vr[c];
            }
            mx[i] = m;
            sum[i] = l;
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        float *o = out + (tk->start + tk->q0 + i) * qs + (int64_t)tk->head * hd;
        const float inv = 1.0f / sum[i];
        for (int c = 0; c < hd; c++) o[c] = acc[i * hd + c] * inv;
    }
}

// Tasks run in slices of ATT_POLL_TASKS; `cancel` (may be NULL) is polled on
// the calling thread between slices, so a long attention over thousands of
// tokens stops promptly on Ctrl-C. A task's result does not depend on its slice.
#define ATT_POLL_TASKS 256

// Returns 0, -1 when scratch allocation fails, -2 when `cancel` asked to stop.
static int attention(float *out, const float *q, const float *k, const float *v, const int64_t *cu_seqlens,
                     int B, int nh, int nkv, int hd, int nthreads, int kernel, int (*cancel)(void *),
                     void *cancel_ctx) {
    const int simd = kernel >= ARM_KERNEL_AVX512;
    const int qb = simd ? ATT5_QB : ATT_QB, per_block = simd ? nkv : nh;  // tasks per query block
    int64_t ntasks = 0;
    for (int b = 0; b < B; b++) ntasks += (cu_seqlens[b + 1] - cu_seqlens[b] + qb - 1) / qb * per_block;
    AttTask *tasks = malloc((size_t)ntasks * sizeof *tasks);
    if (!tasks) return -1;
    int64_t n = 0;
    for (int b = 0; b < B; b++) {
        const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
        // longest query blocks first balances the dynamic schedule
        for (int64_t q0 = (len - 1) / qb * qb; q0 >= 0; q0 -= qb)
            for (int h = 0; h < per_block; h++) tasks[n++] = (AttTask){cu_seqlens[b], len, q0, h};
    }
    const size_t scratch_bytes = simd ? attention_avx512_scratch(nh, nkv, hd)
                                      : sizeof(float) * (size_t)(ATT_QB * hd + ATT_QB * ATT_KB + hd * ATT_KB);
    int failed = 0, cancelled = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *scratch = malloc(scratch_bytes);
        for (int64_t s0 = 0; s0 < ntasks; s0 += ATT_POLL_TASKS) {
            const int64_t s1 = ntasks - s0 < ATT_POLL_TASKS ? ntasks : s0 + ATT_POLL_TASKS;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = s0; i < s1; i++) {
                if (!scratch) { failed = 1; continue; }
                if (simd)  // head = KV group
                    attention_avx512_task(out, q, k, v, tasks[i].start, tasks[i].len, tasks[i].q0, tasks[i].head,
                                          nh, nkv, hd, scratch);
                else
                    attention_block(out, q, k, v, &tasks[i], nh, nkv, hd, scratch);
            }  // implicit barrier: the slice is done
#pragma omp master
            if (cancel && s1 < ntasks && cancel(cancel_ctx)) cancelled = 1;
#pragma omp barrier
            if (cancelled) break;
        }
        free(scratch);
    }
    free(tasks);
    return failed ? -1 : cancelled ? -2 : 0;
}

#endif
