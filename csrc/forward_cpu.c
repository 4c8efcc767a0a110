// forward_cpu.c: the whole CPU forward pass, top to bottom.
//
// Input: B token sequences packed end to end (no padding). For each layer:
//   xn = rmsnorm(x); q,k,v = xn W^T; rope(q,k); a = attention(q,k,v)
//   x += a Wo^T;  xn = rmsnorm(x);  x += down(silu(gate(xn)) * up(xn))
// then the final norm at the rows the heads read, and the heads.
// Activations are fp32 throughout; weights are read in their stored dtype.
#include "model.h"
#include "cpu/attention.h"
#include "cpu/embedding.h"
#include "cpu/head.h"
#include "cpu/matmul.h"
#include "cpu/rmsnorm.h"
#include "cpu/rope.h"
#include "cpu/swiglu.h"

#include <stdlib.h>
#include <string.h>

#define MLP_CHUNK 512  // tokens per MLP step: bounds the (tokens, I) buffers

// Activation buffers for one call; owned here, freed by runstate_free.
typedef struct {
    float *x;     // (T,H) residual stream
    float *xn;    // (T,H) normed input / projection output
    float *q;     // (T, nh*hd)
    float *k;     // (T, nkv*hd)
    float *v;     // (T, nkv*hd)
    float *att;   // (T, nh*hd)
    float *g, *u; // (MLP_CHUNK, I)
    int32_t *pos; // (T) position within its sequence
} RunState;

static void runstate_free(RunState *s) {
    free(s->x); free(s->xn); free(s->q); free(s->k); free(s->v); free(s->att);
    free(s->g); free(s->u); free(s->pos);
    memset(s, 0, sizeof *s);
}

static int runstate_alloc(RunState *s, const Config *c, int64_t T, ArmError *e) {
    memset(s, 0, sizeof *s);
    const size_t H = (size_t)c->hidden_size, QD = (size_t)c->num_heads * c->head_dim;
    const size_t KD = (size_t)c->num_kv_heads * c->head_dim, I = (size_t)c->intermediate_size;
    const size_t t = (size_t)T, mc = (size_t)(T < MLP_CHUNK ? T : MLP_CHUNK);
    s->x = malloc(t * H * sizeof(float));
    s->xn = malloc(t * H * sizeof(float));
    s->q = malloc(t * QD * sizeof(float));
    s->k = malloc(t * KD * sizeof(float));
    s->v = malloc(t * KD * sizeof(float));
    s->att = malloc(t * QD * sizeof(float));
    s->g = malloc(mc * I * sizeof(float));
    s->u = malloc(mc * I * sizeof(float));
    s->pos = malloc(t * sizeof(int32_t));
    if (!s->x || !s->xn || !s->q || !s->k || !s->v || !s->att || !s->g || !s->u || !s->pos) {
        runstate_free(s);
        return arm_fail(e, "out of memory for activations of %lld tokens", (long long)T);
    }
    return 0;
}

// Below m->parallel_min_flops a call runs on one thread: waking a team for
// every small op costs more than it saves, and on a busy machine each barrier
// can wait a whole scheduler tick. Results do not depend on the thread count.
static int threads_for(const Model *m, int64_t T) {
    const Config *c = &m->cfg;
    const double H = c->hidden_size, QD = (double)c->num_heads * c->head_dim,
                 KD = (double)c->num_kv_heads * c->head_dim, I = c->intermediate_size;
    const double flops = 2.0 * (double)T * c->num_layers * (H * (2.0 * QD + 2.0 * KD) + 3.0 * H * I);
    return flops < m->parallel_min_flops ? 1 : m->num_threads;
}

// Returns 0, -1 on error, -2 when `cancel` asked to stop (polled between attention slices and MLP chunks).
static int layer_forward(const Model *m, const LayerWeights *lw, RunState *s, const Batch *b, int64_t T, int nt,
                         CancelFn cancel, void *cancel_ctx, ArmError *e) {
    const Config *c = &m->cfg;
    const int kern = m->kernel;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const float eps = c->rms_norm_eps;
    // attention block
    rmsnorm(s->xn, s->x, lw->attn_norm.data, T, H, eps, nt);
    if (matmul(s->q, s->xn, &lw->q, &lw->q_b, T, 0, nt, kern) ||
        matmul(s->k, s->xn, &lw->k, &lw->k_b, T, 0, nt, kern) ||
        matmul(s->v, s->xn, &lw->v, &lw->v_b, T, 0, nt, kern))
        return arm_fail(e, "out of memory in matmul scratch");
    rope(s->q, s->pos, m->inv_freq, T, c->num_heads, c->head_dim, nt);
    rope(s->k, s->pos, m->inv_freq, T, c->num_kv_heads, c->head_dim, nt);
    const int ra = attention(s->att, s->q, s->k, s->v, b->cu_seqlens, b->B, c->num_heads, c->num_kv_heads,
                             c->head_dim, nt, kern, cancel, cancel_ctx);
    if (ra) return ra == -2 ? -2 : arm_fail(e, "out of memory in attention scratch");
    if (matmul(s->x, s->att, &lw->o, &lw->o_b, T, 1, nt, kern))
        return arm_fail(e, "out of memory in matmul scratch");
    // MLP block, in token chunks so the (tokens, I) buffers stay small
    rmsnorm(s->xn, s->x, lw->mlp_norm.data, T, H, eps, nt);
    for (int64_t t0 = 0; t0 < T; t0 += MLP_CHUNK) {
        const int64_t n = T - t0 < MLP_CHUNK ? T - t0 : MLP_CHUNK;
        if (matmul(s->g, s->xn + t0 * H, &lw->gate, &lw->gate_b, n, 0, nt, kern) ||
            matmul(s->u, s->xn + t0 * H, &lw->up, &lw->up_b, n, 0, nt, kern))
            return arm_fail(e, "out of memory in matmul scratch");
        swiglu(s->g, s->u, n * I, nt, kern);
        if (matmul(s->x + t0 * H, s->g, &lw->down, &lw->down_b, n, 1, nt, kern))
            return arm_fail(e, "out of memory in matmul scratch");
        if (cancel && t0 + n < T && cancel(cancel_ctx)) return -2;
    }
    return 0;
}

int forward_cpu(const Model *m, const Batch *b, const OutputPlan *p, Outputs *out, CancelFn cancel,
                void *cancel_ctx, ArmError *e) {
    const Config *c = &m->cfg;
    const int64_t T = b->cu_seqlens[b->B], H = c->hidden_size;
    const int want_armorm = p->head == ARCH_ARMORM, want_seqcls = p->head == ARCH_SEQCLS;
    RunState s;
    if (runstate_alloc(&s, c, T, e)) return -1;
    for (int bi = 0; bi < b->B; bi++)
        for (int64_t t = b->cu_seqlens[bi]; t < b->cu_seqlens[bi + 1]; t++)
            s.pos[t] = (int32_t)(t - b->cu_seqlens[bi]);
    const int nt = threads_for(m, T);
    embedding(s.x, b->tokens, &m->w.embed, T, nt);
    for (int l = 0; l < c->num_layers; l++) {
        int r = cancel && cancel(cancel_ctx) ? -2 : layer_forward(m, &m->w.layers[l], &s, b, T, nt, cancel,
                                                                   cancel_ctx, e);
        if (r) {
            runstate_free(&s);
            if (r == -2) arm_fail(e, "interrupted");
            return r;
        }
    }
    const float *fn = m->w.final_norm.data;
    if (out->all_hidden) rmsnorm(out->all_hidden, s.x, fn, T, H, c->rms_norm_eps, nt);
    float scratch_small[8];
    const int64_t K = c->num_objectives, D = c->gating_hidden_dim;
    float *hs = malloc(sizeof(float) * (size_t)(2 * H));
    float *scratch = want_armorm ? malloc(sizeof(float) * (size_t)(2 * (D > K ? D : K) + 2 * K)) : scratch_small;
    float *logits = want_seqcls ? malloc(sizeof(float) * (size_t)c->num_labels) : scratch_small;
    if (!hs || !scratch || !logits) {
        free(hs);
        if (scratch != scratch_small) free(scratch);
        if (logits != scratch_small) free(logits);
        runstate_free(&s);
        return arm_fail(e, "out of memory for the head");
    }
    for (int bi = 0; bi < b->B; bi++) {
        const int64_t start = b->cu_seqlens[bi], len = b->cu_seqlens[bi + 1] - start;
        const int64_t pr = start + (b->reward_pos ? b->reward_pos[bi] : len - 1);
        float *h = hs, *pe = hs + H;
        rmsnorm_row(h, s.x + pr * H, fn, H, c->rms_norm_eps);
        if (p->gating) rmsnorm_row(pe, s.x + (start + b->gating_pos[bi]) * H, fn, H, c->rms_norm_eps);
        if (out->hidden_state) memcpy(out->hidden_state + bi * H, h, sizeof(float) * (size_t)H);
        if (out->prompt_embedding) memcpy(out->prompt_embedding + bi * H, pe, sizeof(float) * (size_t)H);
        if (want_armorm) {
            float *rw = scratch + 2 * (D > K ? D : K), *gt = rw + K, sc;
            armorm_head(m, h, pe, rw, gt, &sc, scratch);
            if (out->rewards) memcpy(out->rewards + bi * K, rw, sizeof(float) * (size_t)K);
            if (out->gating_output) memcpy(out->gating_output + bi * K, gt, sizeof(float) * (size_t)K);
            if (out->score) out->score[bi] = sc;
            if (out->logits) out->logits[bi] = sc;  // the reference's ArmoRM returns logits = score
        } else if (want_seqcls) {
            seqcls_head(m, h, logits);
            if (out->logits) memcpy(out->logits + bi * c->num_labels, logits, sizeof(float) * (size_t)c->num_labels);
            if (out->score) out->score[bi] = logits[0];
        }
    }
    free(hs);
    if (scratch != scratch_small) free(scratch);
    if (logits != scratch_small) free(logits);
    runstate_free(&s);
    return 0;
}
