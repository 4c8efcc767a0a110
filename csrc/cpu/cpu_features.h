// cpu_features.h: which matmul kernel paths this CPU can run, and the choice.
//
// One portable binary carries every path; the choice is made once, at model
// load (ARMORM_KERNEL or the best the CPU supports), and stored in the Model,
// so nothing here is global mutable state: these functions only query CPUID.
#ifndef ARMORM_CPU_FEATURES_H
#define ARMORM_CPU_FEATURES_H

#include <stddef.h>

typedef enum {
    ARM_KERNEL_PORTABLE = 0,    // plain C (compiler-vectorised clones)
    ARM_KERNEL_AVX2 = 1,        // AVX2 + FMA (+F16C), fp32 arithmetic
    ARM_KERNEL_AVX512 = 2,      // AVX-512 F/BW/VL, fp32 arithmetic
    ARM_KERNEL_AVX512BF16 = 3,  // as AVX512, plus vdpbf16ps for bf16 weights
} ArmKernel;

#define ARM_KERNEL_COUNT 4

// 1 when this CPU (and OS: register state enabled) can run path k.
int arm_kernel_supported(ArmKernel k);
// The best path this CPU supports.
ArmKernel arm_kernel_best(void);
// "portable", "avx2", "avx512", "avx512bf16".
const char *arm_kernel_name(ArmKernel k);
// Resolves a requested path name (NULL, "" or "auto": the best supported).
// Returns 0, or -1 with a message in err when the name is unknown or the CPU
// lacks the instructions the path needs.
int arm_kernel_resolve(const char *request, ArmKernel *out, char *err, size_t errlen);

#endif
