// rope.h: rotary position embedding, Hugging Face "rotate half" layout.
// For each head, pairs (i, i + hd/2) rotate by angle pos * inv_freq[i]; the
// angle is an fp32 product as in the reference, cos/sin evaluated in fp32.
#ifndef ARMORM_CPU_ROPE_H
#define ARMORM_CPU_ROPE_H

#include <math.h>
#include <stdint.h>

// x is (T, nheads*hd); pos is (T) position of each token within its sequence
static void rope(float *x, const int32_t *pos, const float *inv_freq, int64_t T, int nheads, int hd,
                 int nthreads) {
    const int half = hd / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = x + t * (int64_t)nheads * hd;
        for (int i = 0; i < half; i++) {
            float ang = (float)pos[t] * inv_freq[i];
            float c = cosf(ang), s = sinf(ang);
            for (int h = 0; h < nheads; h++) {
                float *v = row + (int64_t)h * hd;
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

#endif
