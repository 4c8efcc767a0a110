// weight_pass.c: the one pass over a checkpoint's bytes at load (see weight_pass.h).
//
// The inner loops are plain C over blocks of BLOCK elements with accumulators
// as narrow as the elements (uint16 counts for 16-bit dtypes), which GCC
// vectorises for baseline x86-64; the pass is memory (or disk) bound, not
// compute bound, so no per-ISA variants are needed.
#define _GNU_SOURCE
#include "weight_pass.h"
#include "dtype.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__linux__) && !defined(MADV_POPULATE_READ)
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and pages fault in as read
#endif

#define CHUNK ((uint64_t)4 << 20)  // bytes of source per work item (a multiple of any page size up to 4 MiB)
#define BLOCK 32768                // elements per counting block: a uint16 count cannot overflow
#define UNALIGNED_BLOCK 1024       // elements per block of a misaligned source (4 KiB of stack)

typedef struct {
    int job;
    uint64_t e0, e1;  // element range
} Chunk;

static size_t elem_size(WDType t) { return t == WT_F32 ? 4 : 2; }

static uintptr_t page_size(void) {
    long pg = sysconf(_SC_PAGESIZE);
    return pg > 0 ? (uintptr_t)pg : 4096;
}

// Maps the pages of [p, p+bytes) in one call rather than one fault at a time.
static void populate(const void *p, size_t bytes, uintptr_t pg) {
#ifdef MADV_POPULATE_READ
    uintptr_t a = (uintptr_t)p & ~(pg - 1), b = (uintptr_t)p + bytes;
    if (b > a) madvise((void *)a, b - a, MADV_POPULATE_READ);  // best effort: a failure only means faults later
#else
    (void)p, (void)bytes, (void)pg;
#endif
}

// Drops the pages lying wholly inside [p, p+bytes) from this process's
// mapping. The mapping is a private read-only file mapping, so the pages are
// never dirty: a later read faults them back in from the file (page cache).
static void release(const void *p, size_t bytes, uintptr_t pg) {
    uintptr_t a = ((uintptr_t)p + pg - 1) & ~(pg - 1);
    uintptr_t b = ((uintptr_t)p + bytes) & ~(pg - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

// NaN/inf elements (exponent bits all ones) among n <= BLOCK elements.
static uint64_t count_block(const void *src, WDType t, size_t n) {
    if (t == WT_F32) {
        const uint32_t *u = src;
        uint32_t c = 0;
        for (size_t i = 0; i < n; i++) c += (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
        return c;
    }
    const uint16_t *u = src;
    const uint16_t m = t == WT_BF16 ? 0x7f80u : 0x7c00u;
    uint16_t c = 0;
    for (size_t i = 0; i < n; i++) c += (uint16_t)((u[i] & m) == m);
    return c;
}

// fp32 -> bf16, round to nearest even, NaN kept quiet: f32_to_bf16 without branches.
static void f32_to_bf16_block(uint16_t *d, const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = s[i];
        uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        uint32_t quiet = (u >> 16) | 0x0040u;
        d[i] = (uint16_t)((int32_t)(u & 0x7fffffffu) > 0x7f800000 ? quiet : rounded);
    }
}

static void convert_block(void *dst, WDType d, const void *src, WDType s, size_t n) {
    if (s == d) {
        memcpy(dst, src, n * elem_size(s));
    } else if (s == WT_F32 && d == WT_BF16) {
        f32_to_bf16_block(dst, src, n);
    } else if (s == WT_BF16 && d == WT_F32) {
        const uint16_t *u = src;
        uint32_t *o = dst;
        for (size_t i = 0; i < n; i++) o[i] = (uint32_t)u[i] << 16;
    } else {
        for (size_t i = 0; i < n; i++) {
            float x = load_as_f32(src, (int)s, (int64_t)i);
            if (d == WT_F32) ((float *)dst)[i] = x;
            else if (d == WT_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(x);
            else ((uint16_t *)dst)[i] = f32_to_f16(x);
        }
    }
}

// Counts the NaN/inf among elements e0 .. e1 of j's source (when j->check) and
// converts them to j->dst_dtype into dst (when not NULL), in one read.
static uint64_t scan(const WeightJob *j, uint64_t e0, uint64_t e1, void *dst) {
    const size_t es = elem_size(j->src_dtype), ed = elem_size(j->dst_dtype);
    // A source not aligned to its element size (legal in safetensors, never
    // written by the usual tools) is copied through an aligned buffer first.
    const int aligned = (uintptr_t)((const char *)j->src + e0 * es) % es == 0;
    const uint64_t step = aligned ? BLOCK : UNALIGNED_BLOCK;
    uint32_t tmp[UNALIGNED_BLOCK];
    uint64_t bad = 0;
    for (uint64_t b = e0; b < e1; b += step) {
        size_t m = (size_t)(e1 - b < step ? e1 - b : step);
        const void *p = (const char *)j->src + b * es;
        if (!aligned) {
            memcpy(tmp, p, m * es);
            p = tmp;
        }
        if (j->check) bad += count_block(p, j->src_dtype, m);
        if (dst) convert_block((char *)dst + (b - e0) * ed, j->dst_dtype, p, j->src_dtype, m);
    }
    return bad;
}

// A packing job reads its source in place when it is already the held dtype
// and aligned; otherwise each strip goes through a thread's buffer.
static int pack_staged(const WeightJob *j) {
    return j->src_dtype != j->dst_dtype || (uintptr_t)j->src % elem_size(j->src_dtype) != 0;
}

// Elements of one strip: the rows of one packed panel.
static uint64_t strip_elems(const WeightJob *j) { return (uint64_t)j->pack->nw * (uint64_t)j->cols; }

// Elements e0 .. e1 (whole strips) of a packing job: each strip converted
// (into `stage`, when staged), checked, and packed into its panel.
static uint64_t pack_strips(const WeightJob *j, uint64_t e0, uint64_t e1, void *stage) {
    const uint64_t se = strip_elems(j);
    const int64_t pw = gemm_panel_words(j->pack, j->cols);
    const int staged = pack_staged(j);
    uint64_t bad = 0;
    for (uint64_t s0 = e0; s0 < e1; s0 += se) {
        const uint64_t s1 = e1 - s0 < se ? e1 : s0 + se;
        // the strip as a matrix of its own: rows past it are the zero padding of W's last panel
        WTensor w = {.dtype = j->dst_dtype, .rows = (int64_t)((s1 - s0) / (uint64_t)j->cols), .cols = j->cols};
        if (staged) {
            bad += scan(j, s0, s1, stage);
            w.data = stage;
        } else {
            if (j->check) bad += scan(j, s0, s1, NULL);
            w.data = (const char *)j->src + s0 * elem_size(j->src_dtype);
        }
        gemm_pack_panel(j->pack, j->packed + (s0 / se) * pw, &w, 0, j->cols);
    }
    return bad;
}

static void run_chunk(WeightJob *j, uint64_t e0, uint64_t e1, uintptr_t pg, void *stage) {
    const size_t es = elem_size(j->src_dtype), ed = elem_size(j->dst_dtype);
    const char *s = (const char *)j->src + e0 * es;
    const size_t bytes = (size_t)(e1 - e0) * es;
    populate(s, bytes, pg);
    const uint64_t bad = j->pack ? pack_strips(j, e0, e1, stage)
                                 : scan(j, e0, e1, j->dst ? (char *)j->dst + e0 * ed : NULL);
    if (j->release) release(s, bytes, pg);
    if (bad) {
#pragma omp atomic
        j->nonfinite += bad;
    }
}

static int has_work(const WeightJob *j) { return j->check || j->dst || j->release || j->pack; }

// Strips per chunk of a packing job: about CHUNK bytes of source, at least one strip.
static uint64_t strips_per_chunk(const WeightJob *j) {
    const uint64_t b = strip_elems(j) * elem_size(j->src_dtype);
    return b >= CHUNK ? 1 : CHUNK / b;
}

int weight_pass_run(WeightJob *jobs, int n_jobs, int nthreads, ArmError *e) {
    const uintptr_t pg = page_size();
    // Chunk boundaries sit at multiples of CHUNK in the address space (packing jobs: at strip boundaries).
    size_t n_chunks = 0, stage_bytes = 0;
    for (int i = 0; i < n_jobs; i++) {
        const WeightJob *j = &jobs[i];
        jobs[i].nonfinite = 0;
        if (!has_work(j)) continue;
        if (j->pack) {
            const uint64_t strips = (j->n + strip_elems(j) - 1) / strip_elems(j), per = strips_per_chunk(j);
            n_chunks += (size_t)((strips + per - 1) / per);
            const size_t sb = (size_t)strip_elems(j) * elem_size(j->dst_dtype);
            if (pack_staged(j) && sb > stage_bytes) stage_bytes = sb;
            continue;
        }
        uintptr_t a = (uintptr_t)j->src, b = a + j->n * elem_size(j->src_dtype);
        if (b > a) n_chunks += (size_t)((b - 1) / CHUNK - a / CHUNK + 1);
    }
    if (n_chunks == 0) return 0;
    Chunk *ch = malloc(n_chunks * sizeof *ch);
    if (!ch) return arm_fail(e, "out of memory");
    size_t k = 0;
    for (int i = 0; i < n_jobs; i++) {
        const WeightJob *j = &jobs[i];
        if (!has_work(j)) continue;
        if (j->pack) {
            const uint64_t step = strips_per_chunk(j) * strip_elems(j);
            for (uint64_t e0 = 0; e0 < j->n; e0 += step) ch[k++] = (Chunk){i, e0, j->n - e0 < step ? j->n : e0 + step};
            continue;
        }
        const uint64_t es = elem_size(j->src_dtype);
        const uintptr_t a = (uintptr_t)j->src;
        uint64_t e0 = 0;
        while (e0 < j->n) {
            // the first element starting at or after the next CHUNK boundary
            uintptr_t next = (a + e0 * es) / CHUNK * CHUNK + CHUNK;
            uint64_t e1 = (next - a + es - 1) / es;
            if (e1 > j->n) e1 = j->n;
            ch[k++] = (Chunk){i, e0, e1};
            e0 = e1;
        }
    }
    const int64_t nk = (int64_t)k;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        void *stage = stage_bytes ? malloc(stage_bytes) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nk; c++) {
            WeightJob *j = &jobs[ch[c].job];
            if (j->pack && pack_staged(j) && !stage) { failed = 1; continue; }  // every thread must reach the loop
            run_chunk(j, ch[c].e0, ch[c].e1, pg, stage);
        }
        free(stage);
    }
    free(ch);
    if (failed) return arm_fail(e, "out of memory for a %zu-byte buffer packing weights", stage_bytes);
    // The pages a packing job's chunks share (a strip rarely ends on a page boundary).
    for (int i = 0; i < n_jobs; i++)
        if (jobs[i].pack && jobs[i].release) release(jobs[i].src, jobs[i].n * elem_size(jobs[i].src_dtype), pg);
    return 0;
}

#define HUGE_PAGE ((size_t)2 << 20)

void *weight_buffer_alloc(size_t bytes) {
    if (bytes < HUGE_PAGE) {  // (mmap below is page aligned)
        const size_t b = (bytes + 63) & ~(size_t)63;
        void *p = aligned_alloc(64, b ? b : 64);
        if (p) memset(p, 0, b ? b : 64);
        return p;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages it is plain pages
#endif
    return p;
}

void weight_buffer_free(void *p, size_t bytes) {
    if (!p) return;
    if (bytes < HUGE_PAGE) free(p);
    else munmap(p, bytes);
}
