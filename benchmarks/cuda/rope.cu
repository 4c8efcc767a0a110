// rope.cu: harness for rotary embeddings (csrc/cuda/k_rope.cuh), HF rotate-half layout,
// in place on the fused (T, (nh + 2 nkv) * hd) q|k|v projection output.
// versions: 1 = one thread per (token, head, frequency), sin/cos recomputed per head,
//           2 = one block per token, a thread per frequency walking the heads (shipped)
#include "common.h"
#include "k_rope.cuh"

static __global__ void rope_naive_kernel(bf16 *qkv, const int32_t *pos, const float *inv_freq, int64_t T, int nrot,
                                        int hd, int64_t stride) {
    const int half = hd / 2;
    const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, n = T * nrot * half;
    if (idx >= n) return;
    const int64_t t = idx / (nrot * half);
    const int h = (int)(idx / half % nrot), i = (int)(idx % half);
    float s, c;
    sincosf((float)pos[t] * inv_freq[i], &s, &c);
    bf16 *v = qkv + t * stride + (int64_t)h * hd;
    const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
    v[i] = __float2bfloat16_rn(a * c - b * s);
    v[i + half] = __float2bfloat16_rn(b * c + a * s);
}

int main(int argc, char **argv) {
    const int version = kernel_arg(argc, argv, 2);
    const int nh = 32, nkv = 8, hd = 128, half = hd / 2;
    const int lens[4] = {8000, 100, 1, 91};
    int64_t T = 0;
    for (int i = 0; i < 4; i++) T += lens[i];
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd;
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * T);
    for (int i = 0, t = 0; i < 4; i++)
        for (int p = 0; p < lens[i]; p++) pos[t++] = p;
    float inv_freq[64];
    for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(500000.0f, (float)(2 * i) / (float)hd);
    float *x = (float *)malloc(sizeof(float) * T * stride), *ref = (float *)malloc(sizeof(float) * T * stride);
    float *got = (float *)malloc(sizeof(float) * T * stride);
    bf16 *xb = (bf16 *)malloc(sizeof(bf16) * T * stride);
    fill_uniform(x, T * stride, 2.0f, 4);
    for (int64_t i = 0; i < T * stride; i++) x[i] = host_bf16_round(x[i]);
    to_bf16(xb, x, T * stride);
    memcpy(ref, x, sizeof(float) * T * stride);
    rope_ref(ref, pos, inv_freq, T, nh, nkv, hd);  // the CPU backend's rope (csrc/cpu/rope.h)
    bf16 *d = to_device(xb, T * stride);
    int32_t *dpos = to_device(pos, T);
    float *dfreq = to_device(inv_freq, half);
    auto run = [&](int v) {
        if (v == 1) {
            const int64_t n = T * (nh + nkv) * half;
            rope_naive_kernel<<<(unsigned)((n + 255) / 256), 256>>>(d, dpos, dfreq, T, nh + nkv, hd, stride);
        } else {
            launch_rope(d, dpos, dfreq, T, nh, nkv, hd, 0);
        }
    };
    int bad = 0;
    for (int v = 1; v <= 2; v++) {
        CHECK(cudaMemcpy(d, xb, sizeof(bf16) * T * stride, cudaMemcpyHostToDevice));
        run(v);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(xb, d, sizeof(bf16) * T * stride, cudaMemcpyDeviceToHost));
        from_bf16(got, xb, T * stride);
        to_bf16(xb, x, T * stride);  // restore the input for the next version
        char name[64];
        snprintf(name, sizeof name, "rope v%d", v);
        bad |= validate(name, got, ref, T * stride, 8e-3);
    }
    const double bytes = (double)T * (nh + nkv) * hd * 2 * 2;
    const float ms = time_ms([&] { run(version); }, 50);  // repeated rotation: timing only
    printf("version %d: %.3f ms, %.0f GB/s\n", version, ms, bytes / ms / 1e6);
    return bad;
}
