// model.c: config validation, checkpoint loading and weight binding.
//
// Loading is all-or-nothing: every shard is mapped and parsed, every tensor is
// matched against the list the config implies (names, shapes, dtypes), and
// only then are pointers bound or dtypes converted (or matrices packed for
// the GEMM kernel: prepack_kernel), in one pass over the bytes that also looks
// for NaN/inf (weight_pass.c). Any defect frees everything and returns an
// error naming the tensor and file.
#define _GNU_SOURCE
#include "model.h"
#include "dtype.h"
#include "weight_pass.h"
#include "cpu/gemm.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int arm_fail(ArmError *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int config_validate(const Config *c, ArmError *e) {
    const struct { const char *name; int value; } sizes[] = {
        {"hidden_size", c->hidden_size}, {"intermediate_size", c->intermediate_size},
        {"num_hidden_layers", c->num_layers}, {"num_attention_heads", c->num_heads},
        {"num_key_value_heads", c->num_kv_heads}, {"head_dim", c->head_dim},
        {"vocab_size", c->vocab_size}, {"max_position_embeddings", c->max_position_embeddings}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].value <= 0)
            return arm_fail(e, "config: %s must be positive, got %d", sizes[i].name, sizes[i].value);
    if (c->num_heads % c->num_kv_heads != 0)
        return arm_fail(e, "config: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                        c->num_heads, c->num_kv_heads);
    if (c->head_dim % 2 != 0)
        return arm_fail(e, "config: head_dim (%d) must be even for rotary embeddings", c->head_dim);
    // Limits keep every size product far inside int64 and allocations sane.
    if (c->hidden_size > 65536 || c->intermediate_size > 1048576 || c->num_layers > 4096 ||
        c->num_heads > 4096 || c->head_dim > 4096 || c->vocab_size > 16777216)
        return arm_fail(e, "config: sizes beyond supported limits");
    if ((int64_t)c->num_heads * c->head_dim > 1048576)
        return arm_fail(e, "config: num_attention_heads * head_dim too large");
    if (!(c->rms_norm_eps >= 0.0f) || !isfinite(c->rms_norm_eps))
        return arm_fail(e, "config: rms_norm_eps must be a finite non-negative number");
    if (!(c->rope_theta > 0.0) || !isfinite(c->rope_theta))
        return arm_fail(e, "config: rope_theta must be a positive finite number");
    if (c->rope_type == ROPE_LLAMA3) {
        if (!(c->rope_factor > 0) || !(c->rope_low_freq_factor > 0) || !(c->rope_high_freq_factor > 0) ||
            c->rope_original_max_pos <= 0 || c->rope_high_freq_factor == c->rope_low_freq_factor)
            return arm_fail(e, "config: rope_scaling of type llama3 needs positive factor, low_freq_factor, "
                               "high_freq_factor (distinct) and original_max_position_embeddings");
    } else if (c->rope_type == ROPE_LINEAR) {
        if (!(c->rope_factor > 0)) return arm_fail(e, "config: rope_scaling linear needs a positive factor");
    }
    if (c->hidden_act != ACT_SILU && c->hidden_act != ACT_GELU_TANH)
        return arm_fail(e, "config: hidden_act code %d is not supported", (int)c->hidden_act);
    if (!(c->query_pre_attn_scalar > 0.0) || !isfinite(c->query_pre_attn_scalar))
        return arm_fail(e, "config: query_pre_attn_scalar must be a positive finite number");
    if (!(c->attn_softcap >= 0.0f) || !isfinite(c->attn_softcap))
        return arm_fail(e, "config: attn_logit_softcapping must be a positive finite number or absent");
    if (c->sliding_window < 0) return arm_fail(e, "config: sliding_window must be positive or absent");
    if (c->prepack < -1 || c->prepack > 1) return arm_fail(e, "prepack must be -1 (auto), 0 or 1, got %d", c->prepack);
    if (c->arch == ARCH_ARMORM) {
        if (c->num_objectives <= 0 || c->num_objectives > 65536)
            return arm_fail(e, "config: num_objectives must be in 1..65536, got %d", c->num_objectives);
        if (c->gating_hidden_dim <= 0 || c->gating_hidden_dim > 1048576)
            return arm_fail(e, "config: gating_hidden_dim must be positive, got %d", c->gating_hidden_dim);
        if (c->gating_n_hidden < 0 || c->gating_n_hidden > 64)
            return arm_fail(e, "config: gating_n_hidden must be in 0..64, got %d", c->gating_n_hidden);
        if (!(c->gating_temperature > 0) || !isfinite(c->gating_temperature))
            return arm_fail(e, "config: gating_temperature must be positive and finite");
    }
    if (c->arch == ARCH_SEQCLS && (c->num_labels <= 0 || c->num_labels > 65536))
        return arm_fail(e, "config: num_labels must be in 1..65536, got %d", c->num_labels);
    return 0;
}

// ---------------------------------------------------------------------------
// The tensors a config implies.

typedef enum { DEST_W, DEST_F32, DEST_SCALAR } DestKind;

typedef struct {
    char name[160];
    int ndim;
    int64_t shape[2];
    DestKind kind;
    WTensor *w;           // DEST_W: backbone tensor, held in compute dtype (matrices) or f32 (vectors)
    const float **f;      // DEST_F32: head tensor, held in f32
    float *scalar;        // DEST_SCALAR
    int optional;         // may be absent (tied lm_head)
    int unused;           // present in the file but not read (lm_head)
    int add_one;          // a norm weight held as 1 + w (Config.norm_offset)
    int gemm;             // a matrix the forward pass multiplies by through gemm_run: may be prepacked
    const StTensor *found;
    int found_file;
    const void *bound;    // where the tensor is held: the mapping or a converted buffer
    int job;              // its entry in the weight pass, -1 when none
} Expect;

typedef struct {
    Expect *v;
    int n, cap;
} ExpectList;

static Expect *expect_add(ExpectList *l, ArmError *e, int ndim, int64_t d0, int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static Expect *expect_add(ExpectList *l, ArmError *e, int ndim, int64_t d0, int64_t d1, const char *fmt, ...) {
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        Expect *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) { arm_fail(e, "out of memory"); return NULL; }
        l->v = v;
        l->cap = cap;
    }
    Expect *x = &l->v[l->n++];
    memset(x, 0, sizeof *x);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->name, sizeof x->name, fmt, ap);
    va_end(ap);
    x->ndim = ndim;
    x->shape[0] = d0;
    x->shape[1] = d1;
    x->found_file = -1;
    return x;
}

#define ADD_W(dst, nd, a, b, ...)                                  \
    do {                                                           \
        Expect *x_ = expect_add(&L, e, nd, a, b, __VA_ARGS__);     \
        if (!x_) goto fail;                                        \
        x_->kind = DEST_W;                                         \
        x_->w = (dst);                                             \
    } while (0)
// A projection matrix (x @ W^T in the forward pass): prepacked when that applies.
#define ADD_MAT(dst, a, b, ...)                                    \
    do {                                                           \
        Expect *x_ = expect_add(&L, e, 2, a, b, __VA_ARGS__);      \
        if (!x_) goto fail;                                        \
        x_->kind = DEST_W;                                         \
        x_->w = (dst);                                             \
        x_->gemm = 1;                                              \
    } while (0)
// An RMSNorm weight: held as 1 + w when the family's norms scale by (1 + w).
#define ADD_NORM(dst, n, ...)                                      \
    do {                                                           \
        Expect *x_ = expect_add(&L, e, 1, n, 0, __VA_ARGS__);      \
        if (!x_) goto fail;                                        \
        x_->kind = DEST_W;                                         \
        x_->w = (dst);                                             \
        x_->add_one = c->norm_offset;                              \
    } while (0)
#define ADD_F(dst, nd, a, b, ...)                                  \
    do {                                                           \
        Expect *x_ = expect_add(&L, e, nd, a, b, __VA_ARGS__);     \
        if (!x_) goto fail;                                        \
        x_->kind = DEST_F32;                                       \
        x_->f = (dst);                                             \
    } while (0)

static int cmp_expect(const void *a, const void *b) {
    return strcmp(((const Expect *)a)->name, ((const Expect *)b)->name);
}

static int is_ignored_buffer(const char *name) {
    // Older Llama checkpoints saved the RoPE frequency buffer; it is recomputed.
    size_t n = strlen(name), k = strlen("rotary_emb.inv_freq");
    return n >= k && strcmp(name + n - k, "rotary_emb.inv_freq") == 0;
}

static void *own(Model *m, size_t bytes, ArmError *e) {
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? m->cap_owned * 2 : 64;
        OwnedBuf *v = realloc(m->owned, (size_t)cap * sizeof *v);
        if (!v) { arm_fail(e, "out of memory"); return NULL; }
        m->owned = v;
        m->cap_owned = cap;
    }
    void *p = weight_buffer_alloc(bytes);
    if (!p) { arm_fail(e, "out of memory allocating %zu bytes for converted weights", bytes); return NULL; }
    m->owned[m->n_owned++] = (OwnedBuf){p, bytes};
    return p;
}

static int wdtype_of(StDType d, WDType *out) {
    switch (d) {
        case ST_F32: *out = WT_F32; return 0;
        case ST_BF16: *out = WT_BF16; return 0;
        case ST_F16: *out = WT_F16; return 0;
        default: return -1;
    }
}

// Converts n elements from `src` (dtype s) into `dst` (dtype d), in place-free.
static void convert(void *dst, WDType d, const void *src, WDType s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float x = load_as_f32(src, (int)s, i);
        if (d == WT_F32) ((float *)dst)[i] = x;
        else if (d == WT_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(x);
        else ((uint16_t *)dst)[i] = f32_to_f16(x);
    }
}

static size_t wsize(WDType t) { return t == WT_F32 ? 4 : 2; }

// The kernel the backbone matrices are packed for at load, or NULL (docs/model.md,
// 'Prepacked weights'): the one the forward pass's products run on, when they run
// on a GEMM kernel (not the portable path) and, by default (prepack -1), only when
// its layout takes no more bytes per element than the held dtype: bf16 weights on
// an fp32 kernel (widened to fp32 as they are packed) would double in memory, so
// they stay as stored and are packed block by block in every call.
static int prepack_kernel(const Model *m, WDType held, const GemmKernel **out, ArmError *e) {
    const GemmKernel *g = gemm_kernel_for(m->kernel, held);
    *out = NULL;
    if (m->cfg.prepack == 0) return 0;
    if (!g) {
        if (m->cfg.prepack < 0) return 0;
        return arm_fail(e, "prepack: the %s kernel path reads the weights as they are held; it has no packed layout",
                        arm_kernel_name(m->kernel));
    }
    if (m->cfg.prepack < 0 && (size_t)(4 / g->kstep) > wsize(held)) return 0;  // a packed step is 4 bytes
    *out = g;
    return 0;
}

// Bytes of a (rows, cols) matrix packed for g: whole panels, a multiple of 64.
static size_t packed_size(const GemmKernel *g, int64_t rows, int64_t cols) {
    return (size_t)((rows + g->nw - 1) / g->nw) * (size_t)gemm_panel_words(g, cols) * 4;
}

// Points a found tensor's destination at the mapping (stored dtype = held
// dtype: zero copy), at a new buffer it will be converted into, or (a
// projection matrix with `pack` set) at `packed`, where the pass packs it for
// that kernel, and fills in what the weight pass must do with its bytes.
// Scalars are read after the pass.
static int plan(Model *m, Expect *x, WDType wdtype, int check, const GemmKernel *pack, uint32_t *packed,
                WeightJob *j, ArmError *e) {
    const StTensor *t = x->found;
    WDType s = WT_F32;
    wdtype_of(t->dtype, &s);  // checked by the caller
    // Backbone matrices live in the compute dtype; vectors (norms, biases) and the head in fp32.
    WDType want = x->kind == DEST_W && x->ndim == 2 ? wdtype : WT_F32;
    *j = (WeightJob){.src = t->data, .src_dtype = s, .n = t->numel, .dst_dtype = want, .check = check};
    x->bound = t->data;
    if (pack && x->gemm) {
        // converted (when it must be) strip by strip as it is packed: no whole converted copy
        j->pack = pack;
        j->rows = x->shape[0];
        j->cols = x->shape[1];
        j->packed = packed;
        j->release = 1;  // only the packed copy is read from now on
        x->bound = NULL;
    } else if (s != want || (uintptr_t)t->data % wsize(s) != 0 || x->add_one) {
        // A tensor not aligned to its element size (legal in safetensors, never
        // written by the usual tools) is copied too: the kernels read aligned data.
        // So is a norm weight held as 1 + w: the mapping is read-only.
        void *buf = own(m, (size_t)t->numel * wsize(want), e);
        if (!buf) return -1;
        j->dst = buf;
        j->release = 1;  // the source is read once, then only the converted copy is used
        x->bound = buf;
    } else if (x->kind == DEST_W && x->w == &m->w.embed) {
        j->release = check;  // read whole by the check, then only the rows of the tokens scored
    }
    if (x->kind == DEST_W) {
        x->w->rows = x->ndim == 2 ? x->shape[0] : 1;
        x->w->cols = x->ndim == 2 ? x->shape[1] : x->shape[0];
        x->w->dtype = want;
        x->w->data = x->bound;
        x->w->packed = j->packed;
    } else if (x->kind == DEST_F32) {
        *x->f = x->bound;
    }
    return 0;
}

static int cmp_file_order(const void *a, const void *b) {
    const Expect *x = *(Expect *const *)a, *y = *(Expect *const *)b;
    if (x->found_file != y->found_file) return x->found_file < y->found_file ? -1 : 1;
    return x->found->begin < y->found->begin ? -1 : x->found->begin > y->found->begin;
}

static void compute_inv_freq(Model *m) {
    const Config *c = &m->cfg;
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        // fp32 like the reference: base ** (2i / dim) evaluated in float.
        float expo = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf((float)c->rope_theta, expo);
        if (c->rope_type == ROPE_LINEAR) {
            f = f / (float)c->rope_factor;
        } else if (c->rope_type == ROPE_LLAMA3) {
            const float pi = 3.14159265358979323846f;
            float factor = (float)c->rope_factor;
            float lo = (float)c->rope_low_freq_factor, hi = (float)c->rope_high_freq_factor;
            float old_len = (float)c->rope_original_max_pos;
            float low_wavelen = old_len / lo, high_wavelen = old_len / hi;
            float wavelen = 2.0f * pi / f;
            float g = wavelen > low_wavelen ? f / factor : f;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                float smooth = (old_len / wavelen - lo) / (hi - lo);
                g = (1.0f - smooth) * g / factor + smooth * g;
            }
            f = g;
        }
        m->inv_freq[i] = f;
    }
}

int model_load(Model *m, const Config *cfg, const char *const *paths, int n_paths,
               WDType wdtype, int num_threads, ArmError *e) {
    memset(m, 0, sizeof *m);
    ExpectList L = {0};
    WeightJob *jobs = NULL;
    Expect **order = NULL;
    char sh1[96], sh2[96];
    if (config_validate(cfg, e)) return -1;
    if (n_paths <= 0) return arm_fail(e, "no weight files given");
    m->cfg = *cfg;
    m->compute_wdtype = wdtype;
    m->num_threads = num_threads > 0 ? num_threads : 1;
    const Config *c = &m->cfg;
    if (arm_kernel_resolve(getenv("ARMORM_KERNEL"), &m->kernel, e->msg, sizeof e->msg)) goto fail;
    m->parallel_min_flops = 2.0e8;
    const char *pmf = getenv("ARMORM_PARALLEL_MIN_FLOPS");
    if (pmf && *pmf) {
        char *end;
        double v = strtod(pmf, &end);
        if (*end != '\0' || !(v >= 0.0) || !isfinite(v)) {
            arm_fail(e, "ARMORM_PARALLEL_MIN_FLOPS must be a non-negative number, got '%.40s'", pmf);
            goto fail;
        }
        m->parallel_min_flops = v;
    }

    m->files = calloc((size_t)n_paths, sizeof *m->files);
    if (!m->files) { arm_fail(e, "out of memory"); goto fail; }
    for (int i = 0; i < n_paths; i++) m->files[i].fd = -1;
    for (int i = 0; i < n_paths; i++) {
        m->n_files = i + 1;
        if (st_open(&m->files[i], paths[i], e->msg, sizeof e->msg)) goto fail;
    }

    // Tensor name prefix: a bare LlamaModel is saved without "model.".
    const char *P = "model.";
    if (c->arch == ARCH_BACKBONE) {
        int bare = 0;
        for (int i = 0; i < m->n_files; i++)
            if (st_find(&m->files[i], "embed_tokens.weight")) bare = 1;
        if (bare) P = "";
    }

    m->w.layers = calloc((size_t)c->num_layers, sizeof *m->w.layers);
    m->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    if (!m->w.layers || !m->inv_freq) { arm_fail(e, "out of memory"); goto fail; }

    const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
    const int64_t QD = (int64_t)c->num_heads * c->head_dim, KD = (int64_t)c->num_kv_heads * c->head_dim;
    ADD_W(&m->w.embed, 2, V, H, "%sembed_tokens.weight", P);
    for (int l = 0; l < c->num_layers; l++) {
        LayerWeights *lw = &m->w.layers[l];
        ADD_NORM(&lw->attn_norm, H, "%slayers.%d.input_layernorm.weight", P, l);
        ADD_MAT(&lw->q, QD, H, "%slayers.%d.self_attn.q_proj.weight", P, l);
        ADD_MAT(&lw->k, KD, H, "%slayers.%d.self_attn.k_proj.weight", P, l);
        ADD_MAT(&lw->v, KD, H, "%slayers.%d.self_attn.v_proj.weight", P, l);
        ADD_MAT(&lw->o, H, QD, "%slayers.%d.self_attn.o_proj.weight", P, l);
        if (c->attention_bias || c->qkv_bias) {
            ADD_W(&lw->q_b, 1, QD, 0, "%slayers.%d.self_attn.q_proj.bias", P, l);
            ADD_W(&lw->k_b, 1, KD, 0, "%slayers.%d.self_attn.k_proj.bias", P, l);
            ADD_W(&lw->v_b, 1, KD, 0, "%slayers.%d.self_attn.v_proj.bias", P, l);
        }
        if (c->attention_bias) ADD_W(&lw->o_b, 1, H, 0, "%slayers.%d.self_attn.o_proj.bias", P, l);
        if (c->qk_norm) {
            ADD_NORM(&lw->q_norm, c->head_dim, "%slayers.%d.self_attn.q_norm.weight", P, l);
            ADD_NORM(&lw->k_norm, c->head_dim, "%slayers.%d.self_attn.k_norm.weight", P, l);
        }
        // Gemma-2 names its four norms input / post_attention / pre_feedforward /
        // post_feedforward; elsewhere post_attention_layernorm is the MLP's input norm.
        if (c->post_norms) {
            ADD_NORM(&lw->attn_post_norm, H, "%slayers.%d.post_attention_layernorm.weight", P, l);
            ADD_NORM(&lw->mlp_norm, H, "%slayers.%d.pre_feedforward_layernorm.weight", P, l);
            ADD_NORM(&lw->mlp_post_norm, H, "%slayers.%d.post_feedforward_layernorm.weight", P, l);
        } else {
            ADD_NORM(&lw->mlp_norm, H, "%slayers.%d.post_attention_layernorm.weight", P, l);
        }
        ADD_MAT(&lw->gate, I, H, "%slayers.%d.mlp.gate_proj.weight", P, l);
        ADD_MAT(&lw->up, I, H, "%slayers.%d.mlp.up_proj.weight", P, l);
        ADD_MAT(&lw->down, H, I, "%slayers.%d.mlp.down_proj.weight", P, l);
        if (c->mlp_bias) {
            ADD_W(&lw->gate_b, 1, I, 0, "%slayers.%d.mlp.gate_proj.bias", P, l);
            ADD_W(&lw->up_b, 1, I, 0, "%slayers.%d.mlp.up_proj.bias", P, l);
            ADD_W(&lw->down_b, 1, H, 0, "%slayers.%d.mlp.down_proj.bias", P, l);
        }
    }
    ADD_NORM(&m->w.final_norm, H, "%snorm.weight", P);

    if (c->arch == ARCH_ARMORM) {
        const int64_t K = c->num_objectives, D = c->gating_hidden_dim;
        int nl = c->gating_n_hidden + 1;
        m->w.gate_w = calloc((size_t)nl, sizeof *m->w.gate_w);
        m->w.gate_b = calloc((size_t)nl, sizeof *m->w.gate_b);
        if (!m->w.gate_w || !m->w.gate_b) { arm_fail(e, "out of memory"); goto fail; }
        ADD_F(&m->w.regression, 2, K, H, "regression_layer.weight");
        ADD_F(&m->w.transform, 2, K, K, "reward_transform_matrix");
        for (int j = 0; j < nl; j++) {
            int64_t in = j == 0 ? H : D, outd = j == nl - 1 ? K : D;
            ADD_F(&m->w.gate_w[j], 2, outd, in, "gating.layers.%d.weight", j);
            ADD_F(&m->w.gate_b[j], 1, outd, 0, "gating.layers.%d.bias", j);
        }
        Expect *x = expect_add(&L, e, 1, 1, 0, "gating.logit_scale");
        if (!x) goto fail;
        x->kind = DEST_SCALAR;
        x->scalar = &m->w.logit_scale;
    } else if (c->arch == ARCH_SEQCLS) {
        ADD_F(&m->w.score, 2, c->num_labels, H, "score.weight");
    } else if (c->arch == ARCH_CAUSALLM) {
        Expect *x = expect_add(&L, e, 2, V, H, "lm_head.weight");
        if (!x) goto fail;
        x->unused = 1;
        x->optional = c->tie_word_embeddings;
    }

    // Match every tensor of every file against the expected list.
    qsort(L.v, (size_t)L.n, sizeof *L.v, cmp_expect);
    for (int f = 0; f < m->n_files; f++) {
        const StFile *sf = &m->files[f];
        for (int t = 0; t < sf->n_tensors; t++) {
            const StTensor *st = &sf->tensors[t];
            Expect key;
            snprintf(key.name, sizeof key.name, "%s", st->name);
            Expect *x = strlen(st->name) < sizeof key.name
                            ? bsearch(&key, L.v, (size_t)L.n, sizeof *L.v, cmp_expect) : NULL;
            if (!x) {
                if (is_ignored_buffer(st->name)) continue;
                arm_fail(e, "%s: unexpected tensor '%s' (not part of a %s checkpoint with this config)",
                         sf->path, st->name, config_class_name(c));
                goto fail;
            }
            if (x->found) {
                arm_fail(e, "tensor '%s' appears twice: in %s and in %s", st->name,
                         m->files[x->found_file].path, sf->path);
                goto fail;
            }
            x->found = st;
            x->found_file = f;
            int same = st->ndim == x->ndim;
            for (int d = 0; same && d < x->ndim; d++) same = st->shape[d] == x->shape[d];
            if (!same) {
                st_fmt_shape(sh1, sizeof sh1, st->ndim, st->shape);
                st_fmt_shape(sh2, sizeof sh2, x->ndim, x->shape);
                arm_fail(e, "%s: tensor '%s' has shape %s, expected %s from config.json", sf->path,
                         st->name, sh1, sh2);
                goto fail;
            }
            WDType dt;
            if (wdtype_of(st->dtype, &dt)) {
                arm_fail(e, "%s: tensor '%s' has dtype %s; supported: F32, BF16, F16", sf->path,
                         st->name, st->dtype_name);
                goto fail;
            }
        }
    }
    for (int i = 0; i < L.n; i++) {
        if (!L.v[i].found && !L.v[i].optional) {
            arm_fail(e, "missing tensor '%s' (required by config.json; looked in %d file%s)", L.v[i].name,
                     m->n_files, m->n_files == 1 ? "" : "s");
            goto fail;
        }
    }
    if (wdtype == WT_AUTO)
        for (int i = 0; i < L.n; i++)
            if (L.v[i].w == &m->w.embed) wdtype_of(L.v[i].found->dtype, &wdtype);
    m->compute_wdtype = wdtype;
    // Everything checked: bind or convert, in file order (a cold file is read
    // sequentially). NaN/inf weights would silently turn every score into NaN:
    // the same pass finds them.
    const size_t n_list = L.n > 0 ? (size_t)L.n : 1;  // (a non-negative count: tells the compiler too)
    jobs = calloc(n_list, sizeof *jobs);
    order = calloc(n_list, sizeof *order);
    if (!jobs || !order) { arm_fail(e, "out of memory"); goto fail; }
    int n_jobs = 0;
    for (int i = 0; i < L.n; i++) {
        L.v[i].job = -1;
        if (L.v[i].found && !L.v[i].unused) order[n_jobs++] = &L.v[i];
    }
    qsort(order, (size_t)n_jobs, sizeof *order, cmp_file_order);
    // Prepacking: one buffer for every projection matrix, each at a multiple of 64 bytes.
    const GemmKernel *pack = NULL;
    if (prepack_kernel(m, wdtype, &pack, e)) goto fail;
    size_t packed_total = 0;
    for (int k = 0; pack && k < n_jobs; k++)
        if (order[k]->gemm) packed_total += packed_size(pack, order[k]->shape[0], order[k]->shape[1]);
    if (packed_total) {
        m->packed.p = weight_buffer_alloc(packed_total);
        if (!m->packed.p) {
            arm_fail(e, "out of memory allocating %zu bytes for prepacked weights", packed_total);
            goto fail;
        }
        m->packed.bytes = packed_total;
    }
    size_t packed_at = 0;
    for (int k = 0; k < n_jobs; k++) {
        uint32_t *at = NULL;
        if (pack && order[k]->gemm) {
            at = (uint32_t *)((char *)m->packed.p + packed_at);
            packed_at += packed_size(pack, order[k]->shape[0], order[k]->shape[1]);
        }
        order[k]->job = k;
        if (plan(m, order[k], wdtype, c->check_finite, pack, at, &jobs[k], e)) goto fail;
    }
    if (weight_pass_run(jobs, n_jobs, m->num_threads, e)) goto fail;
    for (int i = 0; i < L.n; i++) {  // name order: the same tensor is named whatever the thread timing
        const Expect *x = &L.v[i];
        if (x->job < 0) continue;
        uint64_t bad = jobs[x->job].nonfinite;
        if (bad) {
            arm_fail(e, "%s: tensor '%s' holds %llu NaN/inf value%s (check_finite=False in Python, --no-check-finite on the command line, loads it anyway)",
                     m->files[x->found_file].path, x->found->name, (unsigned long long)bad, bad == 1 ? "" : "s");
            goto fail;
        }
        if (x->kind == DEST_SCALAR) *x->scalar = ((const float *)x->bound)[0];
        if (x->add_one) {  // in fp32, as the reference computes 1.0 + weight.float()
            float *w = (float *)x->bound;
            for (uint64_t i = 0; i < x->found->numel; i++) w[i] = 1.0f + w[i];
        }
    }
    compute_inv_freq(m);
    m->embed_scale = config_embed_scale(c, m->compute_wdtype);
    free(jobs);
    free(order);
    free(L.v);
    return 0;
fail:
    free(jobs);
    free(order);
    free(L.v);
    model_free(m);
    return -1;
}

void model_free(Model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_files; i++) st_close(&m->files[i]);
    free(m->files);
    for (int i = 0; i < m->n_owned; i++) weight_buffer_free(m->owned[i].p, m->owned[i].bytes);
    free(m->owned);
    weight_buffer_free(m->packed.p, m->packed.bytes);
    free(m->w.layers);
    free(m->w.gate_w);
    free(m->w.gate_b);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

void arm_convert_to_f32(float *dst, const void *src, StDType dtype, uint64_t n) {
    WDType s;
    if (wdtype_of(dtype, &s) == 0) convert(dst, WT_F32, src, s, (int64_t)n);
}

const StTensor *model_find_tensor(const Model *m, const char *name) {
    for (int i = 0; i < m->n_files; i++) {
        const StTensor *t = st_find(&m->files[i], name);
        if (t) return t;
    }
    return NULL;
}

// ---------------------------------------------------------------------------
// Outputs

const char *const field_names[N_FIELDS] = {"rewards", "gating_output", "score", "logits",
                                           "hidden_state", "prompt_embedding", "all_hidden"};

float **outputs_slot(Outputs *o, Field f) {
    switch (f) {
        case FIELD_REWARDS: return &o->rewards;
        case FIELD_GATING_OUTPUT: return &o->gating_output;
        case FIELD_SCORE: return &o->score;
        case FIELD_LOGITS: return &o->logits;
        case FIELD_HIDDEN_STATE: return &o->hidden_state;
        case FIELD_PROMPT_EMBEDDING: return &o->prompt_embedding;
        default: return &o->all_hidden;
    }
}

const char *config_class_name(const Config *c) {
    if (c->model_class[0]) return c->model_class;
    switch (c->arch) {
        case ARCH_ARMORM: return "LlamaForRewardModelWithGating";
        case ARCH_SEQCLS: return "LlamaForSequenceClassification";
        case ARCH_CAUSALLM: return "LlamaForCausalLM";
        default: return "LlamaModel";
    }
}

// The head that runs when the model computes one: ARCH_BACKBONE when none.
static Arch head_of(const Config *c) {
    if (!c->compute_head) return ARCH_BACKBONE;
    return c->arch == ARCH_ARMORM || c->arch == ARCH_SEQCLS ? c->arch : ARCH_BACKBONE;
}

static const unsigned ARMORM_HEAD_FIELDS = FIELD_BIT(FIELD_REWARDS) | FIELD_BIT(FIELD_GATING_OUTPUT) |
                                           FIELD_BIT(FIELD_SCORE) | FIELD_BIT(FIELD_LOGITS);
static const unsigned SEQCLS_HEAD_FIELDS = FIELD_BIT(FIELD_SCORE) | FIELD_BIT(FIELD_LOGITS);

unsigned model_fields(const Config *c) {
    const unsigned states = FIELD_BIT(FIELD_HIDDEN_STATE) | FIELD_BIT(FIELD_ALL_HIDDEN);
    switch (head_of(c)) {
        case ARCH_ARMORM: return ARMORM_HEAD_FIELDS | states | FIELD_BIT(FIELD_PROMPT_EMBEDDING);
        case ARCH_SEQCLS: return SEQCLS_HEAD_FIELDS | states;
        default: return states | FIELD_BIT(FIELD_PROMPT_EMBEDDING);
    }
}

unsigned model_default_fields(const Config *c, int have_gating_pos) {
    unsigned f = model_fields(c) & ~FIELD_BIT(FIELD_ALL_HIDDEN);
    return have_gating_pos ? f : f & ~FIELD_BIT(FIELD_PROMPT_EMBEDDING);
}

int field_unavailable(const Config *c, const char *name, ArmError *e) {
    const unsigned avail = model_fields(c);
    char list[256] = "";
    size_t o = 0;
    for (int g = 0; g < N_FIELDS; g++)
        if (avail & FIELD_BIT(g) && o < sizeof list)
            o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", o ? ", " : "", field_names[g]);
    return arm_fail(e, "field '%.100s' is not available for %s%s; available: %s", name, config_class_name(c),
                    c->compute_head ? "" : " without its head", list);
}

int field_from_name(const char *name) {
    for (int f = 0; f < N_FIELDS; f++)
        if (strcmp(name, field_names[f]) == 0) return f;
    return -1;
}

int output_plan(const Config *c, unsigned fields, OutputPlan *p, ArmError *e) {
    const unsigned avail = model_fields(c);
    for (int f = 0; f < N_FIELDS; f++)
        if ((fields & FIELD_BIT(f)) && !(avail & FIELD_BIT(f))) return field_unavailable(c, field_names[f], e);
    const Arch head = head_of(c);
    const unsigned head_fields = head == ARCH_ARMORM ? ARMORM_HEAD_FIELDS
                                 : head == ARCH_SEQCLS ? SEQCLS_HEAD_FIELDS : 0;
    p->fields = fields;
    p->head = fields & head_fields ? head : ARCH_BACKBONE;
    // the ArmoRM head's gating network reads the state at the gating position
    p->gating = (fields & FIELD_BIT(FIELD_PROMPT_EMBEDDING)) || p->head == ARCH_ARMORM;
    return 0;
}

int output_shape(const Config *c, Field f, int64_t B, int64_t T, int64_t shape[2]) {
    shape[0] = f == FIELD_ALL_HIDDEN ? T : B;
    switch (f) {
        case FIELD_REWARDS:
        case FIELD_GATING_OUTPUT: shape[1] = c->num_objectives; return 2;
        case FIELD_SCORE: return 1;
        case FIELD_LOGITS:
            if (c->arch != ARCH_SEQCLS) return 1;  // ArmoRM: logits is the score
            shape[1] = c->num_labels;
            return 2;
        default: shape[1] = c->hidden_size; return 2;
    }
}

void batch_offsets(const Batch *b, int64_t *off) {
    for (int s = 0; s < b->B; s++) {
        const int p = b->parent ? b->parent[s] : -1;
        off[s] = p < 0 ? 0 : off[p] + b->cu_seqlens[p + 1] - b->cu_seqlens[p];
    }
}

int batch_validate(const Model *m, const Batch *b, ArmError *e) {
    const Config *c = &m->cfg;
    if (b->B <= 0) return arm_fail(e, "empty batch");
    if (b->cu_seqlens[0] != 0) return arm_fail(e, "cu_seqlens must start at 0");
    int64_t *full = malloc(sizeof(int64_t) * (size_t)b->B);  // full length of each sequence
    if (!full) return arm_fail(e, "out of memory checking a batch of %d sequences", b->B);
    int rc = 0;
    for (int s = 0; s < b->B && rc == 0; s++) {
        const long long id = (long long)(s + b->index_base);
        const int64_t own = b->cu_seqlens[s + 1] - b->cu_seqlens[s];
        const int p = b->parent ? b->parent[s] : -1;
        if (own <= 0) { rc = arm_fail(e, "sequence %lld is empty", id); break; }
        if (p < -1 || p >= s) {
            rc = arm_fail(e, "sequence %lld: parent %d must be -1 or an earlier sequence of the batch", id, p);
            break;
        }
        const int64_t len = full[s] = (p < 0 ? 0 : full[p]) + own;
        if (len > c->max_position_embeddings) {
            rc = arm_fail(e, "sequence %lld has %lld tokens; the model allows at most %d (max_position_embeddings)",
                          id, (long long)len, c->max_position_embeddings);
            break;
        }
        if (b->reward_pos && (b->reward_pos[s] < 0 || b->reward_pos[s] >= len)) {
            rc = arm_fail(e, "sequence %lld: reward position %lld outside its %lld tokens", id,
                          (long long)b->reward_pos[s], (long long)len);
            break;
        }
        if (b->gating_pos && (b->gating_pos[s] < 0 || b->gating_pos[s] >= len)) {
            rc = arm_fail(e, "sequence %lld: gating position %lld outside its %lld tokens", id,
                          (long long)b->gating_pos[s], (long long)len);
            break;
        }
        for (int64_t i = b->cu_seqlens[s]; i < b->cu_seqlens[s + 1]; i++) {
            int32_t t = b->tokens[i];
            if (t < 0 || t >= c->vocab_size) {
                rc = arm_fail(e, "sequence %lld, position %lld: token id %d is outside the embedding "
                                 "(vocab_size %d)", id, (long long)(len - own + i - b->cu_seqlens[s]), (int)t,
                              c->vocab_size);
                break;
            }
        }
    }
    free(full);
    return rc;
}

int batch_check(const Model *m, const Batch *b, const OutputPlan *p, ArmError *e) {
    if (batch_validate(m, b, e)) return -1;
    if (p->gating && !b->gating_pos) {
        if (p->head == ARCH_ARMORM)
            return arm_fail(e, "gating positions are required for the ArmoRM head (rewards, gating_output, score, "
                               "logits)");
        return arm_fail(e, "field 'prompt_embedding' is not available without gating positions");
    }
    return 0;
}

int batch_next_group(const Batch *b, int first, int64_t max_tokens) {
    int end = first + 1;
    while (end < b->B && b->cu_seqlens[end + 1] - b->cu_seqlens[first] <= max_tokens) end++;
    while (b->parent && end < b->B && b->parent[end] >= first) end++;
    return end;
}

int batch_check_groups(const Batch *b, const int64_t *ends, int64_t n, ArmError *e) {
    if (n < 1 || ends[n - 1] != b->B) return arm_fail(e, "groups must end at the batch's %d sequences", b->B);
    for (int64_t g = 0, first = 0; g < n; first = ends[g++]) {
        if (ends[g] <= first) return arm_fail(e, "groups must be strictly increasing sequence counts");
        for (int64_t s = first; b->parent && s < ends[g]; s++)
            if (b->parent[s] >= 0 && b->parent[s] < first)
                return arm_fail(e, "sequence %lld continues sequence %d of an earlier group; a shared prefix must "
                                   "be in the group of its continuations", (long long)(s + b->index_base),
                                b->parent[s]);
    }
    return 0;
}
