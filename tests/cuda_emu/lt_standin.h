// lt_standin.h: a CPU stand-in for one cublasLtMatmul, interpreting the values
// of a CudaGemmCall (backend_cuda.h) exactly as cuBLASLt defines them: every
// matrix column-major (rows, cols, leading dimension), op(X) = X^T when trans,
//   D = alpha op(A) op(B) + beta C,  C and D one buffer,
// A and B bf16, C/D fp32 or bf16; sums in double, one rounding at the end.
// It refuses (returns -1 with the reason) a call cuBLASLt would refuse: shapes
// that do not chain, a leading dimension smaller than its matrix's rows.
#ifndef ARMORM_CUDA_EMU_LT_STANDIN_H
#define ARMORM_CUDA_EMU_LT_STANDIN_H

#include <stdio.h>
#include <string.h>

#include "backend_cuda.h"
#include "emu.h"

static int lt_standin_run(const CudaGemmCall *c, char *why, size_t len) {
    // op(A) is m x k, op(B) is k x n, C is m x n
    const uint64_t m = c->transa ? c->a_cols : c->a_rows, ka = c->transa ? c->a_rows : c->a_cols;
    const uint64_t kb = c->transb ? c->b_cols : c->b_rows, n = c->transb ? c->b_rows : c->b_cols;
    if (ka != kb || c->c_rows != m || c->c_cols != n) {
        snprintf(why, len, "shapes do not chain: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu", (unsigned long long)m,
                 (unsigned long long)ka, (unsigned long long)kb, (unsigned long long)n,
                 (unsigned long long)c->c_rows, (unsigned long long)c->c_cols);
        return -1;
    }
    if (c->a_ld < c->a_rows || c->b_ld < c->b_rows || c->c_ld < c->c_rows) {
        snprintf(why, len, "a leading dimension is smaller than its matrix's rows");
        return -1;
    }
    const __nv_bfloat16 *A = (const __nv_bfloat16 *)c->A, *B = (const __nv_bfloat16 *)c->B;
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            double s = 0.0;
            for (uint64_t l = 0; l < ka; l++) {
                const float a = (float)(c->transa ? A[l + i * c->a_ld] : A[i + l * c->a_ld]);
                const float b = (float)(c->transb ? B[j + l * c->b_ld] : B[l + j * c->b_ld]);
                s += (double)a * b;
            }
            const uint64_t at = i + j * c->c_ld;
            if (c->c_f32) {
                float *C = (float *)c->C;
                C[at] = (float)(c->alpha * s + (c->beta != 0.0f ? (double)c->beta * C[at] : 0.0));
            } else {
                __nv_bfloat16 *C = (__nv_bfloat16 *)c->C;
                C[at] = __float2bfloat16_rn((float)(c->alpha * s + (c->beta != 0.0f ? (double)c->beta * (float)C[at] : 0.0)));
            }
        }
    return 0;
}

#endif
