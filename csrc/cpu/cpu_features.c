// cpu_features.c: run-time CPU feature detection for the matmul dispatch.
//
// Why: the extension is built once without -march flags and must run on any
// x86-64; the fast kernels (matmul_avx512.c, matmul_avx2.c) are compiled with
// per-function target attributes and may only be called when CPUID (and the
// OS's XSAVE state, which GCC's __builtin_cpu_supports checks) says so.
// AVX512_BF16 is read straight from CPUID leaf 7 subleaf 1, EAX bit 5, since
// older compilers' __builtin_cpu_supports do not know it.
#include "cpu_features.h"

#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define ARM_X86 1
#endif

static const char *const kernel_names[ARM_KERNEL_COUNT] = {"portable", "avx2", "avx512", "avx512bf16"};

const char *arm_kernel_name(ArmKernel k) {
    return (unsigned)k < ARM_KERNEL_COUNT ? kernel_names[k] : "unknown";
}

#ifdef ARM_X86
static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static int has_f16c(void);

static int has_avx512(void) {
    __builtin_cpu_init();
    return has_avx2() && has_f16c() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

static int has_avx512bf16(void) {
    if (!has_avx512()) return 0;  // also proves the OS saves the zmm state
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 1, a, b, c, d);
    return (a >> 5) & 1u;
}

static int has_f16c(void) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1u;
}
#endif

int arm_kernel_supported(ArmKernel k) {
    switch (k) {
        case ARM_KERNEL_PORTABLE: return 1;
#ifdef ARM_X86
        case ARM_KERNEL_AVX2: return has_avx2() && has_f16c();
        case ARM_KERNEL_AVX512: return has_avx512();
        case ARM_KERNEL_AVX512BF16: return has_avx512bf16();
#endif
        default: return 0;
    }
}

ArmKernel arm_kernel_best(void) {
    for (int k = ARM_KERNEL_COUNT - 1; k > 0; k--)
        if (arm_kernel_supported((ArmKernel)k)) return (ArmKernel)k;
    return ARM_KERNEL_PORTABLE;
}

int arm_kernel_resolve(const char *request, ArmKernel *out, char *err, size_t errlen) {
    if (!request || !*request || !strcmp(request, "auto")) {
        *out = arm_kernel_best();
        return 0;
    }
    for (int k = 0; k < ARM_KERNEL_COUNT; k++) {
        if (strcmp(request, kernel_names[k]) != 0) continue;
        if (!arm_kernel_supported((ArmKernel)k)) {
            char avail[96] = "";
            for (int j = 0; j < ARM_KERNEL_COUNT; j++)
                if (arm_kernel_supported((ArmKernel)j)) {
                    if (*avail) strncat(avail, ", ", sizeof avail - strlen(avail) - 1);
                    strncat(avail, kernel_names[j], sizeof avail - strlen(avail) - 1);
                }
            snprintf(err, errlen, "ARMORM_KERNEL=%s: this CPU lacks the instructions that path needs "
                     "(paths this CPU can run: %s)", request, avail);
            return -1;
        }
        *out = (ArmKernel)k;
        return 0;
    }
    snprintf(err, errlen, "ARMORM_KERNEL=%.64s is not a kernel path; use auto, portable, avx2, avx512 or avx512bf16",
             request);
    return -1;
}
