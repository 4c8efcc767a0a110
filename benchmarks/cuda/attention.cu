// attention.cu: harness for causal GQA attention over packed sequences (csrc/cuda/k_attention.cuh).
//   qkv (T, (nh + 2 nkv) * hd) bf16 (RoPE applied) -> out (T, nh * hd) bf16
// versions: 1 = one warp per (query, head), keys one at a time, fp32 (the fallback for any head_dim)
//           2 = tensor-core flash attention, 64-query tiles, online softmax (shipped for hd 16/32/64/128)
// usage: ./build/attention [version] [head_dim]
#include "common.h"
#include "k_attention.cuh"

int main(int argc, char **argv) {
    const int version = kernel_arg(argc, argv, 2);
    const int hd = argc > 2 ? atoi(argv[2]) : 128;
    const int nh = 32, nkv = 8;
    // a RewardBench-like mix plus the edge cases: 1 token, exactly one tile, one past a tile
    const int lens[] = {1, 17, 64, 65, 200, 1000, 2048, 333};
    const int B = (int)(sizeof lens / sizeof lens[0]);
    int64_t cu[sizeof lens / sizeof lens[0] + 1] = {0};
    for (int b = 0; b < B; b++) cu[b + 1] = cu[b] + lens[b];
    const int64_t T = cu[B], stride = (int64_t)(nh + 2 * nkv) * hd, QD = (int64_t)nh * hd;
    if (version == 2 && !cuda_attn_tc_supported(hd)) {
        printf("head_dim %d has no tensor-core kernel; run version 1\n", hd);
        return 1;
    }
    float *qkv = (float *)malloc(sizeof(float) * T * stride);
    bf16 *qkvb = (bf16 *)malloc(sizeof(bf16) * T * stride), *outb = (bf16 *)malloc(sizeof(bf16) * T * QD);
    fill_uniform(qkv, T * stride, 2.0f, 5);
    for (int64_t i = 0; i < T * stride; i++) qkv[i] = host_bf16_round(qkv[i]);
    to_bf16(qkvb, qkv, T * stride);
    const int heads[] = {0, 3, 4, 31};  // two query heads of KV group 0, one of group 1, the last
    const int nheads = 4;
    float *ref = (float *)calloc((size_t)(T * QD), sizeof(float)), *got = (float *)malloc(sizeof(float) * T * QD);
    attention_ref(ref, qkv, cu, B, nh, nkv, hd, heads, nheads);

    // host plan, uploaded as the backend does: positions, int32 offsets, tiles
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * T), cu32[sizeof lens / sizeof lens[0] + 1];
    for (int b = 0; b <= B; b++) cu32[b] = (int32_t)cu[b];
    for (int b = 0; b < B; b++)
        for (int64_t i = cu[b]; i < cu[b + 1]; i++) pos[i] = (int32_t)(i - cu[b]);
    const int64_t ntiles = cuda_attn_tile_count(cu, B, CUDA_ATTN_BLOCK_Q);
    CudaAttnTile *tiles = (CudaAttnTile *)malloc(sizeof(CudaAttnTile) * ntiles);
    cuda_attn_plan(cu, B, CUDA_ATTN_BLOCK_Q, tiles, ntiles);
    bf16 *dqkv = to_device(qkvb, T * stride), *dout;
    int32_t *dpos = to_device(pos, T), *dcu = to_device(cu32, B + 1);
    CudaAttnTile *dtiles = to_device(tiles, ntiles);
    CHECK(cudaMalloc(&dout, sizeof(bf16) * T * QD));
    const float scale = 1.0f / sqrtf((float)hd);
    auto run = [&](int v) {
        if (v == 1) {
            const dim3 grid((unsigned)T, nh);
            attention_warp_kernel<<<grid, 32, sizeof(float) * 2 * hd>>>(dout, dqkv, dpos, nh, nkv, hd, scale);
        } else {
            launch_attention(dout, dqkv, dcu, dpos, dtiles, ntiles, T, nh, nkv, hd, 0);
        }
    };
    int bad = 0;
    for (int v = 1; v <= 2; v++) {
        if (v == 2 && !cuda_attn_tc_supported(hd)) break;
        CHECK(cudaMemset(dout, 0xff, sizeof(bf16) * T * QD));  // NaN: an unwritten row fails the check
        run(v);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(outb, dout, sizeof(bf16) * T * QD, cudaMemcpyDeviceToHost));
        from_bf16(got, outb, T * QD);
        for (int64_t t = 0; t < T; t++)  // compare only the reference's heads
            for (int h = 0; h < nh; h++) {
                int keep = 0;
                for (int i = 0; i < nheads; i++) keep |= heads[i] == h;
                if (!keep)
                    for (int c = 0; c < hd; c++) got[t * QD + (int64_t)h * hd + c] = ref[t * QD + (int64_t)h * hd + c];
            }
        char name[64];
        snprintf(name, sizeof name, "attention v%d hd %d", v, hd);
        bad |= validate(name, got, ref, T * QD, 2e-2);  // P rounded to bf16 in v2, output rounded to bf16
    }
    double flops = 0.0;  // QK^T and PV, causal: 4 * hd * nh per (query, visible key)
    for (int b = 0; b < B; b++) flops += 4.0 * hd * nh * (double)lens[b] * (lens[b] + 1) / 2.0;
    const float ms = time_ms([&] { run(version); }, 20);
    printf("version %d: %.3f ms, %.1f TFLOP/s (T = %lld tokens, %lld tiles)\n", version, ms, flops / ms / 1e9,
           (long long)T, (long long)ntiles);
    return bad;
}
