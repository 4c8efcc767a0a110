// attention_simd.h: the AVX-512 attention task and vector helpers
// (attention_avx512.c), called from attention.h / glu.h when the model's
// kernel path is avx512 or avx512bf16.
#ifndef ARMORM_CPU_ATTENTION_SIMD_H
#define ARMORM_CPU_ATTENTION_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include "../model.h"
#include "../prefix.h"

#define ATT5_QB 16  // queries per task (times the heads of one KV group)

// Bytes of per-thread scratch attention_avx512_task needs.
size_t attention_avx512_scratch(int nh, int nkv, int hd);
// One task: sequence `seq` of ix, KV group g, queries at positions q0 .. q0+nq-1
// (nq <= ATT5_QB) of its full token list, every query head of the group; scale,
// soft-cap and window from ap.
void attention_avx512_task(float *out, const float *q, const float *k, const float *v, const SeqIndex *ix, int seq,
                           int64_t q0, int nq, int g, int nh, int nkv, int hd, const AttnParams *ap, void *scratch);
// g[i] = act(g[i]) * u[i], act ACT_SILU or ACT_GELU_TANH (glu.h)
void arm_glu_avx512(float *g, const float *u, int64_t n, int act);

#endif
