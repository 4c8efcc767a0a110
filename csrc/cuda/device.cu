// device.cu: device discovery.
//
// cudaGetDeviceCount is the first CUDA call a process makes here; without a
// driver (or with one too old for this runtime) it returns an error code,
// never crashes, and we report 0 devices. Nothing in this file allocates.
#include "common.cuh"

#include <stdio.h>

// The runtime's reason for a failed cudaGetDeviceCount, or NULL when it worked.
static const char *count_error(int *n) {
    *n = 0;
    cudaError_t err = cudaGetDeviceCount(n);
    if (err != cudaSuccess) {
        cudaGetLastError();  // leave no error pending for the caller's next CUDA call
        *n = 0;
        return cudaGetErrorString(err);
    }
    return NULL;
}

extern "C" int cuda_device_count(void) {
    int n;
    count_error(&n);
    return n;
}

extern "C" int cuda_device_describe(int device, char *buf, size_t len) {
    int n;
    const char *why = count_error(&n);
    if (why) {
        snprintf(buf, len, "no CUDA device is available (cudaGetDeviceCount: %s)", why);
        return -1;
    }
    if (device < 0 || device >= n) {
        snprintf(buf, len, "cuda:%d does not exist: this machine has %d CUDA device%s", device, n, n == 1 ? "" : "s");
        return -1;
    }
    cudaDeviceProp p;
    cudaError_t err = cudaGetDeviceProperties(&p, device);
    if (err != cudaSuccess) {
        cudaGetLastError();
        snprintf(buf, len, "cuda:%d: cudaGetDeviceProperties failed: %s", device, cudaGetErrorString(err));
        return -1;
    }
    // The build carries sm_90 machine code and compute_90 PTX: PTX runs only on
    // its own architecture or newer, so older GPUs cannot load the kernels.
    const int ok = p.major >= 9;
    snprintf(buf, len, "%s, sm_%d%d, %.1f GiB%s", p.name, p.major, p.minor,
             (double)p.totalGlobalMem / (double)(1LL << 30),
             ok ? "" : " (this armorm build needs compute capability 9.0 or newer)");
    return ok ? 0 : -1;
}
