// common.cuh: error checking and small helpers shared by the CUDA backend.
//
// Every CUDA runtime and cuBLASLt call goes through CU_CHECK / LT_CHECK: on
// failure they record the call's text, file:line and the library's own error
// name and message into the ArmError `e` that must be in scope (with the
// core's arm_fail, model.h), then return -1 from the enclosing function.
// Nothing here aborts or prints.
#ifndef ARMORM_CUDA_COMMON_CUH
#define ARMORM_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "backend_cuda.h"
#include "k_common.cuh"  // bf16

// The path after the last '/', so messages name files briefly.
static inline const char *cu_basename(const char *p) {
    const char *s = p;
    for (; *p; p++)
        if (*p == '/') s = p + 1;
    return s;
}

#define CU_CHECK(call)                                                                                     \
    do {                                                                                                   \
        cudaError_t cu_err_ = (call);                                                                      \
        if (cu_err_ != cudaSuccess) {                                                                      \
            cudaGetLastError(); /* clear a non-sticky error so the next call is not blamed for it */       \
            return arm_fail(e, "CUDA error: %s failed at %s:%d: %s (%s)", #call, cu_basename(__FILE__),    \
                            __LINE__, cudaGetErrorString(cu_err_), cudaGetErrorName(cu_err_));             \
        }                                                                                                  \
    } while (0)

#define LT_CHECK(call)                                                                                     \
    do {                                                                                                   \
        cublasStatus_t lt_st_ = (call);                                                                    \
        if (lt_st_ != CUBLAS_STATUS_SUCCESS)                                                               \
            return arm_fail(e, "cuBLAS error: %s failed at %s:%d: %s (%s)", #call, cu_basename(__FILE__),  \
                            __LINE__, cublasLtGetStatusString(lt_st_), cublasLtGetStatusName(lt_st_));     \
    } while (0)

// After a kernel launch: launch-configuration errors surface here, faults
// inside a kernel at the next synchronising call (which is checked too).
#define CU_CHECK_LAUNCH(name)                                                                              \
    do {                                                                                                   \
        cudaError_t cu_err_ = cudaGetLastError();                                                          \
        if (cu_err_ != cudaSuccess)                                                                        \
            return arm_fail(e, "CUDA error: launch of kernel %s failed at %s:%d: %s (%s)", name,           \
                            cu_basename(__FILE__), __LINE__, cudaGetErrorString(cu_err_),                  \
                            cudaGetErrorName(cu_err_));                                                    \
    } while (0)

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#endif
