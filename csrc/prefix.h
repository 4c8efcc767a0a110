// prefix.h: sequences of a packed batch that continue another one (shared prefixes).
//
// Why: N responses to one prompt share every token of the prompt. A Batch may
// say so (Batch.parent): sequence b then holds in the packed token array only
// the tokens that follow its parent's, its full token list is the parent's
// full list followed by its own tokens, and its positions start at the
// parent's full length (its offset). The prefix is computed once; every
// continuation reads its keys and values and its rows for the heads.
//
// Position j of sequence b's full token list lives in packed row
// seq_row(ix, b, j): in b's own rows when j >= off[b], else in its parent's
// (recursively: a parent may continue another sequence). Every kernel path
// addresses keys this way and nothing else, so a continuation's arithmetic is
// the arithmetic of its full sequence scored alone.
#ifndef ARMORM_PREFIX_H
#define ARMORM_PREFIX_H

#include <stdint.h>

typedef struct {
    const int64_t *cu;      // (B+1) first packed row of each sequence
    const int64_t *off;     // (B) position of each sequence's first own token (0 without a parent)
    const int32_t *parent;  // (B) the sequence each continues, -1 for none; NULL when no sequence has one
} SeqIndex;

// Packed row of position j (0 <= j < off[b] + own length) of sequence b's full token list.
static inline int64_t seq_row(const SeqIndex *ix, int b, int64_t j) {
    while (j < ix->off[b]) b = ix->parent[b];
    return ix->cu[b] + j - ix->off[b];
}

// rows[i] = seq_row(ix, b, j0 + i) for i < n; one walk up the parents per
// change of owner, since the positions increase.
static inline void seq_rows(int64_t *rows, const SeqIndex *ix, int b, int64_t j0, int64_t n) {
    for (int64_t i = 0; i < n;) {
        const int64_t j = j0 + i;
        int owner = b;
        while (j < ix->off[owner]) owner = ix->parent[owner];
        // positions j .. end of the owner's own rows stay in the owner
        const int64_t own_end = ix->off[owner] + (ix->cu[owner + 1] - ix->cu[owner]);
        const int64_t base = ix->cu[owner] - ix->off[owner];
        for (; i < n && j0 + i < own_end; i++) rows[i] = base + j0 + i;
    }
}

// The same walk over the CUDA backend's int32 arrays (its batch upload): the
// host packs head rows with it (plan.cu), the attention kernels address keys
// with it (k_attention.cuh).
#ifdef __CUDACC__
#define PREFIX_HD __host__ __device__
#else
#define PREFIX_HD
#endif
static inline PREFIX_HD int32_t seq_row32(const int32_t *cu, const int32_t *off, const int32_t *parent, int b,
                                          int64_t j) {
    while (j < off[b]) b = parent[b];
    return (int32_t)(cu[b] + j - off[b]);
}
#undef PREFIX_HD

#endif
