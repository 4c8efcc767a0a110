// plan.cu: host-side planning for the CUDA backend: where every weight and
// buffer lives, how a packed batch is laid out for its one upload, which
// attention tiles exist, launch shapes, the cuBLASLt call of a projection and
// the free-memory check.
//
// Pure arithmetic on the host: no CUDA API call here, so all of it runs (and
// is unit-tested) on machines without a GPU or driver.
#include "backend_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Reserves `bytes` at the cursor (CUDA_ALIGN-aligned) and returns its offset.
static int64_t carve(int64_t *cursor, int64_t bytes) {
    int64_t off = align_up(*cursor, CUDA_ALIGN);
    *cursor = off + bytes;
    return off;
}

int cuda_attn_tc_supported(int head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

int cuda_weight_layout(const Config *c, CudaWeightLayout *w) {
    memset(w, 0, sizeof *w);
    const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
    const int64_t QD = (int64_t)c->num_heads * c->head_dim, KD = (int64_t)c->num_kv_heads * c->head_dim;
    if (H <= 0 || I <= 0 || V <= 0 || QD <= 0 || KD <= 0 || c->num_layers <= 0) return -1;
    if (c->arch == ARCH_ARMORM && c->gating_n_hidden + 1 > CUDA_MAX_GATE_LAYERS) return -1;
    const int64_t bf = 2, f4 = 4;
    int64_t cur = 0;
    w->embed = carve(&cur, V * H * bf);
    w->final_norm = carve(&cur, H * f4);
    w->inv_freq = carve(&cur, (int64_t)(c->head_dim / 2) * f4);
    // one layer, laid out relative to its own start
    int64_t lc = 0;
    w->wqkv = carve(&lc, (QD + 2 * KD) * H * bf);
    w->wo = carve(&lc, H * QD * bf);
    w->wgu = carve(&lc, 2 * I * H * bf);
    w->wdown = carve(&lc, H * I * bf);
    w->attn_norm = carve(&lc, H * f4);
    w->mlp_norm = carve(&lc, H * f4);
    w->bqkv = w->bo = w->bgu = w->bdown = -1;
    if (c->attention_bias) {
        w->bqkv = carve(&lc, (QD + 2 * KD) * f4);
        w->bo = carve(&lc, H * f4);
    }
    if (c->mlp_bias) {
        w->bgu = carve(&lc, 2 * I * f4);
        w->bdown = carve(&lc, H * f4);
    }
    w->layer_stride = align_up(lc, CUDA_ALIGN);
    w->layers = carve(&cur, w->layer_stride * c->num_layers);
    w->regression = w->transform = w->score = -1;
    for (int j = 0; j < CUDA_MAX_GATE_LAYERS; j++) w->gate_w[j] = w->gate_b[j] = -1;
    if (c->arch == ARCH_ARMORM) {
        const int64_t K = c->num_objectives, D = c->gating_hidden_dim;
        w->regression = carve(&cur, K * H * f4);
        w->transform = carve(&cur, K * K * f4);
        for (int j = 0; j <= c->gating_n_hidden; j++) {
            const int64_t in = j == 0 ? H : D, od = j == c->gating_n_hidden ? K : D;
            w->gate_w[j] = carve(&cur, od * in * f4);
            w->gate_b[j] = carve(&cur, od * f4);
        }
    } else if (c->arch == ARCH_SEQCLS) {
        w->score = carve(&cur, (int64_t)c->num_labels * H * f4);
    }
    w->total = align_up(cur, CUDA_ALIGN);
    return 0;
}

int cuda_act_layout(const Config *c, int64_t max_tokens, CudaActLayout *a) {
    memset(a, 0, sizeof *a);
    if (max_tokens <= 0 || max_tokens > INT32_MAX) return -1;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const int64_t QD = (int64_t)c->num_heads * c->head_dim, KD = (int64_t)c->num_kv_heads * c->head_dim;
    const int64_t T = max_tokens, chunk = T < CUDA_MLP_CHUNK ? T : CUDA_MLP_CHUNK;
    int64_t cur = 0;
    a->max_tokens = T;
    a->mlp_chunk = chunk;
    a->x = carve(&cur, T * H * 4);
    a->xn = carve(&cur, T * H * 2);
    a->qkv = carve(&cur, T * (QD + 2 * KD) * 2);
    a->att = carve(&cur, T * QD * 2);
    a->gu = carve(&cur, chunk * 2 * I * 2);
    a->h = carve(&cur, chunk * I * 2);
    a->total = align_up(cur, CUDA_ALIGN);
    return 0;
}

int64_t cuda_attn_tile_count(const int64_t *cu_seqlens, int B, int block_q) {
    if (B <= 0 || block_q <= 0) return 0;
    int64_t n = 0;
    for (int b = 0; b < B; b++) {
        const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
        if (len <= 0) return 0;
        n += (len + block_q - 1) / block_q;
    }
    return n;
}

static int cmp_tile(const void *pa, const void *pb) {
    const CudaAttnTile *a = (const CudaAttnTile *)pa, *b = (const CudaAttnTile *)pb;
    if (a->q0 != b->q0) return a->q0 > b->q0 ? -1 : 1;  // more keys to visit first
    return (a->seq > b->seq) - (a->seq < b->seq);
}

int64_t cuda_attn_plan(const int64_t *cu_seqlens, int B, int block_q, CudaAttnTile *tiles, int64_t cap) {
    const int64_t n = cuda_attn_tile_count(cu_seqlens, B, block_q);
    if (n <= 0 || n > cap) return -1;
    int64_t k = 0;
    for (int b = 0; b < B; b++) {
        const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
        if (len > INT32_MAX) return -1;
        for (int64_t q0 = 0; q0 < len; q0 += block_q) tiles[k++] = (CudaAttnTile){b, (int32_t)q0};
    }
    // A tile's cost grows with q0 (causal: it visits q0 + block_q keys);
    // launching the costly ones first keeps the tail of the grid short.
    qsort(tiles, (size_t)n, sizeof *tiles, cmp_tile);
    return n;
}

int cuda_batch_layout(const Config *c, int64_t T, int64_t B, int64_t ntiles, int want_all_hidden,
                      CudaBatchLayout *l) {
    memset(l, 0, sizeof *l);
    if (T <= 0 || B <= 0 || B > T || ntiles <= 0 || T > INT32_MAX) return -1;
    const int64_t H = c->hidden_size;
    const int64_t K = c->arch == ARCH_ARMORM ? c->num_objectives : 0;
    const int64_t D = c->arch == ARCH_ARMORM ? c->gating_hidden_dim : 0;
    const int64_t NL = c->arch == ARCH_SEQCLS ? c->num_labels : 0;
    l->T = T;
    l->B = B;
    l->ntiles = ntiles;
    int64_t n = 0;
    l->tokens = n; n += T;
    l->pos = n; n += T;
    l->cu = n; n += B + 1;
    l->rows = n; n += 2 * B;
    l->tiles = n; n += 2 * ntiles;
    l->n_ints = n;
    // results: 64-float (256-byte) aligned sections keep every cudaMemcpy and float4 path aligned
    int64_t f = 0;
    l->hidden = f; f = align_up(f + B * H, 64);
    l->prompt = f; f = align_up(f + B * H, 64);
    l->rewards = f; f = align_up(f + B * K, 64);
    l->gating = f; f = align_up(f + B * K, 64);
    l->score = f; f = align_up(f + B, 64);
    l->logits = f; f = align_up(f + B * NL, 64);
    l->all_hidden = f; f = align_up(f + (want_all_hidden ? T * H : 0), 64);
    l->n_floats = f;
    l->scratch_floats = 2 * B * (D > K ? D : K);
    const int64_t up = align_up(l->n_ints * 4, CUDA_ALIGN), res = align_up(l->n_floats * 4, CUDA_ALIGN);
    l->device_bytes = up + res + align_up(l->scratch_floats * 4, CUDA_ALIGN);
    l->host_bytes = up + res;
    return 0;
}

int cuda_batch_pack(const Batch *b, const CudaBatchLayout *l, int block_q, int32_t *buf) {
    const int64_t T = b->cu_seqlens[b->B];
    if (T != l->T || b->B != l->B) return -1;
    for (int64_t t = 0; t < T; t++) buf[l->tokens + t] = b->tokens[t];
    for (int s = 0; s < b->B; s++) {
        const int64_t start = b->cu_seqlens[s], len = b->cu_seqlens[s + 1] - start;
        for (int64_t i = 0; i < len; i++) buf[l->pos + start + i] = (int32_t)i;
        buf[l->cu + s] = (int32_t)start;
        buf[l->rows + s] = (int32_t)(start + (b->reward_pos ? b->reward_pos[s] : len - 1));
        buf[l->rows + b->B + s] = (int32_t)(b->gating_pos ? start + b->gating_pos[s] : 0);
    }
    buf[l->cu + b->B] = (int32_t)T;
    CudaAttnTile *tiles = (CudaAttnTile *)(buf + l->tiles);  // two int32 per tile, int32-aligned struct
    return cuda_attn_plan(b->cu_seqlens, b->B, block_q, tiles, l->ntiles) == l->ntiles ? 0 : -1;
}

int cuda_plan_memory(const Config *c, int64_t max_tokens, CudaMemPlan *p) {
    memset(p, 0, sizeof *p);
    CudaWeightLayout w;
    CudaActLayout a;
    CudaBatchLayout bl;
    if (cuda_weight_layout(c, &w) || cuda_act_layout(c, max_tokens, &a)) return -1;
    const int64_t B = max_tokens / 64 > 0 ? max_tokens / 64 : 1;
    if (cuda_batch_layout(c, max_tokens, B, max_tokens / CUDA_ATTN_BLOCK_Q + B, 0, &bl)) return -1;
    // the kernels index rows with int32 and elements with int64; these products must stay in range
    const int64_t QKV = (int64_t)(c->num_heads + 2 * c->num_kv_heads) * c->head_dim;
    if (QKV > INT32_MAX || 2LL * c->intermediate_size > INT32_MAX) return -1;
    p->max_tokens = max_tokens;
    p->weight_bytes = w.total;
    p->activation_bytes = a.total;
    p->batch_bytes = bl.device_bytes;
    p->workspace_bytes = CUDA_LT_WORKSPACE + 2 * CUDA_UPLOAD_CHUNK;
    p->reserve_bytes = CUDA_RESERVE_BYTES;
    p->total_bytes = p->weight_bytes + p->activation_bytes + p->batch_bytes + p->workspace_bytes + p->reserve_bytes;
    return 0;
}

static double gib(int64_t b) { return (double)b / (double)(1LL << 30); }

int cuda_plan_check_fits(const CudaMemPlan *p, int64_t free_bytes, int64_t total_bytes, int device, char *msg,
                         size_t len) {
    if (p->total_bytes <= free_bytes) return 0;
    snprintf(msg, len,
             "not enough GPU memory on cuda:%d: the model needs %lld bytes (%.2f GiB: weights %.2f GiB, "
             "activations for %lld tokens %.2f GiB, batch buffers %.2f GiB, workspace %.2f GiB, reserve %.2f GiB) "
             "but only %lld bytes (%.2f GiB) of %.2f GiB are free; free GPU memory or use device_map='cpu'",
             device, (long long)p->total_bytes, gib(p->total_bytes), gib(p->weight_bytes),
             (long long)p->max_tokens, gib(p->activation_bytes), gib(p->batch_bytes), gib(p->workspace_bytes),
             gib(p->reserve_bytes), (long long)free_bytes, gib(free_bytes), gib(total_bytes));
    return -1;
}

static unsigned clamp_grid(int64_t n) {
    // a grid-stride loop covers the rest; 132 SMs x 16 blocks keeps an H100 full
    const int64_t cap = 132 * 16;
    return (unsigned)(n < 1 ? 1 : n > cap ? cap : n);
}

CudaLaunch cuda_launch_rows(int64_t rows, int64_t cols) {
    CudaLaunch l = {0, 1, 1, 0, 0};
    // enough threads that each handles ~4 columns, a whole number of warps, at most 1024
    int64_t th = (cols + 3) / 4;
    th = (th + 31) / 32 * 32;
    if (th < 32) th = 32;
    if (th > 1024) th = 1024;
    l.grid_x = (unsigned)(rows < 1 ? 1 : rows);
    l.block = (unsigned)th;
    return l;
}

CudaLaunch cuda_launch_elementwise(int64_t n, int per_thread) {
    CudaLaunch l = {0, 1, 1, 256, 0};
    const int64_t threads = (n + per_thread - 1) / (per_thread > 0 ? per_thread : 1);
    l.grid_x = clamp_grid((threads + 255) / 256);
    return l;
}

CudaLaunch cuda_launch_attention(int64_t ntiles, int64_t T, int num_heads, int head_dim) {
    CudaLaunch l = {0, (unsigned)num_heads, 1, 0, 0};
    if (cuda_attn_tc_supported(head_dim)) {
        l.grid_x = (unsigned)ntiles;       // one CTA per (tile, query head)
        l.block = 128;                     // 4 warps x 16 query rows = CUDA_ATTN_BLOCK_Q
    } else {
        l.grid_x = (unsigned)T;            // one warp per (query token, head)
        l.block = 32;
        l.smem = (size_t)head_dim * 2 * sizeof(float);  // the query and the accumulator, fp32
    }
    return l;
}

CudaLaunch cuda_launch_head_linear(int64_t B, int64_t N) {
    CudaLaunch l = {0, 1, 1, 256, 0};
    const int64_t warps = B * N, per_block = 256 / 32;
    l.grid_x = (unsigned)((warps + per_block - 1) / per_block);
    return l;
}

int cuda_gemm_call(CudaGemmCall *c, void *y, int y_f32, int accumulate, const void *x, const void *W, int64_t T,
                   int64_t N, int64_t K) {
    memset(c, 0, sizeof *c);
    if (T <= 0 || N <= 0 || K <= 0 || (accumulate && !y_f32)) return -1;
    c->transa = 1;  // W^T: (N x K) from the (K x N) column-major view of row-major W
    c->transb = 0;
    c->a_rows = (uint64_t)K, c->a_cols = (uint64_t)N, c->a_ld = (uint64_t)K;
    c->b_rows = (uint64_t)K, c->b_cols = (uint64_t)T, c->b_ld = (uint64_t)K;
    c->c_rows = (uint64_t)N, c->c_cols = (uint64_t)T, c->c_ld = (uint64_t)N;
    c->c_f32 = y_f32;
    c->alpha = 1.0f;
    c->beta = accumulate ? 1.0f : 0.0f;  // beta = 1: the residual add in the epilogue
    c->A = W;
    c->B = x;
    c->C = y;
    return 0;
}
