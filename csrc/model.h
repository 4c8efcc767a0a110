// model.h: the model description shared by every backend.
//
// Config     : the numbers read from config.json (validated here, not trusted).
// Weights    : pointers to every tensor the forward pass reads. Each points into
//              a read-only file mapping (zero copy) or into a buffer this struct
//              owns when the stored dtype differs from the compute dtype; a
//              prepacked matrix points into Model.packed instead.
// Model      : Config + Weights + the mapped files. Immutable after model_load,
//              so one Model may be used by many threads at once: every forward
//              call allocates its own RunState. There is no global mutable
//              state anywhere in the core.
#ifndef ARMORM_MODEL_H
#define ARMORM_MODEL_H

#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include "safetensors.h"
#include "dtype.h"
#include "cpu/cpu_features.h"

#define ARM_ERRLEN 1024

// Error carrier: every fallible function takes one and returns 0 / -1.
typedef struct { char msg[ARM_ERRLEN]; } ArmError;
int arm_fail(ArmError *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Weight storage formats the kernels read directly.
typedef enum { WT_AUTO = -1, WT_F32 = 0, WT_BF16 = 1, WT_F16 = 2 } WDType;

typedef enum {
    ARCH_BACKBONE = 0,  // bare LlamaModel: hidden states only
    ARCH_ARMORM = 1,    // LlamaForRewardModelWithGating
    ARCH_SEQCLS = 2,    // LlamaForSequenceClassification
    ARCH_CAUSALLM = 3,  // LlamaForCausalLM (lm_head present, unused)
} Arch;

typedef enum { ROPE_DEFAULT = 0, ROPE_LLAMA3 = 1, ROPE_LINEAR = 2 } RopeType;


// The MLP's gate activation: h = act(gate(x)) * up(x).
typedef enum {
    ACT_SILU = 0,       // SwiGLU (Llama, Qwen)
    ACT_GELU_TANH = 1,  // GeGLU with the tanh approximation of GELU (Gemma-2)
} Activation;

#define ARM_MAX_LAYERS 4096

// ArmoRM's head sizes when config.json does not give them (the released
// model's: 19 objectives, a 3 x 1024 gating MLP, softmax temperature 10). The
// one place they are written: the binding exposes them as _core.HEAD_DEFAULTS,
// which armorm.config, stage-2 training (GatingConfig) and the CLI read.
#define DEFAULT_NUM_OBJECTIVES 19
#define DEFAULT_GATING_TEMPERATURE 10.0
#define DEFAULT_GATING_HIDDEN_DIM 1024
#define DEFAULT_GATING_N_HIDDEN 3

typedef struct {
    char model_class[64];      // config.json's class name, for messages ("" = the Llama name of `arch`)
    Arch arch;                 // what the checkpoint holds
    int compute_head;          // 0: skip the head even when present
    int check_finite;          // 1: refuse a checkpoint with NaN/inf in any tensor read
    int prepack;               // backbone matrices in the GEMM kernel's layout from load on (docs/model.md,
                               // 'Prepacked weights'): -1 where that costs no memory, 0 never, 1 on every SIMD path
    int hidden_size;           // H
    int intermediate_size;     // I
    int num_layers;
    int num_heads;             // query heads
    int num_kv_heads;          // key/value heads (GQA: num_heads % num_kv_heads == 0)
    int head_dim;              // hd
    int vocab_size;            // rows of the embedding
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    RopeType rope_type;
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_pos;
    int attention_bias;        // biases on q, k, v and o
    int qkv_bias;              // biases on q, k, v only (Qwen2), o without
    int mlp_bias;
    int tie_word_embeddings;
    // Family switches: every family is the one forward pass with these set
    // (armorm/config.py maps each family's config.json onto them).
    Activation hidden_act;
    int norm_offset;           // RMSNorm scales by (1 + w), not w (Gemma)
    int qk_norm;               // per-head RMSNorm of q and k before RoPE (Qwen3)
    int post_norms;            // RMSNorm of the attention and MLP outputs before the residual add (Gemma-2)
    int embed_scale;           // embeddings times sqrt(H), rounded to the embedding's dtype (Gemma)
    double query_pre_attn_scalar;  // attention scores scale by its -1/2 power (head_dim unless the family says)
    float attn_softcap;        // > 0: scores = c * tanh(scores / c) before the softmax (Gemma-2)
    int sliding_window;        // > 0: a sliding layer's query sees only its last `sliding_window` keys
    uint64_t sliding_layers[ARM_MAX_LAYERS / 64];  // bit l: layer l uses the sliding window
    // head
    int num_objectives;        // K (ArmoRM)
    float gating_temperature;
    int gating_hidden_dim;     // D
    int gating_n_hidden;
    int num_labels;            // SeqCls
} Config;

// A weight matrix or vector as the kernels see it.
typedef struct {
    const void *data;          // NULL for a prepacked matrix: its elements exist only in `packed`
    WDType dtype;              // the dtype it is held in (prepacked: before packing; picks the kernel)
    int64_t rows, cols;        // vectors: rows = 1
    const uint32_t *packed;    // the matrix in its GEMM kernel's layout (cpu/gemm.h), or NULL
} WTensor;

typedef struct {
    WTensor attn_norm, q, k, v, o, q_b, k_b, v_b, o_b;   // biases have data NULL when absent
    WTensor q_norm, k_norm;                             // (head_dim) with qk_norm, else data NULL
    WTensor attn_post_norm, mlp_post_norm;              // (H) with post_norms, else data NULL
    WTensor mlp_norm, gate, up, down, gate_b, up_b, down_b;
} LayerWeights;

typedef struct {
    WTensor embed;             // (vocab, H)
    LayerWeights *layers;      // num_layers
    WTensor final_norm;        // (H)
    // ArmoRM head, always fp32 (small): converted on load when stored otherwise
    const float *regression;   // (K, H)
    const float *transform;    // (K, K)
    const float **gate_w;      // gating_n_hidden + 1 matrices: (D,H), (D,D)..., (K,D)
    const float **gate_b;      // their biases: (D)... (K)
    float logit_scale;
    // SeqCls head
    const float *score;        // (num_labels, H)
} Weights;

// A buffer holding a converted tensor (weight_buffer_alloc).
typedef struct {
    void *p;
    size_t bytes;
} OwnedBuf;

typedef struct {
    Config cfg;
    WDType compute_wdtype;     // dtype the backbone matrices are held in
    Weights w;
    StFile *files;
    int n_files;
    OwnedBuf *owned;           // buffers holding converted tensors
    int n_owned, cap_owned;
    OwnedBuf packed;           // every prepacked matrix (WTensor.packed points in here); bytes 0: none
    float *inv_freq;           // (head_dim/2) RoPE frequencies, precomputed
    float embed_scale;         // embedding multiplier (config_embed_scale for the held dtype)
    int num_threads;
    ArmKernel kernel;          // matmul path, resolved once at load (ARMORM_KERNEL or the best the CPU has)
    double parallel_min_flops; // calls below this run on one thread (ARMORM_PARALLEL_MIN_FLOPS, default 2e8)
} Model;

static inline int config_layer_sliding(const Config *c, int layer) {
    return c->sliding_window > 0 && layer >= 0 && layer < ARM_MAX_LAYERS &&
           (c->sliding_layers[layer / 64] >> (layer % 64) & 1u);
}

// What one layer's attention computes, decided here for every backend and
// kernel path: scores = (q . k) * scale, then softcap * tanh(scores / softcap)
// when softcap > 0; query i of a sequence sees keys j <= i, and only
// j > i - window when window > 0.
typedef struct {
    float scale;
    float softcap;
    int64_t window;
} AttnParams;

static inline AttnParams config_attn_params(const Config *c, int layer) {
    AttnParams p;
    // the reference: a Python float (query_pre_attn_scalar ** -0.5) applied to fp32 scores
    p.scale = (float)pow(c->query_pre_attn_scalar, -0.5);
    p.softcap = c->attn_softcap > 0.0f ? c->attn_softcap : 0.0f;
    p.window = config_layer_sliding(c, layer) ? c->sliding_window : 0;
    return p;
}

// The embedding multiplier for embeddings held in `held`: 1, or sqrt(H)
// rounded to that dtype, as the reference multiplies by a scale cast to the
// weights' dtype (sqrt(2304) = 48 stays, sqrt(3072) = 55.43 becomes 55.5 in bf16).
static inline float config_embed_scale(const Config *c, WDType held) {
    if (!c->embed_scale) return 1.0f;
    const float s = (float)sqrt((double)c->hidden_size);
    if (held == WT_BF16) return bf16_to_f32(f32_to_bf16(s));
    if (held == WT_F16) return f16_to_f32(f32_to_f16(s));
    return s;
}

// Checks the config numbers for consistency (positive sizes, divisibility, ...).
int config_validate(const Config *c, ArmError *e);

// Maps `paths`, checks every tensor against `cfg` (presence, shape, dtype,
// no extras), converts where the stored dtype differs from `wdtype`
// (WT_AUTO: hold the backbone in the embedding's stored dtype) and, with
// cfg->check_finite, refuses NaN/inf in any tensor read (one pass over the
// bytes for both: weight_pass.h), and with cfg->prepack packs the backbone
// matrices into Model.packed in that pass. Never holds a converted or packed
// tensor and its source together: source pages are dropped chunk by chunk. Reads
// ARMORM_KERNEL (auto|portable|avx2|avx512|avx512bf16) to pick the matmul path;
// a path this CPU cannot run is an error.
int model_load(Model *m, const Config *cfg, const char *const *paths, int n_paths,
               WDType wdtype, int num_threads, ArmError *e);
void model_free(Model *m);

// Copies n elements of a stored F32/BF16/F16 tensor into fp32.
void arm_convert_to_f32(float *dst, const void *src, StDType dtype, uint64_t n);

// Looks up a tensor by name in the mapped files (NULL when absent).
const StTensor *model_find_tensor(const Model *m, const char *name);

// One packed batch: B sequences laid end to end, no padding. A sequence may
// continue an earlier one (a shared prefix, prefix.h): its packed rows then
// hold only its own tokens, and positions count from the start of its full
// token list (the parent's full list, then its own tokens).
typedef struct {
    const int32_t *tokens;     // (T) token ids
    const int64_t *cu_seqlens; // (B+1) cu_seqlens[b] = start of sequence b, cu_seqlens[B] = T
    int B;
    const int64_t *reward_pos; // (B) position within each full sequence, or NULL = last token
    const int64_t *gating_pos; // (B) position within each full sequence, or NULL (no gating)
    int64_t index_base;        // number of sequence 0 in error messages (its index in the caller's list)
    const int32_t *parent;     // (B) parent[b] < b: the sequence b continues, -1: none; NULL: no sequence has one
} Batch;

// off[b] = the full length of the sequence b continues (0 without a parent):
// the position of b's first own token. off has B entries.
void batch_offsets(const Batch *b, int64_t *off);

// ---- Outputs: which fields a model produces and what a call computes.
// Decided here, once, for both backends, the binding and Python (which reads
// it through _core.Model.fields / .plan).

// The fields, in the order results are returned (the reference's order).
typedef enum {
    FIELD_REWARDS = 0,       // (B, K)          ArmoRM
    FIELD_GATING_OUTPUT,     // (B, K)          ArmoRM
    FIELD_SCORE,             // (B)             ArmoRM: gated score; SeqCls: logits[:, 0]
    FIELD_LOGITS,            // ArmoRM: (B) = score, as the reference; SeqCls: (B, num_labels)
    FIELD_HIDDEN_STATE,      // (B, H)          final-norm state at the reward position
    FIELD_PROMPT_EMBEDDING,  // (B, H)          final-norm state at the gating position
    FIELD_ALL_HIDDEN,        // (T, H)          every token's final-norm state; only when asked for
    N_FIELDS
} Field;

#define FIELD_BIT(f) (1u << (f))

extern const char *const field_names[N_FIELDS];

// Output arrays; any pointer may be NULL when the field is not wanted.
typedef struct {
    float *rewards;
    float *gating_output;
    float *score;
    float *logits;
    float *hidden_state;
    float *prompt_embedding;
    float *all_hidden;
} Outputs;

// The member of `o` that holds field f.
float **outputs_slot(Outputs *o, Field f);

// What one call computes for a set of fields.
typedef struct {
    unsigned fields;  // FIELD_BIT(f) for every field written
    Arch head;        // ARCH_ARMORM or ARCH_SEQCLS: that head runs; ARCH_BACKBONE: no head
    int gating;       // the gating-position rows are read (prompt_embedding, the ArmoRM head)
} OutputPlan;

// The checkpoint's class name, for messages: config.json's (Config.model_class,
// "Gemma2ForSequenceClassification", ...), else the Llama name of its head.
const char *config_class_name(const Config *c);
// The fields model `c` produces: its head's (when computed), hidden_state,
// prompt_embedding (not for a sequence-classification head, as the
// reference), all_hidden.
unsigned model_fields(const Config *c);
// The fields a call without a field list gets: every field but all_hidden;
// prompt_embedding only when gating positions are given.
unsigned model_default_fields(const Config *c, int have_gating_pos);
// The field named `name`, or -1.
int field_from_name(const char *name);
// Fails with the message naming `name` as a field model `c` does not produce
// and listing those it does.
int field_unavailable(const Config *c, const char *name, ArmError *e);
// Plans a call for `fields`; an error names a field the model does not produce.
int output_plan(const Config *c, unsigned fields, OutputPlan *p, ArmError *e);
// Shape of field f for a batch of B sequences and T tokens; returns its rank.
int output_shape(const Config *c, Field f, int64_t B, int64_t T, int64_t shape[2]);

// Checks a batch against the model (ids in range, lengths, positions) and
// against the plan (gating positions present when it reads them). Every
// forward entry point runs it once per call; the backends assume it passed.
int batch_validate(const Model *m, const Batch *b, ArmError *e);
int batch_check(const Model *m, const Batch *b, const OutputPlan *p, ArmError *e);

// Sequences [first, returned index) form the next packed group: as many as
// fit `max_tokens` tokens (at least one, so a longer sequence runs alone),
// then every following sequence that continues one of the group (a shared
// prefix is never split from its continuations).
int batch_next_group(const Batch *b, int first, int64_t max_tokens);
// Checks caller-chosen group ends (ends[0..n-1]: strictly increasing, the
// last = B): every sequence's parent must lie in its own group.
int batch_check_groups(const Batch *b, const int64_t *ends, int64_t n, ArmError *e);

// CPU forward pass of a batch that passed batch_check with plan `p`. `cancel`
// (may be NULL) is polled between layers and inside them; when it returns
// non-zero the pass stops and the function returns -2.
typedef int (*CancelFn)(void *ctx);
int forward_cpu(const Model *m, const Batch *b, const OutputPlan *p, Outputs *out, CancelFn cancel,
                void *cancel_ctx, ArmError *e);

#endif
