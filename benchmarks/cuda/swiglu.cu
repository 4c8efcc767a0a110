// swiglu.cu: harness for the SwiGLU kernel (csrc/cuda/k_swiglu.cuh).
//   gu (n, 2I) bf16 = [gate | up] -> h (n, I) bf16 = silu(gate) * up
// versions: 1 = one element per thread (any I), 2 = eight per thread, 16-byte accesses (shipped for I % 8 == 0)
#include "common.h"
#include "k_swiglu.cuh"

int main(int argc, char **argv) {
    const int version = kernel_arg(argc, argv, 2);
    const int64_t n = 8192;
    const int I = 14336;
    float *gu = (float *)malloc(sizeof(float) * n * 2 * I), *ref = (float *)malloc(sizeof(float) * n * I);
    float *got = (float *)malloc(sizeof(float) * n * I);
    bf16 *gub = (bf16 *)malloc(sizeof(bf16) * n * 2 * I), *hb = (bf16 *)malloc(sizeof(bf16) * n * I);
    fill_uniform(gu, n * 2 * I, 6.0f, 3);
    for (int64_t i = 0; i < n * 2 * I; i++) gu[i] = host_bf16_round(gu[i]);
    to_bf16(gub, gu, n * 2 * I);
    swiglu_ref(ref, gu, n, I);
    bf16 *dgu = to_device(gub, n * 2 * I), *dh;
    CHECK(cudaMalloc(&dh, sizeof(bf16) * n * I));
    auto run = [&](int v) {
        const CudaLaunch l = cuda_launch_elementwise(n * I, v == 1 ? 1 : 8);
        if (v == 1) swiglu_kernel<<<l.grid_x, l.block>>>(dh, dgu, n, I);
        else swiglu_vec8_kernel<<<l.grid_x, l.block>>>(dh, dgu, n, I);
    };
    int bad = 0;
    for (int v = 1; v <= 2; v++) {
        CHECK(cudaMemset(dh, 0xff, sizeof(bf16) * n * I));
        run(v);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(hb, dh, sizeof(bf16) * n * I, cudaMemcpyDeviceToHost));
        from_bf16(got, hb, n * I);
        char name[64];
        snprintf(name, sizeof name, "swiglu v%d", v);
        bad |= validate(name, got, ref, n * I, 8e-3);
    }
    const double bytes = (double)n * I * 2 * 3;
    const float ms = time_ms([&] { run(version); }, 50);
    printf("version %d: %.3f ms, %.0f GB/s\n", version, ms, bytes / ms / 1e6);
    return bad;
}
