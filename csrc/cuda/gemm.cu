// gemm.cu: the cuBLASLt wrapper declared in gemm.cuh.
#include "gemm.cuh"

#include <string.h>

int gemm_init(Gemm *g, void *workspace, size_t ws_bytes, ArmError *e) {
    memset(g, 0, sizeof *g);
    g->ws = workspace;
    g->ws_bytes = ws_bytes;
    LT_CHECK(cublasLtCreate(&g->lt));
    return 0;
}

static void plan_release(GemmPlan *p) {
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    if (p->op) cublasLtMatmulDescDestroy(p->op);
    memset(p, 0, sizeof *p);
}

void gemm_destroy(Gemm *g) {
    if (!g) return;
    for (int i = 0; i < GEMM_CACHE; i++) plan_release(&g->cache[i]);
    if (g->lt) cublasLtDestroy(g->lt);
    g->lt = NULL;
}

// Largest power of two (<= 256) dividing the address: what the heuristic may assume.
static uint32_t ptr_align(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && (a & (al - 1))) al >>= 1;
    return al;
}

// Fills p for the call's shape: descriptors from the values cuda_gemm_call
// planned (plan.cu), then the heuristic's first choice.
static int plan_build(Gemm *g, GemmPlan *p, const CudaGemmCall *c, int64_t T, int64_t N, int64_t K, uint32_t align,
                      ArmError *e) {
    const int y_f32 = c->c_f32;
    const cudaDataType_t yt = y_f32 ? CUDA_R_32F : CUDA_R_16BF;
    const cublasOperation_t opa = c->transa ? CUBLAS_OP_T : CUBLAS_OP_N, opb = c->transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    p->T = T;
    p->N = N;
    p->K = K;
    p->y_f32 = y_f32;
    p->align = align;
    LT_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, c->a_rows, c->a_cols, (int64_t)c->a_ld));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, c->b_rows, c->b_cols, (int64_t)c->b_ld));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->c, yt, c->c_rows, c->c_cols, (int64_t)c->c_ld));
    cublasLtMatmulPreference_t pref = NULL;
    LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = g->ws_bytes;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                             sizeof ws);
    const cublasLtMatmulPreferenceAttributes_t al_attrs[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; i++)
        st = cublasLtMatmulPreferenceSetAttribute(pref, al_attrs[i], &align, sizeof align);
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(g->lt, p->op, p->a, p->b, p->c, p->c, pref, 1, &res, &nres);
    cublasLtMatmulPreferenceDestroy(pref);
    LT_CHECK(st);
    if (nres < 1)
        return arm_fail(e, "cuBLAS error: cublasLtMatmulAlgoGetHeuristic found no algorithm for a bf16 GEMM "
                          "(%lld x %lld) @ (%lld x %lld)^T -> %s, alignment %u",
                        (long long)T, (long long)K, (long long)N, (long long)K, y_f32 ? "f32" : "bf16", align);
    p->algo = res.algo;
    p->valid = 1;
    return 0;
}

// The cached plan for the shape, building it (in the least recently used slot) on a miss.
static GemmPlan *plan_get(Gemm *g, const CudaGemmCall *c, int64_t T, int64_t N, int64_t K, uint32_t align,
                          ArmError *e) {
    const int y_f32 = c->c_f32;
    GemmPlan *victim = &g->cache[0];
    for (int i = 0; i < GEMM_CACHE; i++) {
        GemmPlan *p = &g->cache[i];
        if (p->valid && p->T == T && p->N == N && p->K == K && p->y_f32 == y_f32 && p->align == align) {
            p->last_use = ++g->clock;
            return p;
        }
        if (!p->valid || (victim->valid && p->last_use < victim->last_use)) victim = p;
    }
    plan_release(victim);
    if (plan_build(g, victim, c, T, N, K, align, e)) {
        plan_release(victim);
        return NULL;
    }
    victim->last_use = ++g->clock;
    return victim;
}

int gemm_bf16(Gemm *g, cudaStream_t st, void *y, int y_f32, int accumulate, const bf16 *x, const bf16 *W, int64_t T,
              int64_t N, int64_t K, ArmError *e) {
    CudaGemmCall c;
    if (cuda_gemm_call(&c, y, y_f32, accumulate, x, W, T, N, K))
        return arm_fail(e, "internal error: bad GEMM (%lld x %lld) @ (%lld x %lld)^T%s", (long long)T, (long long)K,
                        (long long)N, (long long)K, accumulate && !y_f32 ? " accumulating into bf16" : "");
    uint32_t align = ptr_align(y);
    if (ptr_align(x) < align) align = ptr_align(x);
    if (ptr_align(W) < align) align = ptr_align(W);
    GemmPlan *p = plan_get(g, &c, T, N, K, align, e);
    if (!p) return -1;
    LT_CHECK(cublasLtMatmul(g->lt, p->op, &c.alpha, c.A, p->a, c.B, p->b, &c.beta, c.C, p->c, c.C, p->c, &p->algo,
                            g->ws, g->ws_bytes, st));
    return 0;
}
