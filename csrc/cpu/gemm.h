// gemm.h: the cache-blocked GEMM driver under both matrix products of the core:
// the model's x @ W^T (matmul.h, the forward pass) and training's op(A) @ op(B)
// (gemm_general.h, which presents B as the "W" of the same loops).
//
//   out (T,N) [+]= inp (T,K) fp32 @ W(N,K)^T + bias(N)
//
// A path supplies a GemmKernel: how to pack activations (tiles of mr tokens,
// k-major, zero-padded rows), how to pack a block of W (panels of nw output
// columns, k-major, zero-padded rows), and a register-blocked micro-kernel
// computing an mr x nw tile over a run of k-steps. The driver (gemm_driver.c)
// owns the loops: threads take blocks of output columns (dynamic schedule),
// then token blocks, then k blocks.
//
// Prepacked W: a caller that multiplies by the same W again and again (the
// model's weights) may pack all of it once (gemm_pack_panel, at load) and give
// gemm_run the packed copy; the micro-kernel then reads the very bytes the
// per-call packing would have written, so results do not change by a bit.
// Layout: panel p (output columns p*nw .. p*nw+nw) holds all of K, its k
// blocks one after another: block k0 starts at word (k0 / kstep) * nw (a full
// block is kc / kstep steps, a multiple of 16, so no padding lies between
// blocks), and the last block is zero-padded to 16 steps as pack_w pads it.
// Panels follow one another, gemm_panel_words(g, K) words each.
//
// Bit-identity: every output element is one accumulator lane that sees the
// same k-steps in the same order (k blocks are carried through the C buffer
// exactly), then the same epilogue (+bias, then += out). Nothing depends on
// T, the row's place in the batch, the blocking sizes or the thread count.
#ifndef ARMORM_CPU_GEMM_H
#define ARMORM_CPU_GEMM_H

#include <stdint.h>
#include "../model.h"

typedef struct {
    const char *name;
    int mr;      // tokens per micro-tile
    int nw;      // output columns per packed W panel (multiple of 16)
    int kc;      // k elements per cache block (multiple of 32, so of 16 * kstep)
    int kstep;   // k elements per packed step: 1 (fp32) or 2 (bf16 pairs); a step is 4 bytes
    // dst [ceil(K/kstep)][mr]: rows t0..t0+mr of x (rows >= T and k >= K are zero).
    // x is what gemm_run was given: a const float * (T,K) for the model's paths.
    void (*pack_x)(void *dst, const void *x, int64_t T, int64_t K, int64_t t0);
    // dst [round16(ceil(kc/kstep))][nw]: W rows n0..n0+nw, k0..k0+kc (rows >= N, k >= K zero).
    // w is what gemm_run was given: a const WTensor * for the model's paths.
    void (*pack_w)(void *dst, const void *w, int64_t n0, int64_t k0, int64_t kc);
    // c (mr rows, stride ldc, nw columns, 64-byte aligned) = (first ? 0 : c) + xp . wp over ksteps
    void (*ukr)(float *c, int64_t ldc, const void *xp, const void *wp, int64_t ksteps, int first);
} GemmKernel;

// out (T,N) [+]= x (T,K) . w (N,K)^T + bias, x and w in whatever form the
// kernel's packers read. wpacked: W already packed (the layout above, ceil(N/nw)
// panels), and w is not read; NULL: W is packed from w, block by block, per call.
// Returns 0, or -1 when a scratch allocation fails.
int gemm_run(const GemmKernel *g, float *out, const void *x, const void *w, const uint32_t *wpacked, int64_t T,
             int64_t N, int64_t K, const float *bias, int accumulate, int nthreads);

// 4-byte words of one prepacked panel of a W with K columns.
int64_t gemm_panel_words(const GemmKernel *g, int64_t K);
// Writes the panel of W rows n0 .. n0+nw (rows past W's end zero), all of K,
// into dst (gemm_panel_words words, 64-byte aligned) with g's pack_w.
void gemm_pack_panel(const GemmKernel *g, uint32_t *dst, const void *w, int64_t n0, int64_t K);

// The kernels each SIMD path offers (NULL when the build has no such path).
// f32: fp32 arithmetic for F32/BF16/F16 weights; bf16: vdpbf16ps, BF16 weights only.
const GemmKernel *gemm_kernel_avx512_f32(void);
const GemmKernel *gemm_kernel_avx512_bf16(void);
const GemmKernel *gemm_kernel_avx2_f32(void);

// The kernel the model's x @ W^T runs on, on kernel path `path` (ArmKernel)
// with weights held in `wdtype`; NULL: the portable code (matmul.h), which
// packs nothing. The one place that choice is made: the forward pass
// (matmul.h) and the load-time packing (model.c) both ask here.
const GemmKernel *gemm_kernel_for(int path, WDType wdtype);

#endif
