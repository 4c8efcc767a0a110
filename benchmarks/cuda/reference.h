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
#include "prefix.h"

// Causal GQA attention over packed sequences (k_attention.cuh): exact softmax per
// row in double. qkv (T, (nh + 2 nkv) * hd); out (T, nh * hd); only the query heads
// listed in `heads` (all when heads is NULL) are written. Scores are (q . k) * scale,
// then softcap * tanh(s / softcap) when softcap > 0; query i sees keys j <= i, and
// only j > i - window when window > 0 (a layer's AttnParams). scale 0: 1/sqrt(hd).
// A sequence may continue an earlier one (csrc/prefix.h): off/parent (NULL: none
// does) give each sequence's offset and parent; positions count in its full
// sequence, whose keys its queries see.
static void attention_ref(float *out, const float *qkv, const int64_t *cu, const int64_t *off,
                          const int32_t *parent, int B, int nh, int nkv, int hd, const int *heads, int nheads,
                          double scale = 0.0, double softcap = 0.0, int64_t window = 0) {
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd, QD = (int64_t)nh * hd;
    if (scale == 0.0) scale = 1.0 / sqrt((double)hd);
    int64_t maxlen = 1;
    for (int b = 0; b < B; b++) {
        const int64_t full = (off ? off[b] : 0) + cu[b + 1] - cu[b];
        if (full > maxlen) maxlen = full;
    }
    int64_t *zeros = (int64_t *)calloc(B > 0 ? (size_t)B : 1, sizeof(int64_t));  // offsets when off is NULL
    const SeqIndex ix = {cu, off ? off : zeros, off ? parent : NULL};
    double *p = (double *)malloc(sizeof(double) * (size_t)maxlen);
    int64_t *row = (int64_t *)malloc(sizeof(int64_t) * (size_t)maxlen);  // packed row of each position
    const int nsel = heads ? nheads : nh;
    for (int b = 0; b < B; b++) {
        const int64_t first = ix.off[b], full = first + cu[b + 1] - cu[b];
        seq_rows(row, &ix, b, 0, full);
        for (int hi = 0; hi < nsel; hi++) {
            const int h = heads ? heads[hi] : hi, kvh = h / (nh / nkv);
            for (int64_t i = first; i < full; i++) {  // query position i, packed row row[i]
                const float *q = qkv + row[i] * stride + (int64_t)h * hd;
                const int64_t j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
                double mx = -INFINITY, z = 0.0;
                for (int64_t j = j0; j <= i; j++) {
                    const float *k = qkv + row[j] * stride + (int64_t)(nh + kvh) * hd;
                    double d = 0.0;
                    for (int c = 0; c < hd; c++) d += (double)q[c] * k[c];
                    d *= scale;
                    if (softcap > 0.0) d = softcap * tanh(d / softcap);
                    p[j] = d;
                    if (p[j] > mx) mx = p[j];
                }
                for (int64_t j = j0; j <= i; j++) z += (p[j] = exp(p[j] - mx));
                for (int c = 0; c < hd; c++) {
                    double acc = 0.0;
                    for (int64_t j = j0; j <= i; j++)
                        acc += p[j] * qkv[row[j] * stride + (int64_t)(nh + nkv + kvh) * hd + c];
                    out[row[i] * QD + (int64_t)h * hd + c] = (float)(acc / z);
                }
            }
        }
    }
    free(row);
    free(p);
    free(zeros);
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

// Post-norm residual add (k_rmsnorm.cuh rmsnorm_add): x (R, H) += w * y / sqrt(mean(y^2) + eps).
static void rmsnorm_add_ref(float *x, const float *y, const float *w, int64_t R, int H, float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float *yr = y + r * H;
        double ss = 0.0;
        for (int i = 0; i < H; i++) ss += (double)yr[i] * yr[i];
        const double inv = 1.0 / sqrt(ss / H + eps);
        for (int i = 0; i < H; i++) x[r * H + i] = (float)(x[r * H + i] + (double)w[i] * yr[i] * inv);
    }
}

// Per-head RMSNorm of q and k in place (k_rmsnorm.cuh head_rmsnorm): heads h < nh of
// qkv (T, (nh + 2 nkv) * hd) scale by wq, the nkv key heads after them by wk.
static void head_rmsnorm_ref(float *qkv, const float *wq, const float *wk, int64_t T, int nh, int nkv, int hd,
                             float eps) {
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh + nkv; h++) {
            float *v = qkv + t * (int64_t)(nh + 2 * nkv) * hd + (int64_t)h * hd;
            const float *w = h < nh ? wq : wk;
            double ss = 0.0;
            for (int d = 0; d < hd; d++) ss += (double)v[d] * v[d];
            const double inv = 1.0 / sqrt(ss / hd + eps);
            for (int d = 0; d < hd; d++) v[d] = (float)((double)w[d] * v[d] * inv);
        }
}

// Gated activation (k_glu.cuh): h (n, I) = act(gate) * up, gu (n, 2I) = [gate | up]; act 0: SiLU
// g / (1 + e^-g), act 1: tanh GELU by the reference's formula 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
static void glu_ref(float *h, const float *gu, int64_t n, int I, int act) {
    for (int64_t t = 0; t < n; t++)
        for (int i = 0; i < I; i++) {
            const double g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
            const double a = act == 1 ? 0.5 * g * (1.0 + tanh(sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g)))
                                      : g / (1.0 + exp(-g));
            h[t * I + i] = (float)(a * u);
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

// Embedding gather (k_embedding.cuh): x (T, H) = emb rows at the token ids, times scale.
static void embedding_ref(float *x, const int32_t *tokens, const float *emb, int64_t T, int H, float scale = 1.0f) {
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < H; i++) x[t * H + i] = emb[(int64_t)tokens[t] * H + i] * scale;
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
