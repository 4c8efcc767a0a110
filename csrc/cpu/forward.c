// forward.c: the whole CPU forward pass (forward_cpu), top to bottom, for every family.
//
// Input: B token sequences packed end to end (no padding); a sequence may
// continue another one of the batch (a shared prefix, prefix.h). x =
// embed(tokens) (times embed_scale). For each layer:
//   xn = rmsnorm(x); q,k,v = xn W^T (+ biases); [qk_norm: rmsnorm of each q and k head]
//   rope(q,k); a = attention(q,k,v) with the layer's AttnParams (scale, softcap, window)
//   x += a Wo^T                 [post_norms: x += rmsnorm(a Wo^T)]
//   xn = rmsnorm(x); h = act(gate(xn)) * up(xn) (SwiGLU or GeGLU)
//   x += down(h)                [post_norms: x += rmsnorm(down(h))]
// then the final norm at the rows the heads read, and the heads. The Config
// switches in brackets are what distinguishes the families (model.h). The
// ArmoRM gating network runs once per distinct gating row: the continuations
// of one prompt read the same row of their shared prefix.
// Activations are fp32 throughout; weights are read in their stored dtype.
#include "../model.h"
#include "../prefix.h"
#include "attention.h"
#include "embedding.h"
#include "glu.h"
#include "head.h"
#include "matmul.h"
#include "rmsnorm.h"
#include "rope.h"

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
    int32_t *pos; // (T) position within its (full) sequence
    int64_t *off; // (B) position of each sequence's first own token (prefix.h)
} RunState;

static void runstate_free(RunState *s) {
    free(s->x); free(s->xn); free(s->q); free(s->k); free(s->v); free(s->att);
    free(s->g); free(s->u); free(s->pos); free(s->off);
    memset(s, 0, sizeof *s);
}

static int runstate_alloc(RunState *s, const Config *c, int64_t T, int B, ArmError *e) {
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
    s->off = malloc((size_t)B * sizeof(int64_t));
    if (!s->x || !s->xn || !s->q || !s->k || !s->v || !s->att || !s->g || !s->u || !s->pos || !s->off) {
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
// x (n,H) += inp (n,K) @ W^T + bias, or with post-norm weights `post` (data
// non-NULL): x += rmsnorm(inp @ W^T + bias), the product going through `tmp`
// (n,H), whose rows must be free. Returns 0 or -1 (scratch allocation).
static int residual_matmul(const Model *m, float *x, float *tmp, const float *inp, const WTensor *w,
                           const WTensor *bias, const WTensor *post, int64_t n, int nt) {
    if (!post->data) return matmul(x, inp, w, bias, n, 1, nt, m->kernel);
    if (matmul(tmp, inp, w, bias, n, 0, nt, m->kernel)) return -1;
    rmsnorm_add(x, tmp, post->data, n, m->cfg.hidden_size, m->cfg.rms_norm_eps, nt);
    return 0;
}

// Returns 0, -1 on error, -2 when `cancel` asked to stop (polled between attention slices and MLP chunks).
static int layer_forward(const Model *m, int layer, RunState *s, const SeqIndex *ix, int B, int64_t T, int nt,
                         CancelFn cancel, void *cancel_ctx, ArmError *e) {
    const Config *c = &m->cfg;
    const LayerWeights *lw = &m->w.layers[layer];
    const int kern = m->kernel;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const float eps = c->rms_norm_eps;
    // attention block
    rmsnorm(s->xn, s->x, lw->attn_norm.data, T, H, eps, nt);
    if (matmul(s->q, s->xn, &lw->q, &lw->q_b, T, 0, nt, kern) ||
        matmul(s->k, s->xn, &lw->k, &lw->k_b, T, 0, nt, kern) ||
        matmul(s->v, s->xn, &lw->v, &lw->v_b, T, 0, nt, kern))
        return arm_fail(e, "out of memory in matmul scratch");
    if (c->qk_norm) {  // each head's vector is a row of hd
        rmsnorm(s->q, s->q, lw->q_norm.data, T * c->num_heads, c->head_dim, eps, nt);
        rmsnorm(s->k, s->k, lw->k_norm.data, T * c->num_kv_heads, c->head_dim, eps, nt);
    }
    rope(s->q, s->pos, m->inv_freq, T, c->num_heads, c->head_dim, nt);
    rope(s->k, s->pos, m->inv_freq, T, c->num_kv_heads, c->head_dim, nt);
    const AttnParams ap = config_attn_params(c, layer);
    const int ra = attention(s->att, s->q, s->k, s->v, ix, B, c->num_heads, c->num_kv_heads, c->head_dim, &ap, nt,
                             kern, cancel, cancel_ctx);
    if (ra) return ra == -2 ? -2 : arm_fail(e, "out of memory in attention scratch");
    // (xn is free again: its rows were read by the q, k, v projections)
    if (residual_matmul(m, s->x, s->xn, s->att, &lw->o, &lw->o_b, &lw->attn_post_norm, T, nt))
        return arm_fail(e, "out of memory in matmul scratch");
    // MLP block, in token chunks so the (tokens, I) buffers stay small
    rmsnorm(s->xn, s->x, lw->mlp_norm.data, T, H, eps, nt);
    for (int64_t t0 = 0; t0 < T; t0 += MLP_CHUNK) {
        const int64_t n = T - t0 < MLP_CHUNK ? T - t0 : MLP_CHUNK;
        if (matmul(s->g, s->xn + t0 * H, &lw->gate, &lw->gate_b, n, 0, nt, kern) ||
            matmul(s->u, s->xn + t0 * H, &lw->up, &lw->up_b, n, 0, nt, kern))
            return arm_fail(e, "out of memory in matmul scratch");
        glu(s->g, s->u, n * I, c->hidden_act, nt, kern);
        // the chunk's xn rows were read by gate and up: down's output may go there
        if (residual_matmul(m, s->x + t0 * H, s->xn + t0 * H, s->g, &lw->down, &lw->down_b, &lw->mlp_post_norm, n,
                            nt))
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
    if (runstate_alloc(&s, c, T, b->B, e)) return -1;
    batch_offsets(b, s.off);
    const SeqIndex ix = {b->cu_seqlens, s.off, b->parent};
    for (int bi = 0; bi < b->B; bi++)
        for (int64_t t = b->cu_seqlens[bi]; t < b->cu_seqlens[bi + 1]; t++)
            s.pos[t] = (int32_t)(s.off[bi] + t - b->cu_seqlens[bi]);
    const int nt = threads_for(m, T);
    embedding(s.x, b->tokens, &m->w.embed, m->embed_scale, T, nt);
    for (int l = 0; l < c->num_layers; l++) {
        int r = cancel && cancel(cancel_ctx) ? -2 : layer_forward(m, l, &s, &ix, b->B, T, nt, cancel, cancel_ctx, e);
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
    int64_t gated_row = -1;  // the gating row whose gating output `gt` holds
    float *logits = want_seqcls ? malloc(sizeof(float) * (size_t)c->num_labels) : scratch_small;
    if (!hs || !scratch || !logits) {
        free(hs);
        if (scratch != scratch_small) free(scratch);
        if (logits != scratch_small) free(logits);
        runstate_free(&s);
        return arm_fail(e, "out of memory for the head");
    }
    for (int bi = 0; bi < b->B; bi++) {
        const int64_t full = s.off[bi] + b->cu_seqlens[bi + 1] - b->cu_seqlens[bi];
        const int64_t pr = seq_row(&ix, bi, b->reward_pos ? b->reward_pos[bi] : full - 1);
        const int64_t pg = p->gating ? seq_row(&ix, bi, b->gating_pos[bi]) : -1;
        float *h = hs, *pe = hs + H;
        rmsnorm_row(h, s.x + pr * H, fn, H, c->rms_norm_eps);
        if (pg >= 0) rmsnorm_row(pe, s.x + pg * H, fn, H, c->rms_norm_eps);
        if (out->hidden_state) memcpy(out->hidden_state + bi * H, h, sizeof(float) * (size_t)H);
        if (out->prompt_embedding) memcpy(out->prompt_embedding + bi * H, pe, sizeof(float) * (size_t)H);
        if (want_armorm) {
            float *rw = scratch + 2 * (D > K ? D : K), *gt = rw + K, sc;
            if (pg != gated_row) armorm_gating(m, pe, gt, scratch);  // else gt already holds this row's output
            gated_row = pg;
            armorm_rewards_score(m, h, gt, rw, &sc);
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
