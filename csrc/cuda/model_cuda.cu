// model_cuda.cu: a Model's device copy: create (memory check, one allocation
// for the weights, resources), the upload, the buffers that grow with the
// batch, and free. The forward pass that uses it is forward_cuda.cu.
//
// Upload: every backbone matrix as bf16 through pinned staging (f32/f16
// converted on the GPU), norm vectors, biases and heads as f32, into the
// offsets cuda_weight_layout planned (plan.cu).
#include "cuda_model.cuh"
#include "k_convert.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    if (convert && !dst_bf16) return arm_fail(e, "internal error: f32 device tensors must be stored as F32");
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
        return arm_fail(e, "cuda upload: %s%s is (%lld, %lld)%s, expected (%lld, %lld)", what, where,
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
        upload_w(u, L, wl->mlp_norm, &lw->mlp_norm, 1, H, 0, "post_attention_layernorm", l, e))
        return -1;
    if (c->attention_bias &&
        (upload_w(u, L, wl->bqkv, &lw->q_b, 1, QD, 0, "q_proj.bias", l, e) ||
         upload_w(u, L, wl->bqkv + QD * 4, &lw->k_b, 1, KD, 0, "k_proj.bias", l, e) ||
         upload_w(u, L, wl->bqkv + (QD + KD) * 4, &lw->v_b, 1, KD, 0, "v_proj.bias", l, e) ||
         upload_w(u, L, wl->bo, &lw->o_b, 1, H, 0, "o_proj.bias", l, e)))
        return -1;
    if (c->mlp_bias &&
        (upload_w(u, L, wl->bgu, &lw->gate_b, 1, I, 0, "gate_proj.bias", l, e) ||
         upload_w(u, L, wl->bgu + I * 4, &lw->up_b, 1, I, 0, "up_proj.bias", l, e) ||
         upload_w(u, L, wl->bdown, &lw->down_b, 1, H, 0, "down_proj.bias", l, e)))
        return -1;
    return 0;
}

static int upload_f32(Uploader *u, char *dst, const float *src, int64_t n, const char *what, ArmError *e) {
    if (!src) return arm_fail(e, "cuda upload: head tensor %s is missing", what);
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
            rc = arm_fail(e, "CUDA error: cudaStreamSynchronize after the weight upload failed: %s (%s)",
                          cudaGetErrorString(err), cudaGetErrorName(err));
    }
    uploader_free(&u);
    return rc;
}

// ---------------------------------------------------------------------------
// Buffers that grow with the batch.

int cuda_ensure_activations(CudaModel *cm, int64_t T, ArmError *e) {
    if (cm->act && T <= cm->al.max_tokens) return 0;
    const int64_t want = (T + 1023) / 1024 * 1024;  // round up so small growth steps do not reallocate each call
    CudaActLayout al;
    if (cuda_act_layout(&cm->cfg, want, &al)) return arm_fail(e, "cuda: a batch of %lld tokens is too large", (long long)T);
    if (cm->act) CU_CHECK(cudaFree(cm->act));
    cm->act = NULL;
    cm->al.max_tokens = 0;
    cudaError_t err = cudaMalloc((void **)&cm->act, (size_t)al.total);
    if (err != cudaSuccess) {
        cudaGetLastError();
        cm->act = NULL;
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return arm_fail(e, "not enough GPU memory on cuda:%d for the activations of a %lld-token batch: %lld bytes "
                          "needed, %lld free (%s); use smaller batches (max_batch_tokens)",
                        cm->device, (long long)T, (long long)al.total, (long long)fr, cudaGetErrorString(err));
    }
    cm->al = al;
    return 0;
}

int cuda_ensure_batch(CudaModel *cm, const CudaBatchLayout *bl, ArmError *e) {
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
    if (cuda_device_describe(device, why, sizeof why)) return arm_fail(e, "device_map='cuda:%d': %s", device, why);
    if (cuda_plan_memory(&m->cfg, CUDA_DEFAULT_MAX_TOKENS, plan))
        return arm_fail(e, "cuda: the model's sizes exceed what the CUDA kernels index (int32 rows)");
    CU_CHECK(cudaSetDevice(device));
    size_t fr = 0, tot = 0;
    CU_CHECK(cudaMemGetInfo(&fr, &tot));
    char msg[ARM_ERRLEN];
    if (cuda_plan_check_fits(plan, (int64_t)fr, (int64_t)tot, device, msg, sizeof msg))
        return arm_fail(e, "%s", msg);
    return 0;
}

static int create_resources(CudaModel *cm, ArmError *e) {
    if (pthread_mutex_init(&cm->lock, NULL)) return arm_fail(e, "cuda: pthread_mutex_init failed");
    cm->lock_ok = 1;
    CU_CHECK(cudaStreamCreateWithFlags(&cm->stream, cudaStreamNonBlocking));
    CU_CHECK(cudaMalloc((void **)&cm->weights, (size_t)cm->wl.total));
    CU_CHECK(cudaMalloc(&cm->lt_ws, (size_t)CUDA_LT_WORKSPACE));
    if (gemm_init(&cm->gemm, cm->lt_ws, (size_t)CUDA_LT_WORKSPACE, e)) return -1;
    cm->gemm_ok = 1;
    return cuda_ensure_activations(cm, CUDA_DEFAULT_MAX_TOKENS, e);
}

extern "C" int cuda_model_create(CudaModel **out, const Model *m, int device, ArmError *e) {
    *out = NULL;
    CudaMemPlan plan;
    if (create_checks(m, device, &plan, e)) return -1;
    CudaModel *cm = (CudaModel *)calloc(1, sizeof *cm);
    if (!cm) return arm_fail(e, "out of host memory");
    cm->device = device;
    cm->cfg = m->cfg;
    cm->logit_scale = m->w.logit_scale;
    if (cuda_weight_layout(&cm->cfg, &cm->wl) || create_resources(cm, e) || upload_all(cm, m, e)) {
        cuda_model_free(cm);
        return -1;
    }
    *out = cm;
    return 0;
}

extern "C" int cuda_model_reserve(CudaModel *cm, int64_t max_tokens, ArmError *e) {
    if (!cm) return arm_fail(e, "cuda: no model");
    pthread_mutex_lock(&cm->lock);
    int rc = cudaSetDevice(cm->device) == cudaSuccess ? cuda_ensure_activations(cm, max_tokens, e)
                                                      : arm_fail(e, "CUDA error: cudaSetDevice(%d) failed", cm->device);
    pthread_mutex_unlock(&cm->lock);
    return rc;
}
