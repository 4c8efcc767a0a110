// attention.h: causal grouped-query attention over packed sequences.
//
// What a layer's attention computes (score scale, soft-capping, sliding
// window) comes in an AttnParams (model.h, config_attn_params): every kernel
// path applies the same three, in the same places.
//
// q (T, nh*hd), k and v (T, nkv*hd), out (T, nh*hd); sequences given by a
// SeqIndex (prefix.h): packed rows, and for a sequence that continues another
// one, its offset and parent. Each task is one (sequence, head, block of
// ATT_QB queries) and walks the keys of the full sequence in blocks of ATT_KB
// (from key 0, or from the window's first block) with an online softmax
// (running max and sum), so memory is O(ATT_QB * (ATT_KB + hd)) per thread,
// never L x L. Key j is read from packed row seq_row(j): a continuation reads
// its prefix's rows first. Query blocks are aligned to multiples of ATT_QB in
// the full sequence (a continuation's first block may be shorter), so a query
// meets the same key blocks and the same block ends whatever else is in the
// batch and whether or not its prefix is shared (docs/best_of_n.md). On the
// avx512 kernel paths a task is (sequence, KV group, query block) and runs
// attention_avx512_task (attention_avx512.c): the same scheme, vectorised;
// ATT_QB is shared.
#ifndef ARMORM_CPU_ATTENTION_H
#define ARMORM_CPU_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../model.h"
#include "cpu_features.h"
#include "attention_avx512.h"  // ATT_QB, the AVX-512 task
#include "softcap.h"
#include "../prefix.h"

#define ATT_KB 64  // keys per block of the online softmax

typedef struct {
    int64_t q0;  // first query of the block: its position in the full sequence
    int seq;     // the sequence
    int nq;      // queries in the block (q0 .. q0 + nq - 1)
    int head;
} AttTask;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ARMORM_NO_CLONES)
#define ATT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATT_CLONES
#endif

// First key block (a multiple of `kb` within the sequence) holding a key some
// query from q0 on can see: 0 without a window.
static inline int64_t att_first_key_block(int64_t q0, int64_t window, int64_t kb) {
    const int64_t lo = window > 0 ? q0 - window + 1 : 0;
    return lo > 0 ? lo / kb * kb : 0;
}

// Portable path. Scores are computed against a transposed key block so the
// inner loop runs over keys (contiguous, vectorised by the clones); each score
// is still the sequential sum over c of q[c] * k[c], times scale. The build has
// no FP contraction (-std=c11), so every clone rounds identically.
ATT_CLONES
static void attention_block(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix,
                            const AttTask *tk, int nh, int nkv, int hd, const AttnParams *ap, float *scratch) {
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const int g = tk->head / (nh / nkv);
    const int64_t nq = tk->nq, qrow0 = ix->cu[tk->seq] + tk->q0 - ix->off[tk->seq];  // the queries' own rows
    int64_t krow[ATT_KB];
    const float scale = ap->scale;
    const int64_t W = ap->window;
    float *acc = scratch;                  // (ATT_QB, hd)
    float *sc = acc + ATT_QB * hd;         // (ATT_QB, ATT_KB)
    float *kt = sc + ATT_QB * ATT_KB;      // (hd, ATT_KB): the key block, transposed
    float mx[ATT_QB], sum[ATT_QB];
    memset(acc, 0, sizeof(float) * (size_t)(ATT_QB * hd));
    for (int i = 0; i < ATT_QB; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
    const int64_t kend = tk->q0 + nq;  // keys needed: up to the last query (causal), from the window's start
    for (int64_t k0 = att_first_key_block(tk->q0, W, ATT_KB); k0 < kend; k0 += ATT_KB) {
        const int64_t nk = kend - k0 < ATT_KB ? kend - k0 : ATT_KB;
        seq_rows(krow, ix, tk->seq, k0, nk);
        for (int64_t j = 0; j < nk; j++) {
            const float *kr = k + krow[j] * ks + (int64_t)g * hd;
            for (int c = 0; c < hd; c++) kt[c * ATT_KB + j] = kr[c];
        }
        for (int64_t i = 0; i < nq; i++) {
            const int64_t qi = tk->q0 + i;
            const float *qr = q + (qrow0 + i) * qs + (int64_t)tk->head * hd;
            float m = mx[i];
            float *s = sc + i * ATT_KB;
            int64_t lim = qi - k0 + 1;  // keys [lo, lim) of this block are visible to query qi
            if (lim > nk) lim = nk;
            const int64_t lo = W > 0 && qi - W + 1 - k0 > 0 ? qi - W + 1 - k0 : 0;
            if (lim <= lo) continue;
            for (int64_t j = lo; j < lim; j++) s[j] = 0.0f;
            for (int c = 0; c < hd; c++) {
                const float qc = qr[c], *kc = kt + c * ATT_KB;
                for (int64_t j = lo; j < lim; j++) s[j] += qc * kc[j];
            }
            for (int64_t j = lo; j < lim; j++) s[j] *= scale;
            softcap_row(s + lo, lim - lo, ap->softcap);
            for (int64_t j = lo; j < lim; j++)
                if (s[j] > m) m = s[j];
            const float corr = expf(mx[i] - m);  // exp(-inf) = 0 on the first block
            float *a = acc + i * hd;
            float l = sum[i] * corr;
            for (int c = 0; c < hd; c++) a[c] *= corr;
            for (int64_t j = lo; j < lim; j++) {
                const float p = expf(s[j] - m);
                l += p;
                const float *vr = v + krow[j] * ks + (int64_t)g * hd;
                for (int c = 0; c < hd; c++) a[c] += p * vr[c];
            }
            mx[i] = m;
            sum[i] = l;
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        float *o = out + (qrow0 + i) * qs + (int64_t)tk->head * hd;
        const float inv = 1.0f / sum[i];
        for (int c = 0; c < hd; c++) o[c] = acc[i * hd + c] * inv;
    }
}

// Tasks run in slices of ATT_POLL_TASKS; `cancel` (may be NULL) is polled on
// the calling thread between slices, so a long attention over thousands of
// tokens stops promptly on Ctrl-C. A task's result does not depend on its slice.
#define ATT_POLL_TASKS 256

// The query blocks of one sequence: positions off .. off+len-1 of its full
// token list, cut at multiples of ATT_QB. Writes them (last first: the longest
// blocks start first, which balances the dynamic schedule) when `tasks` is
// not NULL; returns how many there are.
static int64_t att_query_blocks(AttTask *tasks, int seq, int64_t off, int64_t len, int per_block) {
    int64_t n = 0;
    for (int64_t end = off + len; end > off;) {
        const int64_t q0 = (end - 1) / ATT_QB * ATT_QB > off ? (end - 1) / ATT_QB * ATT_QB : off;
        if (tasks)
            for (int h = 0; h < per_block; h++) tasks[n + h] = (AttTask){q0, seq, (int)(end - q0), h};
        n += per_block;
        end = q0;
    }
    return n;
}

// Returns 0, -1 when scratch allocation fails, -2 when `cancel` asked to stop.
static int attention(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix, int B, int nh,
                     int nkv, int hd, const AttnParams *ap, int nthreads, int kernel, int (*cancel)(void *),
                     void *cancel_ctx) {
    const int simd = kernel >= ARM_KERNEL_AVX512;
    const int per_block = simd ? nkv : nh;  // tasks per query block
    int64_t ntasks = 0;
    for (int b = 0; b < B; b++) ntasks += att_query_blocks(NULL, b, ix->off[b], ix->cu[b + 1] - ix->cu[b], per_block);
    AttTask *tasks = malloc((size_t)ntasks * sizeof *tasks);
    if (!tasks) return -1;
    int64_t n = 0;
    for (int b = 0; b < B; b++)
        n += att_query_blocks(tasks + n, b, ix->off[b], ix->cu[b + 1] - ix->cu[b], per_block);
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
                    attention_avx512_task(out, q, k, v, ix, tasks[i].seq, tasks[i].q0, tasks[i].nq, tasks[i].head,
                                          nh, nkv, hd, ap, scratch);
                else
                    attention_block(out, q, k, v, ix, &tasks[i], nh, nkv, hd, ap, scratch);
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
