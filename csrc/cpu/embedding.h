// embedding.h: x (T,H) = rows of the embedding table, converted to fp32 and scaled.
// Token ids were bounds-checked by batch_validate before any kernel runs.
#ifndef ARMORM_CPU_EMBEDDING_H
#define ARMORM_CPU_EMBEDDING_H

#include <stdint.h>
#include "../model.h"
#include "../dtype.h"

// scale: Model.embed_scale (1, or Gemma's sqrt(H) in the embedding's dtype); x * 1 is exact.
static void embedding(float *x, const int32_t *tokens, const WTensor *emb, float scale, int64_t T, int nthreads) {
    const int64_t H = emb->cols;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const int64_t base = (int64_t)tokens[t] * H;
        for (int64_t i = 0; i < H; i++) x[t * H + i] = load_as_f32(emb->data, (int)emb->dtype, base + i) * scale;
    }
}

#endif
