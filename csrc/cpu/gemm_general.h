// gemm_general.h: training's product, C (M,N) [+]= op(A) (M,K) @ op(B) (K,N)
// with bf16 operands and fp32 accumulation, for any layout of A and B (the
// forward pass's x @ W^T with a checkpoint weight is matmul.h).
//
// Why: training needs products the forward pass never makes: the stage-2
// gating MLP's backward pass (dW = dZ^T H, dH = dZ W) and stage 1's Gram
// matrices (X^T X) multiply activations by activations, in both layouts.
// Rather than transposing copies in NumPy, the packers read either layout and
// round fp32 to bf16 (round-to-nearest-even) as they pack; the loops and the
// micro-kernel are gemm_driver.c's and matmul_avx512.c's vdpbf16ps kernel.
// Without AVX512_BF16 the same math (bf16-rounded operands, fp32 sums) runs
// in plain C: slower, and its sums are ordered differently.
//
// Results are deterministic: for a given kernel path they do not depend on
// the thread count (see gemm.h).
#ifndef ARMORM_CPU_GEMM_GENERAL_H
#define ARMORM_CPU_GEMM_GENERAL_H

#include <stdint.h>
#include "../model.h"

typedef struct {
    const void *data;    // row-major, rows x cols
    WDType dtype;        // WT_F32 or WT_BF16 (bit patterns)
    int64_t rows, cols;  // as stored
    int trans;           // the operand is data^T
} GemmOperand;

typedef enum { GEMM_GENERAL_PORTABLE = 0, GEMM_GENERAL_AVX512BF16 = 1 } GemmGeneralPath;

// The fastest path this CPU runs.
GemmGeneralPath gemm_general_best(void);
const char *gemm_general_name(GemmGeneralPath p);

// c (M,N) = [c +] op(a) @ op(b). The caller has checked the shapes agree and
// that c overlaps neither operand. Returns 0, or -1 when scratch allocation
// fails (c is then unspecified).
int gemm_general(float *c, const GemmOperand *a, const GemmOperand *b, int accumulate, int nthreads,
                 GemmGeneralPath path);

#endif
