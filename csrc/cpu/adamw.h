// adamw.h: one AdamW update of a float32 parameter, in place, in one pass.
//
// Why: stage-2 training updates ~6.3M gating parameters every step; NumPy
// spends ten passes over memory on it (a third of a step's time once the
// GEMMs run in bf16). Same arithmetic as torch.optim.AdamW (decoupled weight
// decay, bias correction, eps added after the square root), elementwise, so
// the result does not depend on the thread count.
#ifndef ARMORM_CPU_ADAMW_H
#define ARMORM_CPU_ADAMW_H

#include <stdint.h>

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    int64_t step;  // 1 on the first update (bias correction)
} AdamWParams;

// p, m, v (n) updated with gradient g (n).
void adamw_update(float *p, float *m, float *v, const float *g, int64_t n, const AdamWParams *hp, int nthreads);

#endif
