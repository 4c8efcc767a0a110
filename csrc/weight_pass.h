// weight_pass.h: the one pass over a checkpoint's bytes at load.
//
// model_load decides what each tensor needs (model.c); this runs it for all
// tensors at once, because at 8B scale the pass is what a load costs:
//   - counting NaN/inf elements (check_finite), with integer compares on the
//     exponent bits in blocks the compiler vectorises;
//   - converting to another dtype (an fp32 checkpoint held in bf16), or
//     copying a tensor whose bytes are misaligned for its dtype, in the same
//     read of the source as the count, so a checkpoint larger than RAM is
//     read from disk once;
//   - packing a matrix into a GEMM kernel's layout (prepacked weights,
//     cpu/gemm.h), converted to the held dtype on the way, strip by strip of
//     the kernel's panels, with no converted copy of the whole matrix;
//   - dropping source pages from the mapping once read (converted and packed
//     tensors, and sparsely read ones such as the embedding), so the process
//     never holds a converted or packed copy and its source together.
// Work is split into chunks of CHUNK bytes aligned to the address space (so a
// dropped page never belongs to another chunk; a packing job's chunks are
// whole panel strips instead, and the pages they share are dropped after the
// parallel loop), handed out dynamically to the
// threads of a single parallel region, in the order the jobs are given (file
// order reads a cold file sequentially). Each chunk's pages are prefetched into
// the page tables in one call (MADV_POPULATE_READ) instead of fault by fault.
#ifndef ARMORM_WEIGHT_PASS_H
#define ARMORM_WEIGHT_PASS_H

#include <stddef.h>
#include <stdint.h>
#include "model.h"
#include "cpu/gemm.h"

typedef struct {
    const void *src;       // stored elements (in a file mapping)
    WDType src_dtype;
    uint64_t n;            // element count
    void *dst;             // copy to fill (n elements of dst_dtype), or NULL: the source is used in place
    WDType dst_dtype;
    int check;             // count NaN/inf of the source into `nonfinite`
    int release;           // drop the source's pages from the mapping once read
    // Packing: with `pack` set, the source is a (rows, cols) matrix written,
    // converted to dst_dtype, into `packed` in pack's layout (ceil(rows/nw)
    // panels of gemm_panel_words); dst must be NULL.
    const GemmKernel *pack;
    int64_t rows, cols;
    uint32_t *packed;
    uint64_t nonfinite;    // out: NaN/inf elements found (when check)
} WeightJob;

// Runs every job on up to nthreads threads. Returns 0, or -1 (message in e)
// when the chunk table or a thread's strip buffer (packing a converted or
// misaligned matrix) cannot be allocated; job results are then undefined.
int weight_pass_run(WeightJob *jobs, int n_jobs, int nthreads, ArmError *e);

// A zero-filled, 64-byte aligned buffer for converted or packed tensors (the
// GEMM kernels load packed panels aligned), backed by huge pages where the
// kernel offers them (first touch of memory is the cost of converting a
// large checkpoint). Free with weight_buffer_free(p, bytes). NULL when out of memory.
void *weight_buffer_alloc(size_t bytes);
void weight_buffer_free(void *p, size_t bytes);

#endif
