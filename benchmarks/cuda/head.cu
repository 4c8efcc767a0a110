// head.cu: harness for the ArmoRM head kernels (csrc/cuda/k_head.cuh): regression, gating MLP
// (Linear + ReLU x n_hidden, Linear), softmax / temperature * logit_scale, transform, score.
// One version: the head is tiny and exactness is its point (fp64 accumulation).
#include "common.h"
#include "k_head.cuh"

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    const int B = 64, H = 4096, K = 19, D = 1024, NHID = 3;
    const float temperature = 10.0f, logit_scale = 1.7f;
    float *hid = (float *)malloc(sizeof(float) * B * H), *prm = (float *)malloc(sizeof(float) * B * H);
    float *reg = (float *)malloc(sizeof(float) * K * H), *tr = (float *)malloc(sizeof(float) * K * K);
    fill_uniform(hid, B * H, 2.0f, 6);
    fill_uniform(prm, B * H, 2.0f, 7);
    fill_uniform(reg, K * H, 0.05f, 8);
    fill_uniform(tr, K * K, 0.2f, 9);
    for (int k = 0; k < K; k++) tr[k * K + k] += 1.0f;
    float *gw[NHID + 1], *gb[NHID + 1], *dgw[NHID + 1], *dgb[NHID + 1];
    for (int j = 0; j <= NHID; j++) {
        const int in = j == 0 ? H : D, od = j == NHID ? K : D;
        gw[j] = (float *)malloc(sizeof(float) * od * in);
        gb[j] = (float *)malloc(sizeof(float) * od);
        fill_uniform(gw[j], (int64_t)od * in, 2.0f / sqrtf((float)in), 10 + j);
        fill_uniform(gb[j], od, 0.1f, 20 + j);
        dgw[j] = to_device(gw[j], (int64_t)od * in);
        dgb[j] = to_device(gb[j], od);
    }
    // CPU reference (reference.h, as csrc/cpu/head.h)
    float *rw = (float *)malloc(sizeof(float) * B * K), *a = (float *)malloc(sizeof(float) * B * D);
    float *bb = (float *)malloc(sizeof(float) * B * D), *gt = (float *)malloc(sizeof(float) * B * K);
    float *sc = (float *)malloc(sizeof(float) * B);
    head_linear_ref(rw, hid, reg, NULL, B, K, H, 0);
    const float *in = prm;
    int in_dim = H;
    for (int j = 0; j <= NHID; j++) {
        const int od = j == NHID ? K : D;
        float *o = (j & 1) ? bb : a;
        head_linear_ref(o, in, gw[j], gb[j], B, od, in_dim, j < NHID);
        in = o;
        in_dim = od;
    }
    armorm_finish_ref(gt, sc, in, rw, tr, B, K, temperature, logit_scale);
    // GPU
    float *dh = to_device(hid, B * H), *dp = to_device(prm, B * H), *dreg = to_device(reg, K * H), *dtr = to_device(tr, K * K);
    float *drw, *dbuf, *dgt, *dsc;
    CHECK(cudaMalloc(&drw, sizeof(float) * B * K));
    CHECK(cudaMalloc(&dbuf, sizeof(float) * 2 * B * D));
    CHECK(cudaMalloc(&dgt, sizeof(float) * B * K));
    CHECK(cudaMalloc(&dsc, sizeof(float) * B));
    auto run = [&]() {
        launch_head_linear(drw, dh, dreg, NULL, B, K, H, 0, 0);
        const float *din = dp;
        int dim = H;
        for (int j = 0; j <= NHID; j++) {
            const int od = j == NHID ? K : D;
            float *o = dbuf + (int64_t)(j & 1) * B * D;
            launch_head_linear(o, din, dgw[j], dgb[j], B, od, dim, j < NHID, 0);
            din = o;
            dim = od;
        }
        launch_armorm_finish(dgt, dsc, din, drw, dtr, B, K, temperature, logit_scale, 0);
    };
    run();
    CHECK(cudaGetLastError());
    float *got = (float *)malloc(sizeof(float) * B * K);
    int bad = 0;
    CHECK(cudaMemcpy(got, drw, sizeof(float) * B * K, cudaMemcpyDeviceToHost));
    bad |= validate("rewards", got, rw, B * K, 1e-6);
    CHECK(cudaMemcpy(got, dgt, sizeof(float) * B * K, cudaMemcpyDeviceToHost));
    bad |= validate("gating_output", got, gt, B * K, 1e-6);
    CHECK(cudaMemcpy(got, dsc, sizeof(float) * B, cudaMemcpyDeviceToHost));
    bad |= validate("score", got, sc, B, 1e-6);
    const float ms = time_ms(run, 50);
    printf("head for %d sequences: %.3f ms\n", B, ms);
    return bad;
}
