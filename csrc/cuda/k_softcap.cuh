// k_softcap.cuh: attention logit soft-capping, s = cap * tanh(s / cap), the
// CUDA twin of csrc/cpu/softcap.h (Gemma-2: cap = attn_logit_softcapping).
// Divide, tanh, multiply in fp32, in the reference's order; applied to the
// scaled scores before the mask and the running max (k_attention.cuh).
#ifndef ARMORM_CUDA_K_SOFTCAP_CUH
#define ARMORM_CUDA_K_SOFTCAP_CUH

static __device__ __forceinline__ float softcap(float s, float cap) { return tanhf(s / cap) * cap; }

#endif
