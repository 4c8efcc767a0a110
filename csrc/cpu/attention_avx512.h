// attention_avx512.h: the AVX-512 attention task (attention_avx512.c), called
// from attention.h when the model's kernel path is avx512 or avx512bf16.
#ifndef ARMORM_CPU_ATTENTION_AVX512_H
#define ARMORM_CPU_ATTENTION_AVX512_H

#include <stddef.h>
#include <stdint.h>
#include "../model.h"  // AttnParams
#include "../prefix.h"  // SeqIndex

// Queries per attention task, on both paths. A portable task (attention.h) is
// one head of one sequence, so it computes ATT_QB rows; an AVX-512 task is one
// KV group, so it computes ATT_QB rows for every query head of the group (the
// group's transposed K block and each V row then serve all of them). A row's
// result does not depend on the block it is computed in.
#define ATT_QB 16

// Bytes of per-thread scratch attention_avx512_task needs.
size_t attention_avx512_scratch(int nh, int nkv, int hd);
// One task: sequence `seq` of ix, KV group g, queries at positions q0 .. q0+nq-1
// (nq <= ATT_QB) of its full token list, every query head of the group; scale,
// soft-cap and window from ap.
void attention_avx512_task(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix, int seq,
                           int64_t q0, int nq, int g, int nh, int nkv, int hd, const AttnParams *ap, void *scratch);

#endif
