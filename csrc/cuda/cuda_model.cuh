// cuda_model.cuh: the CudaModel struct (backend_cuda.h), shared by the two
// files that use its inside: model_cuda.cu (create, upload, buffers, free) and
// forward_cuda.cu (the forward pass).
#ifndef ARMORM_CUDA_MODEL_CUH
#define ARMORM_CUDA_MODEL_CUH

#include <pthread.h>

#include "common.cuh"
#include "gemm.cuh"

struct CudaModel {
    int device;
    pthread_mutex_t lock;     // one forward at a time: the activation buffers are shared
    int lock_ok;
    cudaStream_t stream;
    Gemm gemm;
    int gemm_ok;
    Config cfg;               // the config uploaded, to refuse a different Model later
    float logit_scale;
    CudaWeightLayout wl;
    char *weights;            // device, wl.total bytes
    void *lt_ws;              // device, CUDA_LT_WORKSPACE bytes
    CudaActLayout al;
    char *act;                // device, al.total bytes
    int64_t batch_dev_cap, batch_host_cap;
    char *batch_dev;          // device: upload | results | head scratch
    char *batch_host;         // pinned: upload | results
};

// Grows the activation buffers to hold T tokens (no-op when they do).
int cuda_ensure_activations(CudaModel *cm, int64_t T, ArmError *e);
// Grows the per-batch device and pinned host buffers to the layout's sizes.
int cuda_ensure_batch(CudaModel *cm, const CudaBatchLayout *bl, ArmError *e);

#endif
