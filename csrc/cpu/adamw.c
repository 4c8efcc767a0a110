// adamw.c: see adamw.h.
#include "adamw.h"

#include <math.h>

void adamw_update(float *p, float *m, float *v, const float *g, int64_t n, const AdamWParams *hp, int nthreads) {
    const double bc1 = 1.0 - pow(hp->beta1, (double)hp->step), bc2 = 1.0 - pow(hp->beta2, (double)hp->step);
    const float decay = 1.0f - hp->lr * hp->weight_decay, b1 = hp->beta1, b2 = hp->beta2;
    const float step_size = (float)(hp->lr / bc1), sqrt_bc2 = (float)sqrt(bc2), eps = hp->eps;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * (mi / (sqrtf(vi) / sqrt_bc2 + eps));
    }
}
