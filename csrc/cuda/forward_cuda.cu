// forward_cuda.cu: the CUDA forward pass, top to bottom.
//
// Per packed batch (the CudaModel's buffers are model_cuda.cu's):
//   one H2D copy: token ids, positions, cu_seqlens, head rows, attention tiles
//   x (T,H) f32 = embed[tokens]
//   per layer:
//     xn = rmsnorm(x) (bf16);  qkv = xn Wqkv^T (bf16);  rope(q, k)
//     att = attention(qkv);    x += att Wo^T  (fp32 epilogue, beta = 1)
//     xn = rmsnorm(x);         per chunk: gu = xn Wgu^T;  h = silu(g) * u;  x += h Wdown^T
//   final norm at the reward / gating rows (and every row when asked), heads
//   one D2H copy of every output, then the host scatters it into Outputs.
// Activations are bf16 where a GEMM reads them, the residual stream is fp32,
// norms / softmax / head accumulate in fp32 (fp64 in the head).
#include "cuda_model.cuh"
#include "k_attention.cuh"
#include "k_convert.cuh"
#include "k_embedding.cuh"
#include "k_head.cuh"
#include "k_rmsnorm.cuh"
#include "k_rope.cuh"
#include "k_swiglu.cuh"

#include <stdio.h>
#include <string.h>

// Device pointers of one batch.
typedef struct {
    const int32_t *tokens, *pos, *cu, *rows;
    const CudaAttnTile *tiles;
    float *res;      // results, laid out by CudaBatchLayout
    float *scratch;  // head scratch
} BatchDev;

static const float *wf(const CudaModel *cm, int64_t off) { return (const float *)(cm->weights + off); }
static const bf16 *wb(const CudaModel *cm, int64_t off) { return (const bf16 *)(cm->weights + off); }

static int layer_forward(CudaModel *cm, int l, const BatchDev *bd, const CudaBatchLayout *bl, ArmError *e) {
    const Config *c = &cm->cfg;
    const CudaWeightLayout *wl = &cm->wl;
    const cudaStream_t st = cm->stream;
    const int64_t T = bl->T, H = c->hidden_size, I = c->intermediate_size;
    const int nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    const int64_t QD = (int64_t)nh * hd, QKV = (int64_t)(nh + 2 * nkv) * hd;
    const int64_t L = wl->layers + (int64_t)l * wl->layer_stride;
    float *x = (float *)(cm->act + cm->al.x);           // (T, H) residual
    bf16 *xn = (bf16 *)(cm->act + cm->al.xn);           // (T, H)
    bf16 *qkv = (bf16 *)(cm->act + cm->al.qkv);         // (T, QKV)
    bf16 *att = (bf16 *)(cm->act + cm->al.att);         // (T, QD)
    bf16 *gu = (bf16 *)(cm->act + cm->al.gu);           // (chunk, 2I)
    bf16 *hh = (bf16 *)(cm->act + cm->al.h);            // (chunk, I)
    // attention block
    launch_rmsnorm<bf16>(xn, x, wf(cm, L + wl->attn_norm), NULL, T, (int)H, c->rms_norm_eps, st);
    CU_CHECK_LAUNCH("rmsnorm");
    if (gemm_bf16(&cm->gemm, st, qkv, 0, 0, xn, wb(cm, L + wl->wqkv), T, QKV, H, e)) return -1;
    if (wl->bqkv >= 0) {
        launch_add_bias<bf16>(qkv, wf(cm, L + wl->bqkv), T, (int)QKV, st);
        CU_CHECK_LAUNCH("add_bias");
    }
    launch_rope(qkv, bd->pos, wf(cm, wl->inv_freq), T, nh, nkv, hd, st);
    CU_CHECK_LAUNCH("rope");
    launch_attention(att, qkv, bd->cu, bd->pos, bd->tiles, bl->ntiles, T, nh, nkv, hd, st);
    CU_CHECK_LAUNCH("attention");
    if (gemm_bf16(&cm->gemm, st, x, 1, 1, att, wb(cm, L + wl->wo), T, H, QD, e)) return -1;
    if (wl->bo >= 0) {
        launch_add_bias<float>(x, wf(cm, L + wl->bo), T, (int)H, st);
        CU_CHECK_LAUNCH("add_bias");
    }
    // MLP block, in token chunks so the (tokens, 2I) buffer stays bounded
    launch_rmsnorm<bf16>(xn, x, wf(cm, L + wl->mlp_norm), NULL, T, (int)H, c->rms_norm_eps, st);
    CU_CHECK_LAUNCH("rmsnorm");
    for (int64_t t0 = 0; t0 < T; t0 += cm->al.mlp_chunk) {
        const int64_t n = T - t0 < cm->al.mlp_chunk ? T - t0 : cm->al.mlp_chunk;
        if (gemm_bf16(&cm->gemm, st, gu, 0, 0, xn + t0 * H, wb(cm, L + wl->wgu), n, 2 * I, H, e)) return -1;
        if (wl->bgu >= 0) {
            launch_add_bias<bf16>(gu, wf(cm, L + wl->bgu), n, (int)(2 * I), st);
            CU_CHECK_LAUNCH("add_bias");
        }
        launch_swiglu(hh, gu, n, (int)I, st);
        CU_CHECK_LAUNCH("swiglu");
        if (gemm_bf16(&cm->gemm, st, x + t0 * H, 1, 1, hh, wb(cm, L + wl->wdown), n, H, I, e)) return -1;
        if (wl->bdown >= 0) {
            launch_add_bias<float>(x + t0 * H, wf(cm, L + wl->bdown), n, (int)H, st);
            CU_CHECK_LAUNCH("add_bias");
        }
    }
    return 0;
}

typedef struct {
    int armorm, seqcls, gating, all_hidden;
} Want;

static int heads_forward(CudaModel *cm, const BatchDev *bd, const CudaBatchLayout *bl, const Want *w, ArmError *e) {
    const Config *c = &cm->cfg;
    const CudaWeightLayout *wl = &cm->wl;
    const cudaStream_t st = cm->stream;
    const int B = (int)bl->B, H = c->hidden_size;
    const float *x = (const float *)(cm->act + cm->al.x), *fn = wf(cm, wl->final_norm);
    float *res = bd->res;
    if (w->all_hidden) {
        launch_rmsnorm<float>(res + bl->all_hidden, x, fn, NULL, bl->T, H, c->rms_norm_eps, st);
        CU_CHECK_LAUNCH("rmsnorm");
    }
    launch_rmsnorm<float>(res + bl->hidden, x, fn, bd->rows, B, H, c->rms_norm_eps, st);
    CU_CHECK_LAUNCH("rmsnorm");
    if (w->gating) {
        launch_rmsnorm<float>(res + bl->prompt, x, fn, bd->rows + B, B, H, c->rms_norm_eps, st);
        CU_CHECK_LAUNCH("rmsnorm");
    }
    if (w->armorm) {
        const int K = c->num_objectives, D = c->gating_hidden_dim, wmax = D > K ? D : K;
        launch_head_linear(res + bl->rewards, res + bl->hidden, wf(cm, wl->regression), NULL, B, K, H, 0, st);
        CU_CHECK_LAUNCH("head_linear");
        const float *in = res + bl->prompt;
        int in_dim = H;
        for (int j = 0; j <= c->gating_n_hidden; j++) {
            const int last = j == c->gating_n_hidden, od = last ? K : D;
            float *o = bd->scratch + (int64_t)(j & 1) * B * wmax;  // ping-pong (B, max(D, K)) buffers
            launch_head_linear(o, in, wf(cm, wl->gate_w[j]), wf(cm, wl->gate_b[j]), B, od, in_dim, !last, st);
            CU_CHECK_LAUNCH("head_linear");
            in = o;
            in_dim = od;
        }
        launch_armorm_finish(res + bl->gating, res + bl->score, in, res + bl->rewards, wf(cm, wl->transform), B, K,
                             c->gating_temperature, cm->logit_scale, st);
        CU_CHECK_LAUNCH("armorm_finish");
    } else if (w->seqcls) {
        launch_head_linear(res + bl->logits, res + bl->hidden, wf(cm, wl->score), NULL, B, c->num_labels, H, 0, st);
        CU_CHECK_LAUNCH("head_linear");
        launch_first_column(res + bl->score, res + bl->logits, B, c->num_labels, st);
        CU_CHECK_LAUNCH("first_column");
    }
    return 0;
}

static void copy_out(float *dst, const float *src, int64_t n) {
    if (dst) memcpy(dst, src, sizeof(float) * (size_t)n);
}

// Host side of the results: the pinned copy, scattered into the caller's arrays.
static void scatter_outputs(const CudaModel *cm, const CudaBatchLayout *bl, const Want *w, Outputs *out) {
    const Config *c = &cm->cfg;
    const int64_t B = bl->B, H = c->hidden_size, K = c->num_objectives;
    const int64_t up = (bl->n_ints * 4 + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
    const float *r = (const float *)(cm->batch_host + up);
    copy_out(out->hidden_state, r + bl->hidden, B * H);
    if (w->gating) copy_out(out->prompt_embedding, r + bl->prompt, B * H);
    if (w->armorm) {
        copy_out(out->rewards, r + bl->rewards, B * K);
        copy_out(out->gating_output, r + bl->gating, B * K);
        copy_out(out->score, r + bl->score, B);
        copy_out(out->logits, r + bl->score, B);  // the reference's ArmoRM returns logits = score
    } else if (w->seqcls) {
        copy_out(out->logits, r + bl->logits, B * c->num_labels);
        copy_out(out->score, r + bl->score, B);
    }
    if (w->all_hidden) copy_out(out->all_hidden, r + bl->all_hidden, bl->T * H);
}

// Everything of one batch that goes on the stream, in order, then the wait for it.
static int batch_run(CudaModel *cm, const CudaBatchLayout *bl, const Want *w, ArmError *e) {
    const Config *c = &cm->cfg;
    const cudaStream_t st = cm->stream;
    const int64_t up = (bl->n_ints * 4 + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
    const int64_t res = (bl->n_floats * 4 + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
    const int32_t *ints = (const int32_t *)cm->batch_dev;
    const BatchDev bd = {ints + bl->tokens, ints + bl->pos, ints + bl->cu, ints + bl->rows,
                         (const CudaAttnTile *)(ints + bl->tiles), (float *)(cm->batch_dev + up),
                         (float *)(cm->batch_dev + up + res)};
    // the one host-to-device copy of the batch
    CU_CHECK(cudaMemcpyAsync(cm->batch_dev, cm->batch_host, (size_t)(bl->n_ints * 4), cudaMemcpyHostToDevice, st));
    launch_embedding((float *)(cm->act + cm->al.x), bd.tokens, wb(cm, cm->wl.embed), bl->T, c->hidden_size, st);
    CU_CHECK_LAUNCH("embedding");
    for (int l = 0; l < c->num_layers; l++)
        if (layer_forward(cm, l, &bd, bl, e)) return -1;
    if (heads_forward(cm, &bd, bl, w, e)) return -1;
    // the one device-to-host copy of every output
    CU_CHECK(cudaMemcpyAsync(cm->batch_host + up, cm->batch_dev + up, (size_t)(bl->n_floats * 4),
                             cudaMemcpyDeviceToHost, st));
    CU_CHECK(cudaStreamSynchronize(st));  // kernel faults surface here, with the kernel's error
    return 0;
}

static int forward_locked(CudaModel *cm, const Batch *b, Outputs *out, const Want *w, ArmError *e) {
    const Config *c = &cm->cfg;
    const int64_t T = b->cu_seqlens[b->B];
    CU_CHECK(cudaSetDevice(cm->device));
    if (T > INT32_MAX) return arm_fail(e, "cuda: a batch holds at most %d tokens, got %lld", INT32_MAX, (long long)T);
    const int64_t ntiles = cuda_attn_tile_count(b->cu_seqlens, b->B, CUDA_ATTN_BLOCK_Q);
    CudaBatchLayout bl;
    if (ntiles <= 0 || cuda_batch_layout(c, T, b->B, ntiles, w->all_hidden, &bl))
        return arm_fail(e, "cuda: cannot lay out a batch of %lld tokens in %d sequences", (long long)T, b->B);
    if (cuda_ensure_activations(cm, T, e) || cuda_ensure_batch(cm, &bl, e)) return -1;
    if (cuda_batch_pack(b, &bl, CUDA_ATTN_BLOCK_Q, (int32_t *)cm->batch_host))
        return arm_fail(e, "internal error: cuda batch packing failed");
    if (batch_run(cm, &bl, w, e)) {
        // What was queued before the failure may still be reading the pinned upload or writing
        // the pinned results: let it finish before the next call refills (or frees) them.
        cudaStreamSynchronize(cm->stream);
        cudaGetLastError();
        return -1;
    }
    scatter_outputs(cm, &bl, w, out);
    return 0;
}

static int same_shape(const Config *a, const Config *b) {
    return a->arch == b->arch && a->hidden_size == b->hidden_size && a->intermediate_size == b->intermediate_size &&
           a->num_layers == b->num_layers && a->num_heads == b->num_heads && a->num_kv_heads == b->num_kv_heads &&
           a->head_dim == b->head_dim && a->vocab_size == b->vocab_size && a->num_objectives == b->num_objectives &&
           a->gating_hidden_dim == b->gating_hidden_dim && a->gating_n_hidden == b->gating_n_hidden &&
           a->num_labels == b->num_labels && a->attention_bias == b->attention_bias && a->mlp_bias == b->mlp_bias;
}

extern "C" int cuda_forward(CudaModel *cm, const Model *m, const Batch *b, const OutputPlan *p, Outputs *out,
                            ArmError *e) {
    if (!cm) return arm_fail(e, "cuda: the model is not on a GPU");
    const Config *c = &cm->cfg;
    if (!same_shape(c, &m->cfg)) return arm_fail(e, "internal error: cuda_forward called with another model");
    // what to compute is the model description's plan (output_plan); the batch passed batch_check
    const Want w = {p->head == ARCH_ARMORM, p->head == ARCH_SEQCLS, p->gating, out->all_hidden != NULL};
    pthread_mutex_lock(&cm->lock);
    const int rc = forward_locked(cm, b, out, &w, e);
    pthread_mutex_unlock(&cm->lock);
    return rc ? CUDA_ERR_DEVICE : 0;
}
