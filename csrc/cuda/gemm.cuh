// gemm.cuh: every projection of the backbone through cuBLASLt, bf16 inputs,
// fp32 compute (CUBLAS_COMPUTE_32F).
//
//   y (T, N) = x (T, K) @ W^T       W (N, K), all row-major, as nn.Linear stores it
//   y (T, N) += x (T, K) @ W^T      y in f32: the residual add fused into the epilogue
//
// cuBLASLt is column-major; a row-major (T, N) matrix is a column-major
// (N, T) one, so this is D (N x T) = op(A) B with A = W read as (K x N)
// column-major and transposed, B = x as (K x T) column-major. Those values come
// from cuda_gemm_call (plan.cu), which the CPU tests interpret without a GPU.
// Descriptors and the heuristic's algorithm are cached per shape: the same
// few shapes repeat in every layer.
#ifndef ARMORM_CUDA_GEMM_CUH
#define ARMORM_CUDA_GEMM_CUH

#include <cublasLt.h>
#include "common.cuh"

#define GEMM_CACHE 16

typedef struct {
    int valid;
    int64_t T, N, K;
    int y_f32;
    uint32_t align;                     // smallest alignment of the three pointers, capped at 256
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    uint64_t last_use;
} GemmPlan;

typedef struct {
    cublasLtHandle_t lt;
    void *ws;                           // device workspace (owned by the caller)
    size_t ws_bytes;
    GemmPlan cache[GEMM_CACHE];
    uint64_t clock;
} Gemm;

int gemm_init(Gemm *g, void *workspace, size_t ws_bytes, ArmError *e);
void gemm_destroy(Gemm *g);
// y_f32: y is f32 (and accumulate may be 1: y += ...); else y is bf16 and accumulate must be 0.
int gemm_bf16(Gemm *g, cudaStream_t st, void *y, int y_f32, int accumulate, const bf16 *x, const bf16 *W, int64_t T,
              int64_t N, int64_t K, ArmError *e);

#endif
