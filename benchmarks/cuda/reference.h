// reference.h: the CPU reference of every kernel in csrc/cuda/k_*.cuh.
//
// One definition serves the GPU harnesses in this folder and the CPU emulation
// of the kernels (tests/cuda_emu). Inputs and outputs are fp32 arrays holding
// the values the kernel reads (bf16 inputs already rounded with
// host_bf16_round); accumulation is in double unless the kernel's own rounding
// is the point. Plain host C++: no CUDA header.
#ifndef ARMORM_BENCH_CUDA_REFERENCE_H
#define ARMORM_BENCH_CUDA_REFERENCE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"

// Causal GQA attention over packed sequences (k_attention.cuh): exact softmax per
// row in double. qkv (T, (nh + 2 nkv) * hd); out (T, nh * hd); only the query heads
// listed in `heads` (all when heads is NULL) are written.
static void attention_ref(float *out, const float *qkv, const int64_t *cu, int B, int nh, int nkv, int hd,
                          const int *heads, int nheads) {
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd, QD = (int64_t)nh * hd;
    const double scale = 1.0 / sqrt((double)hd);
    int64_t maxlen = 1;
    for (int b = 0; b < B; b++)
        if (cu[b + 1] - cu[b] > maxlen) maxlen = cu[b + 1] - cu[b];
    double *p = (double *)malloc(sizeof(double) * (size_t)maxlen);
    const int nsel = heads ? nheads : nh;
    for (int b = 0; b < B; b++)
        for (int hi = 0; hi < nsel; hi++) {
            const int h = heads ? heads[hi] : hi, kvh = h / (nh / nkv);
            for (int64_t i = cu[b]; i < cu[b + 1]; i++) {
                const float *q = qkv + i * stride + (int64_t)h * hd;
                double mx = -INFINITY, z = 0.0;
                for (int64_t j = cu[b]; j <= i; j++) {
                    const float *k = qkv + j * stride + (int64_t)(nh + kvh) * hd;
                    double d = 0.0;
                    for (int c = 0; c < hd; c++) d += (double)q[c] * k[c];
                    p[j - cu[b]] = d * scale;
                    if (p[j - cu[b]] > mx) mx = p[j - cu[b]];
                }
                for (int64_t j = cu[b]; j <= i; j++) z += (p[j - cu[b]] = exp(p[j - cu[b]] - mx));
                for (int c = 0; c < hd; c++) {
                    double acc = 0.0;
                    for (int64_t j = cu[b]; j <= i; j++)
                        acc += p[j - cu[b]] * qkv[j * stride + (int64_t)(nh + nkv + kvh) * hd + c];
                    out[i * QD + (int64_t)h * hd + c] = (float)(acc / z);
                }
            }
        }
    free(p);
}

// RMSNorm (k_rmsnorm.cuh): out (R, H) = w * x[row] / sqrt(mean(x[row]^2) + eps);
// row r reads x row rows[r] (r itself when rows is NULL).
static void rmsnorm_ref(float *out, const float *x, const float *w, const int32_t *rows, int64_t R, int H,
                        float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + (int64_t)(rows ? rows[r] : r) * H;
        double ss = 0.0;
        for (int i = 0; i < H; i++) ss += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(ss / H + eps));
        for (int i = 0; i < H; i++) out[r * H + i] = w[i] * (xr[i] * inv);
    }
}

// Rotate-half RoPE (k_rope.cuh), in place on the nh query and nkv key heads of
// qkv (T, (nh + 2 nkv) * hd), as the CPU backend's rope: fp32 angle, cos and sin.
static void rope_ref(float *qkv, const int32_t *pos, const float *inv_freq, int64_t T, int nh, int nkv, int hd) {
    const int half = hd / 2;
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd;
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            const float ang = (float)pos[t] * inv_freq[i], c = cosf(ang), s = sinf(ang);
            for (int h = 0; h < nh + nkv; h++) {
                float *v = qkv + t * stride + (int64_t)h * hd;
                const float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
}

// SwiGLU (k_swiglu.cuh): h (n, I) = silu(gate) * up, gu (n, 2I) = [gate | up].
static void swiglu_ref(float *h, const float *gu, int64_t n, int I) {
    for (int64_t t = 0; t < n; t++)
        for (int i = 0; i < I; i++) {
            const double g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
            h[t * I + i] = (float)(g / (1.0 + exp(-g)) * u);
        }
}

// Head linear (k_head.cuh): out (B, N) = x (B, K) @ W^T + bias, W (N, K), optional ReLU.
static void head_linear_ref(float *out, const float *x, const float *W, const float *bias, int B, int N, int K,
                            int relu) {
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            double s = bias ? bias[n] : 0.0;
            for (int k = 0; k < K; k++) s += (double)W[(int64_t)n * K + k] * x[(int64_t)b * K + k];
            const float v = (float)s;
            out[(int64_t)b * N + n] = relu && v < 0.0f ? 0.0f : v;
        }
}

// ArmoRM finish (k_head.cuh): gating (B, K) = softmax(logits / temperature) * logit_scale,
// score (B) = sum_j gating[j] * (rewards @ transform)[j].
static void armorm_finish_ref(float *gating, float *score, const float *logits, const float *rewards,
                              const float *transform, int B, int K, float temperature, float logit_scale) {
    for (int b = 0; b < B; b++) {
        const float *z = logits + (int64_t)b * K, *r = rewards + (int64_t)b * K;
        double mx = -INFINITY, zs = 0.0, s = 0.0;
        for (int k = 0; k < K; k++) mx = fmax(mx, (double)(z[k] / temperature));
        for (int k = 0; k < K; k++) zs += exp((double)(z[k] / temperature) - mx);
        for (int k = 0; k < K; k++) gating[(int64_t)b * K + k] = (float)(exp((double)(z[k] / temperature) - mx) / zs * logit_scale);
        for (int j = 0; j < K; j++) {
            double adj = 0.0;
            for (int k = 0; k < K; k++) adj += (double)r[k] * transform[(int64_t)k * K + j];
            s += (double)gating[(int64_t)b * K + j] * adj;
        }
        score[b] = (float)s;
    }
}

// score (B) = logits (B, NL)[:, 0] (k_head.cuh, SequenceClassification).
static void first_column_ref(float *score, const float *logits, int B, int NL) {
    for (int b = 0; b < B; b++) score[b] = logits[(int64_t)b * NL];
}

// Embedding gather (k_embedding.cuh): x (T, H) = emb rows at the token ids.
static void embedding_ref(float *x, const int32_t *tokens, const float *emb, int64_t T, int H) {
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < H; i++) x[t * H + i] = emb[(int64_t)tokens[t] * H + i];
}

// Bias add (k_convert.cuh): y (T, N) += bias, rounded to bf16 when y is a bf16 tensor.
static void add_bias_ref(float *y, const float *bias, int64_t T, int N, int bf16_out) {
    for (int64_t i = 0; i < T * N; i++) {
        const float v = y[i] + bias[i % N];
        y[i] = bf16_out ? host_bf16_round(v) : v;
    }
}

// Weight conversion (k_convert.cuh): the source values (already decoded to fp32) rounded to bf16.
static void to_bf16_ref(float *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = host_bf16_round(src[i]);
}

#endif
