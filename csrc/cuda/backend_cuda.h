// backend_cuda.h: the CUDA backend's C interface (usable from C and from CUDA C++).
//
// A CudaModel is the device-side copy of a loaded Model: every backbone
// matrix in bf16 (converted from F32/F16 while uploading), norm vectors,
// biases and the heads in fp32, plus the activation buffers, a stream and a
// cuBLASLt handle. It is created once per (Model, device) and used for any
// number of cuda_forward calls; calls on one CudaModel are serialised by an
// internal lock (the activation buffers are shared), so any thread may call.
//
// The planning functions at the end are pure host arithmetic: they touch no
// CUDA API and are unit-tested on machines without a GPU.
#ifndef ARMORM_BACKEND_CUDA_H
#define ARMORM_BACKEND_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../model.h"  // a C header: its functions (batch_validate) keep C linkage in CUDA C++

typedef struct CudaModel CudaModel;

// Number of usable CUDA devices; 0 (never a crash or an error) when there is
// no driver, no GPU, or the driver is too old for this build.
int cuda_device_count(void);

// Describes device `device` in `buf` ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB"),
// or why it cannot be used. Returns 0 when the device is usable, -1 otherwise.
int cuda_device_describe(int device, char *buf, size_t len);

// Uploads `m` to `device`. Checks the device's free memory (cudaMemGetInfo)
// against cuda_plan_memory(cfg, CUDA_DEFAULT_MAX_TOKENS) before allocating
// anything, and fails naming needed and free bytes. `m` must stay loaded
// while the CudaModel lives (cuda_forward reads its config and RoPE table).
int cuda_model_create(CudaModel **out, const Model *m, int device, ArmError *e);

// Grows the activation buffers to hold batches of up to `max_tokens` tokens
// (cuda_forward grows them on demand too; this lets a caller fail early).
int cuda_model_reserve(CudaModel *cm, int64_t max_tokens, ArmError *e);

// Forward pass of one packed batch that passed batch_check with plan `p`;
// same contract and outputs as forward_cpu (minus cancellation). One
// host-to-device copy of the batch's token ids, positions and offsets; one
// device-to-host copy of every requested output. Returns 0, or
// CUDA_ERR_DEVICE when a CUDA or cuBLAS call failed (the message names the
// call, file:line and the library's error).
#define CUDA_ERR_DEVICE (-3)
int cuda_forward(CudaModel *cm, const Model *m, const Batch *b, const OutputPlan *p, Outputs *out, ArmError *e);

// Frees every device and pinned host buffer; NULL is fine.
void cuda_model_free(CudaModel *cm);

// Bytes of device memory the CudaModel holds now (weights + buffers).
int64_t cuda_model_device_bytes(const CudaModel *cm);

// ---------------------------------------------------------------------------
// Host-side planning (no CUDA calls; tested without a GPU).

#define CUDA_DEFAULT_MAX_TOKENS 8192   // activation capacity checked and reserved at create
#define CUDA_MLP_CHUNK 8192            // tokens per MLP step: bounds the (tokens, 2I) buffer
#define CUDA_ATTN_BLOCK_Q 64           // queries per attention tile (4 warps x 16 rows)
#define CUDA_ALIGN 256                 // alignment of every sub-buffer (cuBLASLt's default assumption)
#define CUDA_LT_WORKSPACE (32LL << 20) // cuBLASLt workspace (Hopper kernels want up to 32 MiB)
#define CUDA_UPLOAD_CHUNK (32LL << 20) // bytes per upload staging buffer (two host + two device)
#define CUDA_RESERVE_BYTES (512LL << 20) // headroom for the CUDA context growth and cuBLASLt internals
#define CUDA_MAX_GATE_LAYERS 65        // gating_n_hidden <= 64 (config_validate)

// Byte offsets of every device weight inside one allocation.
typedef struct {
    int64_t embed;                 // (V, H) bf16
    int64_t final_norm;            // (H) f32
    int64_t inv_freq;              // (hd/2) f32
    int64_t layers;                // first layer; layer l starts at layers + l * layer_stride
    int64_t layer_stride;
    // offsets inside one layer
    int64_t wqkv;                  // (QD + 2 KD, H) bf16: q rows, then k rows, then v rows
    int64_t wo;                    // (H, QD) bf16
    int64_t wgu;                   // (2I, H) bf16: gate rows, then up rows
    int64_t wdown;                 // (H, I) bf16
    int64_t attn_norm, mlp_norm;   // (H) f32
    int64_t bqkv, bo, bgu, bdown;  // f32 biases, -1 when the config has none
    // heads (f32), -1 when absent
    int64_t regression;            // (K, H)
    int64_t transform;             // (K, K)
    int64_t gate_w[CUDA_MAX_GATE_LAYERS], gate_b[CUDA_MAX_GATE_LAYERS];
    int64_t score;                 // (num_labels, H)
    int64_t total;                 // bytes of the whole allocation
} CudaWeightLayout;

// Byte offsets of the activation buffers for `max_tokens` tokens.
typedef struct {
    int64_t max_tokens, mlp_chunk;
    int64_t x;      // (T, H) f32 residual stream
    int64_t xn;     // (T, H) bf16 normed input of a projection
    int64_t qkv;    // (T, QD + 2 KD) bf16
    int64_t att;    // (T, QD) bf16 attention output
    int64_t gu;     // (chunk, 2I) bf16 gate | up
    int64_t h;      // (chunk, I) bf16 silu(gate) * up
    int64_t total;
} CudaActLayout;

// Layout of the per-batch int32 upload (one host-to-device copy) and of the
// f32 results (one device-to-host copy), plus the head's device scratch.
typedef struct {
    int64_t T, B, ntiles;
    // int32 element offsets in the upload buffer
    int64_t tokens;    // (T)
    int64_t pos;       // (T) position of each token within its sequence
    int64_t cu;        // (B+1) sequence starts
    int64_t rows;      // (2B) reward rows (absolute), then gating rows (absolute; 0 when absent)
    int64_t tiles;     // (2 * ntiles) attention tiles: (sequence, first query)
    int64_t n_ints;
    // f32 element offsets in the results buffer
    int64_t hidden;      // (B, H) final-norm state at the reward rows
    int64_t prompt;      // (B, H) ... at the gating rows
    int64_t rewards;     // (B, K)
    int64_t gating;      // (B, K)
    int64_t score;       // (B)
    int64_t logits;      // (B, num_labels)
    int64_t all_hidden;  // (T, H) when asked for, else 0 elements
    int64_t n_floats;
    int64_t scratch_floats; // head scratch: 2 * B * max(D, K) (ArmoRM gating MLP ping-pong)
    int64_t device_bytes;   // upload + results + scratch on the device, CUDA_ALIGN-rounded
    int64_t host_bytes;     // pinned mirror: upload + results
} CudaBatchLayout;

typedef struct {
    int64_t weight_bytes;      // CudaWeightLayout.total
    int64_t activation_bytes;  // CudaActLayout.total for max_tokens
    int64_t batch_bytes;       // CudaBatchLayout.device_bytes for max_tokens tokens in max_tokens / 64 sequences
    int64_t workspace_bytes;   // cuBLASLt workspace + device upload staging
    int64_t reserve_bytes;     // CUDA_RESERVE_BYTES
    int64_t total_bytes;       // sum of the above: what must be free before create allocates
    int64_t max_tokens;
} CudaMemPlan;

// One attention work item: queries q0 .. q0 + block_q - 1 of sequence `seq`.
typedef struct {
    int32_t seq, q0;
} CudaAttnTile;

// Kernel launch geometry.
typedef struct {
    unsigned grid_x, grid_y, grid_z, block;
    size_t smem;
} CudaLaunch;

// Attention kernel choice: the tensor-core kernel exists for these head dims;
// others take the portable one (one warp per query row).
int cuda_attn_tc_supported(int head_dim);

int cuda_weight_layout(const Config *c, CudaWeightLayout *w);
int cuda_act_layout(const Config *c, int64_t max_tokens, CudaActLayout *a);
// Tiles for the sequences given by cu_seqlens (B+1); 0 on bad offsets.
int64_t cuda_attn_tile_count(const int64_t *cu_seqlens, int B, int block_q);
// Fills `tiles` (capacity `cap`) heaviest first (largest q0 first, then by
// sequence) so the longest tiles start first; returns the count or -1.
int64_t cuda_attn_plan(const int64_t *cu_seqlens, int B, int block_q, CudaAttnTile *tiles, int64_t cap);
int cuda_batch_layout(const Config *c, int64_t T, int64_t B, int64_t ntiles, int want_all_hidden,
                      CudaBatchLayout *l);
// Writes the upload buffer for batch b (validated by batch_validate): tokens,
// positions, offsets, reward/gating rows and attention tiles (block_q).
int cuda_batch_pack(const Batch *b, const CudaBatchLayout *l, int block_q, int32_t *buf);
// Returns 0, or -1 when a size does not fit the int32 indexing of the kernels.
int cuda_plan_memory(const Config *c, int64_t max_tokens, CudaMemPlan *p);
// 0 when plan fits in free_bytes; else -1 and a message naming needed vs free.
int cuda_plan_check_fits(const CudaMemPlan *p, int64_t free_bytes, int64_t total_bytes, int device,
                         char *msg, size_t len);

// One cuBLASLt matmul as plain values: D = alpha op(A) op(B) + beta C, every
// matrix column-major (rows, cols, leading dimension), C and D the same buffer.
// cuda_gemm_call fills it for the backbone's projection
//   y (T, N) = x (T, K) @ W^T     (accumulate: y += ..., y fp32; else y bf16, beta 0)
// with W (N, K), x and y row-major. A row-major (r, c) matrix is a column-major
// (c, r) one, so A = W read as (K x N) and transposed, B = x as (K x T), D = y
// as (N x T). gemm.cu builds its descriptors from these values; the CPU stand-in
// in tests/cuda_emu interprets the same values against a reference matmul.
typedef struct {
    int transa, transb;               // 1: op(X) = X^T
    uint64_t a_rows, a_cols, a_ld;    // A (bf16)
    uint64_t b_rows, b_cols, b_ld;    // B (bf16)
    uint64_t c_rows, c_cols, c_ld;    // C = D
    int c_f32;                        // C and D fp32 (1) or bf16 (0)
    float alpha, beta;
    const void *A, *B;
    void *C;                          // C and D
} CudaGemmCall;
// 0, or -1 for an impossible call (a non-positive size, accumulate into bf16).
int cuda_gemm_call(CudaGemmCall *c, void *y, int y_f32, int accumulate, const void *x, const void *W, int64_t T,
                   int64_t N, int64_t K);

// Launch shapes.
CudaLaunch cuda_launch_rows(int64_t rows, int64_t cols);              // one block per row (norms, gathers)
CudaLaunch cuda_launch_elementwise(int64_t n, int per_thread);        // grid-stride loops
CudaLaunch cuda_launch_attention(int64_t ntiles, int64_t T, int num_heads, int head_dim);
CudaLaunch cuda_launch_head_linear(int64_t B, int64_t N);             // one warp per output

#ifdef __cplusplus
}
#endif

#endif
