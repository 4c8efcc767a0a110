// softcap.h: attention logit soft-capping, s = cap * tanh(s / cap).
//
// Gemma-2 bounds every attention score to (-cap, cap) before the softmax
// (cap = attn_logit_softcapping, 50). The reference divides, takes tanh and
// multiplies in fp32, in that order; so does this. Shared by every attention
// kernel path (attention.h, attention_avx512.c): the scores of a row are
// capped in place right after scaling, before the mask and the running max.
#ifndef ARMORM_CPU_SOFTCAP_H
#define ARMORM_CPU_SOFTCAP_H

#include <math.h>
#include <stdint.h>

// s[0..n) = cap * tanh(s / cap); cap <= 0 leaves s as it is.
static inline void softcap_row(float *s, int64_t n, float cap) {
    if (!(cap > 0.0f)) return;
    for (int64_t j = 0; j < n; j++) s[j] = tanhf(s[j] / cap) * cap;
}

#endif
