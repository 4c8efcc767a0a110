// backend_cuda.cu: the CUDA forward pass, top to bottom.
//
// Create: check free memory against the plan, allocate once (weights, then
// activations), upload every backbone matrix as bf16 through pinned staging
// (f32/f16 converted on the GPU), norm vectors, biases and heads as f32.
//
// Forward, per packed batch:
//   one H2D copy: token ids, positions, cu_seqlens, head rows, attention tiles
//   x (T,H) f32 = embed[tokens] * embed_scale
//   per layer:
//     xn = rmsnorm(x) (bf16);  qkv = xn Wqkv^T (bf16);  [qk_norm: per-head norm of q, k];  rope(q, k)
//     att = attention(qkv) with the layer's AttnParams (scale, softcap, window)
//     x += att Wo^T  (fp32 epilogue, beta = 1)   [post_norms: y = att Wo^T; x += rmsnorm(y)]
//     xn = rmsnorm(x);  per chunk: gu = xn Wgu^T;  h = act(g) * u (SwiGLU or GeGLU);  x += h Wdown^T
//                                                [post_norms: y = h Wdown^T; x += rmsnorm(y)]
// The bracketed steps are the family switches of Config (model.h), as on the CPU.
//   final norm at the reward / gating rows (and every row when asked), heads
//   one D2H copy of every output, then the host scatters it into Outputs.
// Activations are bf16 where a GEMM reads them, the residual stream is fp32,
// norms / softmax / head accumulate in fp32 (fp64 in the head).
#include "common.cuh"
#include "gemm.cuh"
#include "k_attention.cuh"
#include "k_convert.cuh"
#include "k_embedding.cuh"
#include "k_geglu.cuh"
#include "k_head.cuh"
#include "k_rmsnorm.cuh"
#include "k_rope.cuh"
#include "k_swiglu.cuh"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct CudaModel {
    int device;
    pthread_mutex_t lock;     // one forward at a time: the activation buffers are shared
    int lock_ok;
    cudaStream_t stream;
    Gemm gemm;
    int gemm_ok;
    Config cfg;               // the config uploaded, to refuse a different Model later
    float logit_scale;
    float embed_scale;        // config_embed_scale for the bf16 embedding held here
    CudaWeightLayout wl;
    char *weights;            // device, wl.total bytes
    void *lt_ws;              // device, CUDA_LT_WORKSPACE bytes
    CudaActLayout al;
    char *act;                // device, al.total bytes
    int64_t batch_dev_cap, batch_host_cap;
    char *batch_dev;          // device: upload | results | head scratch
    char *batch_host;         // pinned: upload | results
};

// ---------------------------------------------------------------------------
// Upload: host -> pinned staging -> device (-> bf16 conversion kernel).

typedef struct {
    cudaStream_t st;
    char *host[2];            // pinned
    char *dev[2];             // device staging for tensors that need converting
    cudaEvent_t ev[2];        // last use of buffer i finished
    int next;
} Uploader;

static int uploader_init(Uploader *u, cudaStream_t st, ArmError *e) {
    memset(u, 0, sizeof *u);
    u->st = st;
    for (int i = 0; i < 2; i++) {
        CU_CHECK(cudaHostAlloc((void **)&u->host[i], CUDA_UPLOAD_CHUNK, cudaHostAllocDefault));
        CU_CHECK(cudaMalloc((void **)&u->dev[i], CUDA_UPLOAD_CHUNK));
        CU_CHECK(cudaEventCreateWithFlags(&u->ev[i], cudaEventDisableTiming));
    }
    return 0;
}

static void uploader_free(Uploader *u) {
    for (int i = 0; i < 2; i++) {
        if (u->ev[i]) cudaEventSynchronize(u->ev[i]);
        if (u->host[i]) cudaFreeHost(u->host[i]);
        if (u->dev[i]) cudaFree(u->dev[i]);
        if (u->ev[i]) cudaEventDestroy(u->ev[i]);
    }
    memset(u, 0, sizeof *u);
}

// Copies n elements of src (stored as sd) to dst as bf16 (dst_bf16) or f32.
// Two staging buffers alternate so the host copy of chunk i+1 overlaps the
// transfer and conversion of chunk i.
static int upload(Uploader *u, void *dst, int dst_bf16, const void *src, WDType sd, int64_t n, ArmError *e) {
    const int64_t es = sd == WT_F32 ? 4 : 2, ds = dst_bf16 ? 2 : 4;
    const int convert = dst_bf16 ? sd != WT_BF16 : sd != WT_F32;
    if (convert && !dst_bf16) return cu_fail(e, "internal error: f32 device tensors must be stored as F32");
    const int64_t per = CUDA_UPLOAD_CHUNK / es;
    for (int64_t off = 0; off < n; off += per) {
        const int64_t cnt = n - off < per ? n - off : per;
        const int i = u->next;
        u->next ^= 1;
        CU_CHECK(cudaEventSynchronize(u->ev[i]));  // the transfer that last read buffer i is done
        memcpy(u->host[i], (const char *)src + off * es, (size_t)(cnt * es));
        char *target = convert ? u->dev[i] : (char *)dst + off * ds;
        CU_CHECK(cudaMemcpyAsync(target, u->host[i], (size_t)(cnt * es), cudaMemcpyHostToDevice, u->st));
        if (convert) {
            launch_to_bf16((bf16 *)dst + off, u->dev[i], (int)sd, cnt, u->st);
            CU_CHECK_LAUNCH("to_bf16");
        }
        CU_CHECK(cudaEventRecord(u->ev[i], u->st));
    }
    return 0;
}

// A backbone tensor, checked against the shape the layout was planned for.
static int upload_w(Uploader *u, char *base, int64_t off, const WTensor *w, int64_t rows, int64_t cols, int bf,
                    const char *what, int layer, ArmError *e) {
    if (!w->data || w->rows != rows || w->cols != cols) {
        char where[32] = "";
        if (layer >= 0) snprintf(where, sizeof where, " of layer %d", layer);
        return cu_fail(e, "cuda upload: %s%s is (%lld, %lld)%s, expected (%lld, %lld)", what, where,
                       (long long)w->rows, (long long)w->cols, w->data ? "" : " and missing", (long long)rows,
                       (long long)cols);
    }
    return upload(u, base + off, bf, w->data, w->dtype, rows * cols, e);
}

static int upload_layer(Uploader *u, const CudaModel *cm, const LayerWeights *lw, int l, ArmError *e) {
    const Config *c = &cm->cfg;
    const CudaWeightLayout *wl = &cm->wl;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const int64_t QD = (int64_t)c->num_heads * c->head_dim, KD = (int64_t)c->num_kv_heads * c->head_dim;
    char *L = cm->weights + wl->layers + (int64_t)l * wl->layer_stride;
    // stacked matrices: one GEMM computes q|k|v, one computes gate|up
    if (upload_w(u, L, wl->wqkv, &lw->q, QD, H, 1, "q_proj", l, e) ||
        upload_w(u, L, wl->wqkv + QD * H * 2, &lw->k, KD, H, 1, "k_proj", l, e) ||
        upload_w(u, L, wl->wqkv + (QD + KD) * H * 2, &lw->v, KD, H, 1, "v_proj", l, e) ||
        upload_w(u, L, wl->wo, &lw->o, H, QD, 1, "o_proj", l, e) ||
        upload_w(u, L, wl->wgu, &lw->gate, I, H, 1, "gate_proj", l, e) ||
        upload_w(u, L, wl->wgu + I * H * 2, &lw->up, I, H, 1, "up_proj", l, e) ||
        upload_w(u, L, wl->wdown, &lw->down, H, I, 1, "down_proj", l, e) ||
        upload_w(u, L, wl->attn_norm, &lw->attn_norm, 1, H, 0, "input_layernorm", l, e) ||
        upload_w(u, L, wl->mlp_norm, &lw->mlp_norm, 1, H, 0, "the MLP's input norm", l, e))
        return -1;
    if (wl->bqkv >= 0 &&
        (upload_w(u, L, wl->bqkv, &lw->q_b, 1, QD, 0, "q_proj.bias", l, e) ||
         upload_w(u, L, wl->bqkv + QD * 4, &lw->k_b, 1, KD, 0, "k_proj.bias", l, e) ||
         upload_w(u, L, wl->bqkv + (QD + KD) * 4, &lw->v_b, 1, KD, 0, "v_proj.bias", l, e)))
        return -1;
    if (wl->bo >= 0 && upload_w(u, L, wl->bo, &lw->o_b, 1, H, 0, "o_proj.bias", l, e)) return -1;
    if (wl->q_norm >= 0 &&
        (upload_w(u, L, wl->q_norm, &lw->q_norm, 1, c->head_dim, 0, "q_norm", l, e) ||
         upload_w(u, L, wl->k_norm, &lw->k_norm, 1, c->head_dim, 0, "k_norm", l, e)))
        return -1;
    if (wl->attn_post_norm >= 0 &&
        (upload_w(u, L, wl->attn_post_norm, &lw->attn_post_norm, 1, H, 0, "post-attention norm", l, e) ||
         upload_w(u, L, wl->mlp_post_norm, &lw->mlp_post_norm, 1, H, 0, "post-feedforward norm", l, e)))
        return -1;
    if (c->mlp_bias &&
        (upload_w(u, L, wl->bgu, &lw->gate_b, 1, I, 0, "gate_proj.bias", l, e) ||
         upload_w(u, L, wl->bgu + I * 4, &lw->up_b, 1, I, 0, "up_proj.bias", l, e) ||
         upload_w(u, L, wl->bdown, &lw->down_b, 1, H, 0, "down_proj.bias", l, e)))
        return -1;
    return 0;
}

static int upload_f32(Uploader *u, char *dst, const float *src, int64_t n, const char *what, ArmError *e) {
    if (!src) return cu_fail(e, "cuda upload: head tensor %s is missing", what);
    return upload(u, dst, 0, src, WT_F32, n, e);
}

static int upload_heads(Uploader *u, const CudaModel *cm, const Model *m, ArmError *e) {
    const Config *c = &cm->cfg;
    const CudaWeightLayout *wl = &cm->wl;
    char *W = cm->weights;
    const int64_t H = c->hidden_size;
    if (c->arch == ARCH_ARMORM) {
        const int64_t K = c->num_objectives, D = c->gating_hidden_dim;
        if (upload_f32(u, W + wl->regression, m->w.regression, K * H, "regression_layer.weight", e) ||
            upload_f32(u, W + wl->transform, m->w.transform, K * K, "reward_transform_matrix", e))
            return -1;
        for (int j = 0; j <= c->gating_n_hidden; j++) {
            const int64_t in = j == 0 ? H : D, od = j == c->gating_n_hidden ? K : D;
            if (upload_f32(u, W + wl->gate_w[j], m->w.gate_w[j], od * in, "gating weight", e) ||
                upload_f32(u, W + wl->gate_b[j], m->w.gate_b[j], od, "gating bias", e))
                return -1;
        }
    } else if (c->arch == ARCH_SEQCLS) {
        if (upload_f32(u, W + wl->score, m->w.score, (int64_t)c->num_labels * H, "score.weight", e)) return -1;
    }
    return 0;
}

static int upload_all(CudaModel *cm, const Model *m, ArmError *e) {
    const Config *c = &cm->cfg;
    Uploader u;
    int rc = uploader_init(&u, cm->stream, e);
    if (rc == 0)
        rc = upload_w(&u, cm->weights, cm->wl.embed, &m->w.embed, c->vocab_size, c->hidden_size, 1, "embed_tokens", -1, e);
    if (rc == 0)
        rc = upload_w(&u, cm->weights, cm->wl.final_norm, &m->w.final_norm, 1, c->hidden_size, 0, "norm", -1, e);
    if (rc == 0) rc = upload_f32(&u, cm->weights + cm->wl.inv_freq, m->inv_freq, c->head_dim / 2, "inv_freq", e);
    for (int l = 0; rc == 0 && l < c->num_layers; l++) rc = upload_layer(&u, cm, &m->w.layers[l], l, e);
    if (rc == 0) rc = upload_heads(&u, cm, m, e);
    if (rc == 0) {
        cudaError_t err = cudaStreamSynchronize(cm->stream);
        if (err != cudaSuccess)
            rc = cu_fail(e, "CUDA error: cudaStreamSynchronize after the weight upload failed: %s (%s)",
                         cudaGetErrorString(err), cudaGetErrorName(err));
    }
    uploader_free(&u);
    return rc;
}

// ---------------------------------------------------------------------------
// Buffers that grow with the batch.

static int ensure_activations(CudaModel *cm, int64_t T, ArmError *e) {
    if (cm->act && T <= cm->al.max_tokens) return 0;
    const int64_t want = (T + 1023) / 1024 * 1024;  // round up so small growth steps do not reallocate each call
    CudaActLayout al;
    if (cuda_act_layout(&cm->cfg, want, &al)) return cu_fail(e, "cuda: a batch of %lld tokens is too large", (long long)T);
    if (cm->act) CU_CHECK(cudaFree(cm->act));
    cm->act = NULL;
    cm->al.max_tokens = 0;
    cudaError_t err = cudaMalloc((void **)&cm->act, (size_t)al.total);
    if (err != cudaSuccess) {
        cudaGetLastError();
        cm->act = NULL;
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return cu_fail(e, "not enough GPU memory on cuda:%d for the activations of a %lld-token batch: %lld bytes "
                          "needed, %lld free (%s); use smaller batches (max_batch_tokens)",
                       cm->device, (long long)T, (long long)al.total, (long long)fr, cudaGetErrorString(err));
    }
    cm->al = al;
    return 0;
}

static int ensure_batch(CudaModel *cm, const CudaBatchLayout *bl, ArmError *e) {
    if (bl->device_bytes > cm->batch_dev_cap) {
        if (cm->batch_dev) CU_CHECK(cudaFree(cm->batch_dev));
        cm->batch_dev = NULL;
        cm->batch_dev_cap = 0;
        const int64_t want = bl->device_bytes + bl->device_bytes / 2;
        CU_CHECK(cudaMalloc((void **)&cm->batch_dev, (size_t)want));
        cm->batch_dev_cap = want;
    }
    if (bl->host_bytes > cm->batch_host_cap) {
        if (cm->batch_host) CU_CHECK(cudaFreeHost(cm->batch_host));
        cm->batch_host = NULL;
        cm->batch_host_cap = 0;
        const int64_t want = bl->host_bytes + bl->host_bytes / 2;
        CU_CHECK(cudaHostAlloc((void **)&cm->batch_host, (size_t)want, cudaHostAllocDefault));
        cm->batch_host_cap = want;
    }
    return 0;
}

// ---------------------------------------------------------------------------
// Create / free.

extern "C" void cuda_model_free(CudaModel *cm) {
    if (!cm) return;
    cudaSetDevice(cm->device);
    if (cm->stream) cudaStreamSynchronize(cm->stream);
    if (cm->gemm_ok) gemm_destroy(&cm->gemm);
    if (cm->weights) cudaFree(cm->weights);
    if (cm->lt_ws) cudaFree(cm->lt_ws);
    if (cm->act) cudaFree(cm->act);
    if (cm->batch_dev) cudaFree(cm->batch_dev);
    if (cm->batch_host) cudaFreeHost(cm->batch_host);
    if (cm->stream) cudaStreamDestroy(cm->stream);
    cudaGetLastError();  // a failed free above must not surface in the caller's next call
    if (cm->lock_ok) pthread_mutex_destroy(&cm->lock);
    free(cm);
}

extern "C" int64_t cuda_model_device_bytes(const CudaModel *cm) {
    if (!cm) return 0;
    return cm->wl.total + CUDA_LT_WORKSPACE + (cm->act ? cm->al.total : 0) + cm->batch_dev_cap;
}

// Everything that can fail before the first allocation: device, architecture, memory.
static int create_checks(const Model *m, int device, CudaMemPlan *plan, ArmError *e) {
    char why[512];
    if (cuda_device_describe(device, why, sizeof why)) return cu_fail(e, "device_map='cuda:%d': %s", device, why);
    if (cuda_plan_memory(&m->cfg, CUDA_DEFAULT_MAX_TOKENS, plan))
        return cu_fail(e, "cuda: the model's sizes exceed what the CUDA kernels index (int32 rows)");
    CU_CHECK(cudaSetDevice(device));
    size_t fr = 0, tot = 0;
    CU_CHECK(cudaMemGetInfo(&fr, &tot));
    char msg[ARM_ERRLEN];
    if (cuda_plan_check_fits(plan, (int64_t)fr, (int64_t)tot, device, msg, sizeof msg))
        return cu_fail(e, "%s", msg);
    return 0;
}

static int create_resources(CudaModel *cm, ArmError *e) {
    if (pthread_mutex_init(&cm->lock, NULL)) return cu_fail(e, "cuda: pthread_mutex_init failed");
    cm->lock_ok = 1;
    CU_CHECK(cudaStreamCreateWithFlags(&cm->stream, cudaStreamNonBlocking));
    CU_CHECK(cudaMalloc((void **)&cm->weights, (size_t)cm->wl.total));
    CU_CHECK(cudaMalloc(&cm->lt_ws, (size_t)CUDA_LT_WORKSPACE));
    if (gemm_init(&cm->gemm, cm->lt_ws, (size_t)CUDA_LT_WORKSPACE, e)) return -1;
    cm->gemm_ok = 1;
    return ensure_activations(cm, CUDA_DEFAULT_MAX_TOKENS, e);
}

extern "C" int cuda_model_create(CudaModel **out, const Model *m, int device, ArmError *e) {
    *out = NULL;
    CudaMemPlan plan;
    if (create_checks(m, device, &plan, e)) return -1;
    CudaModel *cm = (CudaModel *)calloc(1, sizeof *cm);
    if (!cm) return cu_fail(e, "out of host memory");
    cm->device = device;
    cm->cfg = m->cfg;
    cm->logit_scale = m->w.logit_scale;
    cm->embed_scale = config_embed_scale(&m->cfg, WT_BF16);
    if (cuda_weight_layout(&cm->cfg, &cm->wl) || create_resources(cm, e) || upload_all(cm, m, e)) {
        cuda_model_free(cm);
        return -1;
    }
    *out = cm;
    return 0;
}

extern "C" int cuda_model_reserve(CudaModel *cm, int64_t max_tokens, ArmError *e) {
    if (!cm) return cu_fail(e, "cuda: no model");
    pthread_mutex_lock(&cm->lock);
    int rc = cudaSetDevice(cm->device) == cudaSuccess ? ensure_activations(cm, max_tokens, e)
                                                      : cu_fail(e, "CUDA error: cudaSetDevice(%d) failed", cm->device);
    pthread_mutex_unlock(&cm->lock);
    return rc;
}

// ---------------------------------------------------------------------------
// Forward.

// Device pointers of one batch.
typedef struct {
    const int32_t *tokens, *pos, *cu, *rows;
    const CudaAttnTile *tiles;
    float *res;      // results, laid out by CudaBatchLayout
    float *scratch;  // head scratch
} BatchDev;

static const float *wf(const CudaModel *cm, int64_t off) { return (const float *)(cm->weights + off); }
static const bf16 *wb(const CudaModel *cm, int64_t off) { return (const bf16 *)(cm->weights + off); }

// x (n, H) += inp (n, K) Wt^T + bias: straight into the residual stream (beta = 1), or, with a post-norm
// (post >= 0), through y: x += rmsnorm(inp Wt^T + bias).
static int residual_gemm(CudaModel *cm, float *x, const bf16 *inp, int64_t wt, int64_t bias, int64_t post,
                         int64_t n, int64_t K, ArmError *e) {
    const int H = cm->cfg.hidden_size;
    const cudaStream_t st = cm->stream;
    float *y = post >= 0 ? (float *)(cm->act + cm->al.y) : x;
    if (gemm_bf16(&cm->gemm, st, y, 1, post < 0, inp, wb(cm, wt), n, H, K, e)) return -1;
    if (bias >= 0) {
        launch_add_bias<float>(y, wf(cm, bias), n, H, st);
        CU_CHECK_LAUNCH("add_bias");
    }
    if (post >= 0) {
        launch_rmsnorm_add(x, y, wf(cm, post), n, H, cm->cfg.rms_norm_eps, st);
        CU_CHECK_LAUNCH("rmsnorm_add");
    }
    return 0;
}

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
    if (wl->q_norm >= 0) {
        launch_head_rmsnorm(qkv, wf(cm, L + wl->q_norm), wf(cm, L + wl->k_norm), T, nh, nkv, hd, c->rms_norm_eps, st);
        CU_CHECK_LAUNCH("head_rmsnorm");
    }
    launch_rope(qkv, bd->pos, wf(cm, wl->inv_freq), T, nh, nkv, hd, st);
    CU_CHECK_LAUNCH("rope");
    const AttnParams ap = config_attn_params(c, l);
    launch_attention(att, qkv, bd->cu, bd->pos, bd->tiles, bl->ntiles, T, nh, nkv, hd, &ap, st);
    CU_CHECK_LAUNCH("attention");
    if (residual_gemm(cm, x, att, L + wl->wo, wl->bo >= 0 ? L + wl->bo : -1,
                      wl->attn_post_norm >= 0 ? L + wl->attn_post_norm : -1, T, QD, e))
        return -1;
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
        if (c->hidden_act == ACT_GELU_TANH) {
            launch_geglu(hh, gu, n, (int)I, st);
            CU_CHECK_LAUNCH("geglu");
        } else {
            launch_swiglu(hh, gu, n, (int)I, st);
            CU_CHECK_LAUNCH("swiglu");
        }
        if (residual_gemm(cm, x + t0 * H, hh, L + wl->wdown, wl->bdown >= 0 ? L + wl->bdown : -1,
                          wl->mlp_post_norm >= 0 ? L + wl->mlp_post_norm : -1, n, I, e))
            return -1;
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
    } else if (w->seqcls) {
        copy_out(out->logits, r + bl->logits, B * c->num_labels);
        copy_out(out->score, r + bl->score, B);
    }
    if (w->all_hidden) copy_out(out->all_hidden, r + bl->all_hidden, bl->T * H);
}

static int forward_locked(CudaModel *cm, const Batch *b, Outputs *out, const Want *w, ArmError *e) {
    const Config *c = &cm->cfg;
    const cudaStream_t st = cm->stream;
    const int64_t T = b->cu_seqlens[b->B];
    CU_CHECK(cudaSetDevice(cm->device));
    if (T > INT32_MAX) return cu_fail(e, "cuda: a batch holds at most %d tokens, got %lld", INT32_MAX, (long long)T);
    const int64_t ntiles = cuda_attn_tile_count(b->cu_seqlens, b->B, CUDA_ATTN_BLOCK_Q);
    CudaBatchLayout bl;
    if (ntiles <= 0 || cuda_batch_layout(c, T, b->B, ntiles, w->all_hidden, &bl))
        return cu_fail(e, "cuda: cannot lay out a batch of %lld tokens in %d sequences", (long long)T, b->B);
    if (ensure_activations(cm, T, e) || ensure_batch(cm, &bl, e)) return -1;
    if (cuda_batch_pack(b, &bl, CUDA_ATTN_BLOCK_Q, (int32_t *)cm->batch_host))
        return cu_fail(e, "internal error: cuda batch packing failed");
    const int64_t up = (bl.n_ints * 4 + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
    const int64_t res = (bl.n_floats * 4 + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
    const int32_t *ints = (const int32_t *)cm->batch_dev;
    const BatchDev bd = {ints + bl.tokens, ints + bl.pos, ints + bl.cu, ints + bl.rows,
                         (const CudaAttnTile *)(ints + bl.tiles), (float *)(cm->batch_dev + up),
                         (float *)(cm->batch_dev + up + res)};
    // the one host-to-device copy of the batch
    CU_CHECK(cudaMemcpyAsync(cm->batch_dev, cm->batch_host, (size_t)(bl.n_ints * 4), cudaMemcpyHostToDevice, st));
    launch_embedding((float *)(cm->act + cm->al.x), bd.tokens, wb(cm, cm->wl.embed), cm->embed_scale, T,
                     c->hidden_size, st);
    CU_CHECK_LAUNCH("embedding");
    for (int l = 0; l < c->num_layers; l++)
        if (layer_forward(cm, l, &bd, &bl, e)) return -1;
    if (heads_forward(cm, &bd, &bl, w, e)) return -1;
    // the one device-to-host copy of every output
    CU_CHECK(cudaMemcpyAsync(cm->batch_host + up, cm->batch_dev + up, (size_t)(bl.n_floats * 4),
                             cudaMemcpyDeviceToHost, st));
    CU_CHECK(cudaStreamSynchronize(st));  // kernel faults surface here, with the kernel's error
    scatter_outputs(cm, &bl, w, out);
    return 0;
}

static int same_shape(const Config *a, const Config *b) {
    return a->arch == b->arch && a->hidden_size == b->hidden_size && a->intermediate_size == b->intermediate_size &&
           a->num_layers == b->num_layers && a->num_heads == b->num_heads && a->num_kv_heads == b->num_kv_heads &&
           a->head_dim == b->head_dim && a->vocab_size == b->vocab_size && a->num_objectives == b->num_objectives &&
           a->gating_hidden_dim == b->gating_hidden_dim && a->gating_n_hidden == b->gating_n_hidden &&
           a->num_labels == b->num_labels && a->attention_bias == b->attention_bias && a->mlp_bias == b->mlp_bias &&
           a->qkv_bias == b->qkv_bias && a->qk_norm == b->qk_norm && a->post_norms == b->post_norms &&
           a->hidden_act == b->hidden_act && a->norm_offset == b->norm_offset && a->embed_scale == b->embed_scale;
}

extern "C" int cuda_forward(CudaModel *cm, const Model *m, const Batch *b, Outputs *out, ArmError *e) {
    if (!cm) return cu_fail(e, "cuda: the model is not on a GPU");
    const Config *c = &cm->cfg;
    if (!same_shape(c, &m->cfg)) return cu_fail(e, "internal error: cuda_forward called with another model");
    if (batch_validate(m, b, e)) return -1;
    Want w;
    w.armorm = c->arch == ARCH_ARMORM && m->cfg.compute_head && (out->rewards || out->gating_output || out->score);
    w.seqcls = c->arch == ARCH_SEQCLS && m->cfg.compute_head && (out->logits || out->score);
    w.gating = b->gating_pos != NULL;
    w.all_hidden = out->all_hidden != NULL;
    if ((w.armorm || out->prompt_embedding) && !b->gating_pos)
        return cu_fail(e, "gating positions are required for the ArmoRM head and prompt_embedding");
    pthread_mutex_lock(&cm->lock);
    const int rc = forward_locked(cm, b, out, &w, e);
    pthread_mutex_unlock(&cm->lock);
    return rc ? CUDA_ERR_DEVICE : 0;
}
