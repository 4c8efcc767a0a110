// rmsnorm.cu: harness for the RMSNorm kernel (csrc/cuda/k_rmsnorm.cuh).
//   out (T, H) bf16 = w * x / sqrt(mean(x^2) + eps), x (T, H) f32 residual stream
// versions: 1 = one thread per row (naive), 2 = block per row, scalar loads,
//           3 = block per row, float4 loads (shipped: launch_rmsnorm picks it when H % 4 == 0)
// build: make rmsnorm   run: ./build/rmsnorm [version]
#include "common.h"
#include "k_rmsnorm.cuh"

// version 1: one thread walks a whole row
static __global__ void rmsnorm_naive_kernel(bf16 *out, const float *x, const float *w, int64_t T, int H, float eps) {
    const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= T) return;
    const float *xr = x + r * H;
    float ss = 0.0f;
    for (int i = 0; i < H; i++) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(ss / H + eps);
    for (int i = 0; i < H; i++) out[r * H + i] = __float2bfloat16_rn(w[i] * (xr[i] * inv));
}

static void run(int version, bf16 *out, const float *x, const float *w, int64_t T, int H, float eps) {
    if (version == 1) {
        rmsnorm_naive_kernel<<<(unsigned)((T + 127) / 128), 128>>>(out, x, w, T, H, eps);
    } else if (version == 2) {
        const CudaLaunch l = cuda_launch_rows(T, H);
        rmsnorm_kernel<bf16><<<l.grid_x, l.block>>>(out, x, w, NULL, H, eps);
    } else {
        launch_rmsnorm<bf16>(out, x, w, NULL, T, H, eps, 0);
    }
}

int main(int argc, char **argv) {
    const int version = kernel_arg(argc, argv, 3);
    const int64_t T = 8192;
    const int H = 4096;
    const float eps = 1e-5f;
    float *x = (float *)malloc(sizeof(float) * T * H), *w = (float *)malloc(sizeof(float) * H);
    float *ref = (float *)malloc(sizeof(float) * T * H), *got = (float *)malloc(sizeof(float) * T * H);
    bf16 *gotb = (bf16 *)malloc(sizeof(bf16) * T * H);
    fill_uniform(x, T * H, 3.0f, 1);
    fill_uniform(w, H, 1.0f, 2);
    for (int i = 0; i < H; i++) w[i] += 1.0f;
    rmsnorm_ref(ref, x, w, NULL, T, H, eps);
    float *dx = to_device(x, T * H), *dw = to_device(w, H);
    bf16 *dout;
    CHECK(cudaMalloc(&dout, sizeof(bf16) * T * H));
    int bad = 0;
    for (int v = 1; v <= 3; v++) {
        CHECK(cudaMemset(dout, 0xff, sizeof(bf16) * T * H));
        run(v, dout, dx, dw, T, H, eps);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(gotb, dout, sizeof(bf16) * T * H, cudaMemcpyDeviceToHost));
        from_bf16(got, gotb, T * H);
        char name[64];
        snprintf(name, sizeof name, "rmsnorm v%d (bf16 out)", v);
        bad |= validate(name, got, ref, T * H, 8e-3);  // one bf16 rounding: 2^-8 relative
    }
    // the head's variant: f32 output at gathered rows
    const int64_t R = 37;
    int32_t rows[37];
    for (int r = 0; r < R; r++) rows[r] = (int32_t)((r * 2654435761u) % (uint32_t)T);
    float *dof, *ref_rows = (float *)malloc(sizeof(float) * R * H);
    int32_t *drows = to_device(rows, R);
    CHECK(cudaMalloc(&dof, sizeof(float) * R * H));
    launch_rmsnorm<float>(dof, dx, dw, drows, R, H, eps, 0);
    CHECK(cudaMemcpy(got, dof, sizeof(float) * R * H, cudaMemcpyDeviceToHost));
    rmsnorm_ref(ref_rows, x, w, rows, R, H, eps);
    bad |= validate("rmsnorm rows (f32 out)", got, ref_rows, R * H, 1e-5);

    const double bytes = (double)T * H * (4 + 2);
    const float ms = time_ms([&] { run(version, dout, dx, dw, T, H, eps); }, 50);
    printf("version %d: %.3f ms, %.0f GB/s\n", version, ms, bytes / ms / 1e6);
    return bad;
}
