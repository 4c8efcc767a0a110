// head.h: the reward heads on top of the backbone, for one sequence.
//
// ArmoRM (docs/model.md, 'ArmoRM head'):
//   rewards       (K) = W_reg (K,H) @ hidden_state (H)
//   gating logits (K) = MLP(prompt_embedding): n_hidden x (Linear, ReLU), Linear
//   gating_output (K) = softmax(logits / temperature) * logit_scale
//   score             = sum_k gating_output[k] * (rewards @ T)[k]
// SequenceClassification: logits (num_labels) = W_score @ hidden_state.
// Dot products accumulate in double: the head is tiny and this keeps it exact
// to fp32 rounding.
#ifndef ARMORM_CPU_HEAD_H
#define ARMORM_CPU_HEAD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "../model.h"

static void linear_f32(float *out, const float *W, const float *bias, const float *x, int64_t N, int64_t K,
                       int relu) {
    for (int64_t n = 0; n < N; n++) {
        double s = bias ? bias[n] : 0.0;
        const float *w = W + n * K;
        for (int64_t k = 0; k < K; k++) s += (double)w[k] * x[k];
        float v = (float)s;
        out[n] = relu && v < 0.0f ? 0.0f : v;
    }
}

// scratch holds 2 * max(D, K) floats.
static void armorm_head(const Model *m, const float *hidden, const float *prompt, float *rewards,
                        float *gating, float *score, float *scratch) {
    const Config *c = &m->cfg;
    const int64_t H = c->hidden_size, K = c->num_objectives, D = c->gating_hidden_dim;
    const int64_t wmax = D > K ? D : K;
    linear_f32(rewards, m->w.regression, NULL, hidden, K, H, 0);
    float *a = scratch, *b = scratch + wmax;
    const float *in = prompt;
    int64_t in_dim = H;
    for (int j = 0; j <= c->gating_n_hidden; j++) {
        const int last = j == c->gating_n_hidden;
        const int64_t od = last ? K : D;
        linear_f32(a, m->w.gate_w[j], m->w.gate_b[j], in, od, in_dim, !last);
        in = a;
        in_dim = od;
        float *t = a; a = b; b = t;
    }
    // `in` holds the K logits
    double mx = -INFINITY;
    for (int64_t k = 0; k < K; k++) mx = in[k] / c->gating_temperature > mx ? in[k] / c->gating_temperature : mx;
    double z = 0.0;
    for (int64_t k = 0; k < K; k++) z += exp(in[k] / c->gating_temperature - mx);
    for (int64_t k = 0; k < K; k++)
        gating[k] = (float)(exp(in[k] / c->gating_temperature - mx) / z * m->w.logit_scale);
    double s = 0.0;
    for (int64_t j = 0; j < K; j++) {
        double adj = 0.0;  // (rewards @ T)[j]
        for (int64_t k = 0; k < K; k++) adj += (double)rewards[k] * m->w.transform[k * K + j];
        s += (double)gating[j] * adj;
    }
    *score = (float)s;
}

static void seqcls_head(const Model *m, const float *hidden, float *logits) {
    linear_f32(logits, m->w.score, NULL, hidden, m->cfg.num_labels, m->cfg.hidden_size, 0);
}

#endif
