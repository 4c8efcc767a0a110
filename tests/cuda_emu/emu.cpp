// emu.cpp: the emulated machine behind emu.h: the block scheduler (one fiber
// per CUDA thread), barriers, warp collectives, and the tensor-core and
// ldmatrix instructions rebuilt from the PTX ISA's fragment layouts.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type" and "ldmatrix"), with g = laneid >> 2 and t = laneid % 4:
//   A (16x16, row): 4 .b32 registers holding a0..a7, low half first;
//       ai at row g for i in {0,1,4,5}, g + 8 otherwise; column 2t + (i & 1), + 8 for i >= 4.
//   B (16x8, col): 2 .b32 registers holding b0..b3;
//       bi at row 2t + (i & 1), + 8 for i >= 2; column g.
//   C, D (16x8 f32): c0..c3 at row g (i < 2) or g + 8, column 2t + (i & 1).
//   ldmatrix .m8n8.b16: lanes 8m .. 8m+7 give the row addresses of matrix m; lane L
//       receives row g, columns 2t and 2t+1 of matrix m in register m (.trans: the
//       transposed matrix, i.e. rows 2t and 2t+1 of column g).
//
// Mutations (-DEMU_MUTATE=N) plant one fault of the kind a kernel can contain,
// so the test suite can show that the checks catch it:
//   1  mma: A registers 1 and 2 exchanged (a fragment in the wrong register)
//   2  mma: the two bf16 halves of every B register exchanged
//   3  mma: accumulator rows g and g + 8 exchanged in the result
//   4  shfl xor with lane mask 2 returns the lane's own value (a reduction loses inputs)
//   5  the last block of every grid is not run (a grid one block short)
#include "emu.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#ifndef EMU_MUTATE
#define EMU_MUTATE 0
#endif

// Switching fibers: on x86-64 a dozen instructions that save the callee-saved
// registers and swap stacks (glibc's swapcontext makes a system call per switch,
// and under ASan its interceptor clears the shadow of the whole target stack);
// elsewhere ucontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
// Saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save, continues on the stack `load` (one
// such frame, or a new fiber's initial one, see start_fiber).
extern "C" void emu_switch(void **save, void *load);
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#else
#define EMU_ASM_SWITCH 0
#endif

// ---- bf16 / f16 ---------------------------------------------------------------------------

float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = (uint32_t)v.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

__nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (uint16_t)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    r.bits = (uint16_t)(u >> 16);
    return r;
}

__nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    __nv_bfloat162 r;
    r.x = __float2bfloat16_rn(lo);
    r.y = __float2bfloat16_rn(hi);
    return r;
}

float __half2float(__half v) {
    _Float16 h;
    memcpy(&h, &v.bits, 2);
    return (float)h;
}

__half __float2half_rn(float v) {
    const _Float16 h = (_Float16)v;
    __half r;
    memcpy(&r.bits, &h, 2);
    return r;
}

namespace emu {
namespace {

enum Wait { RUNNABLE, AT_BARRIER, AT_WARP, FINISHED };
enum WarpOp { OP_SHFL_PUT = 1, OP_SHFL_GET, OP_MMA_PUT, OP_MMA_GET, OP_LDM_PUT, OP_LDM_GET };
const char *op_name(int op) {
    switch (op) {
        case OP_SHFL_PUT: case OP_SHFL_GET: return "__shfl_*_sync";
        case OP_MMA_PUT: case OP_MMA_GET: return "mma.sync";
        case OP_LDM_PUT: case OP_LDM_GET: return "ldmatrix";
        default: return "?";
    }
}

const size_t STACK_BYTES = 256 << 10;
const size_t MAX_DYNAMIC_SMEM = 48 << 10;  // without cudaFuncSetAttribute, a launch may ask for at most 48 KiB

struct Fiber {
    ucontext_t ctx;  // the ucontext fallback
    void *sp;        // the x86-64 switch: the saved stack pointer
    char *stack;
    uint3 tid;
    int lane, warp;
    Wait wait;
    unsigned gen;      // the barrier / warp generation it waits to see pass
    void *fake_stack;  // ASan's bookkeeping across switches
};

struct Warp {
    int live, arrived, op;
    unsigned gen;
    alignas(16) unsigned char slot[32][64];  // one exchange buffer per lane
    unsigned mma_gen;                        // gen for which mma_d holds the product
    float mma_d[16][8];                      // the warp's D, computed once by the first lane through
};

struct Machine {
    ucontext_t main_ctx;
    void *main_sp = nullptr;
    const void *main_bottom = nullptr;
    size_t main_size = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char *> stacks;  // reused from block to block
    Config cfg;
    uint3 bid;
    const std::function<void()> *body = nullptr;
    unsigned char *smem = nullptr;
    int live = 0, bar_arrived = 0;
    unsigned bar_gen = 0;
    Fiber *cur = nullptr;
};

Machine *g_machine;  // the grid being run; run_grid is not reentrant

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char *fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "cuda_emu: ");
    if (g_machine && g_machine->cur) {
        const Fiber *f = g_machine->cur;
        fprintf(stderr, "block (%u,%u,%u) thread (%u,%u,%u): ", g_machine->bid.x, g_machine->bid.y, g_machine->bid.z,
                f->tid.x, f->tid.y, f->tid.z);
    }
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    fflush(stderr);
    abort();
}

Machine &machine() {
    if (!g_machine || !g_machine->cur) fail("a device function was called outside a kernel launch");
    return *g_machine;
}

// Scheduler -> fiber.
void switch_to(Machine &m, Fiber &f) {
    m.cur = &f;
    void *fake = nullptr;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK_BYTES);
#endif
    if (EMU_ASM_SWITCH) emu_switch(&m.main_sp, f.sp);
    else swapcontext(&m.main_ctx, &f.ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    m.cur = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
void yield(Machine &m, Fiber &f) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, m.main_bottom, m.main_size);
#endif
    if (EMU_ASM_SWITCH) emu_switch(&f.sp, m.main_sp);
    else swapcontext(&f.ctx, &m.main_ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &m.main_bottom, &m.main_size);
#endif
    f.wait = RUNNABLE;
}

void release_barrier(Machine &m) {
    m.bar_arrived = 0;
    m.bar_gen++;
}

void thread_exit(Machine &m, Fiber &f) {
    f.wait = FINISHED;
    m.live--;
    Warp &w = m.warps[f.warp];
    w.live--;
    if (w.arrived > 0)
        fail("exited while %d lane(s) of its warp wait in %s (a warp collective every lane must reach)", w.arrived,
             op_name(w.op));
    // __syncthreads must be reached by every thread of the block or by none (CUDA leaves the rest undefined)
    if (m.bar_arrived > 0) fail("exited while %d thread(s) wait at __syncthreads", m.bar_arrived);
}

void fiber_entry() {
    Machine &m = *g_machine;
    Fiber &f = *m.cur;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &m.main_bottom, &m.main_size);
#endif
    (*m.body)();
    thread_exit(m, f);
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, m.main_bottom, m.main_size);  // this fiber is done for good
#endif
    if (EMU_ASM_SWITCH) emu_switch(&f.sp, m.main_sp);  // never resumed
    else setcontext(&m.main_ctx);
    abort();
}

// A new fiber's first frame: emu_switch's restore sequence pops it and "returns"
// into fiber_entry with the stack aligned as after a call (rsp = 8 mod 16).
void start_fiber(Fiber &f) {
    if (!EMU_ASM_SWITCH) {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_entry, 0);
        return;
    }
    uint64_t *top = (uint64_t *)(f.stack + STACK_BYTES);  // 16-byte aligned (page)
    uint64_t *sp = top - 10;                             // 80 bytes: sp = 0 mod 16
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    memset(sp, 0, 80);
    memcpy((char *)sp, &fcw, 2);
    memcpy((char *)sp + 8, &mxcsr, 4);
    sp[8] = (uint64_t)(uintptr_t)&fiber_entry;  // the return address emu_switch's ret takes
    sp[9] = 0;                                   // fiber_entry's own return address: it never returns
    f.sp = sp;
}

bool runnable(const Machine &m, const Fiber &f) {
    switch (f.wait) {
        case RUNNABLE: return true;
        case AT_BARRIER: return m.bar_gen != f.gen;
        case AT_WARP: return m.warps[f.warp].gen != f.gen;
        default: return false;
    }
}

[[noreturn]] void deadlock(Machine &m) {
    int at_bar = 0;
    for (const Fiber &f : m.fibers) at_bar += f.wait == AT_BARRIER;
    m.cur = nullptr;
    fprintf(stderr, "cuda_emu: block (%u,%u,%u) can make no progress: %d thread(s) wait at __syncthreads, %d live\n",
            m.bid.x, m.bid.y, m.bid.z, at_bar, m.live);
    for (size_t w = 0; w < m.warps.size(); w++)
        if (m.warps[w].arrived > 0)
            fprintf(stderr, "cuda_emu:   warp %zu: %d of %d live lanes wait in %s\n", w, m.warps[w].arrived,
                    m.warps[w].live, op_name(m.warps[w].op));
    fail("deadlock: a __syncthreads or warp collective that not every thread reaches");
}

void run_block(Machine &m, uint3 bid) {
    const dim3 b = m.cfg.block;
    const int n = (int)(b.x * b.y * b.z);
    m.bid = bid;
    while ((int)m.stacks.size() < n) {
        void *s = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) fail("cannot map a fiber stack");
        m.stacks.push_back((char *)s);
    }
    m.fibers.assign((size_t)n, Fiber{});
    m.warps.assign((size_t)(n + 31) / 32, Warp{});
    for (int i = 0; i < n; i++) {
        Fiber &f = m.fibers[(size_t)i];
        f.stack = m.stacks[(size_t)i];
        f.tid = uint3{(unsigned)i % b.x, (unsigned)i / b.x % b.y, (unsigned)i / (b.x * b.y)};
        f.lane = i % 32;
        f.warp = i / 32;
        f.wait = RUNNABLE;
        m.warps[(size_t)f.warp].live++;
        start_fiber(f);
    }
    if (m.smem) memset(m.smem, 0xff, m.cfg.smem);  // NaN bytes: a read before any write shows
    m.live = n;
    m.bar_arrived = 0;
    for (int finished = 0; finished < n;) {
        bool progressed = false;
        finished = 0;
        for (Fiber &f : m.fibers) {
            if (runnable(m, f)) {
                switch_to(m, f);
                progressed = true;
            }
            finished += f.wait == FINISHED;
        }
        if (!progressed && finished < n) deadlock(m);
    }
#if EMU_ASAN
    for (int i = 0; i < n; i++) __asan_unpoison_memory_region(m.stacks[(size_t)i], STACK_BYTES);
#endif
}

// The warp-wide rendezvous of a collective: every live lane of the warp must arrive with the same op.
void warp_rendezvous(Machine &m, Fiber &f, int op) {
    Warp &w = m.warps[(size_t)f.warp];
    if (w.live != 32)
        fail("%s with a full mask in warp %d, which has %d live lane(s): exited or missing lanes make it undefined",
             op_name(op), f.warp, w.live);
    if (w.arrived == 0) w.op = op;
    else if (w.op != op) fail("lanes of warp %d are in different collectives (%s and %s)", f.warp, op_name(w.op), op_name(op));
    const unsigned g = w.gen;
    if (++w.arrived == w.live) {
        w.arrived = 0;
        w.gen++;
        return;
    }
    f.wait = AT_WARP;
    f.gen = g;
    yield(m, f);
}

float bf16_half(uint32_t reg, int half) {
    __nv_bfloat16 v;
    v.bits = (uint16_t)(half ? reg >> 16 : reg & 0xffffu);
    return __bfloat162float(v);
}

struct MmaIn {
    uint32_t a[4], b[2];
    float c[4];
};
static_assert(sizeof(MmaIn) <= 64, "fits a lane's exchange slot");

}  // namespace

void run_grid(const Config &cfg, const std::function<void()> &body) {
    const dim3 g = cfg.grid, b = cfg.block;
    const uint64_t threads = (uint64_t)b.x * b.y * b.z;
    if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0)
        fail("launch with an empty grid or block (%u,%u,%u) x (%u,%u,%u): the GPU rejects it", g.x, g.y, g.z, b.x, b.y,
             b.z);
    if (threads > 1024 || b.z > 64) fail("launch with %llu threads per block: the GPU allows at most 1024", (unsigned long long)threads);
    if (g.y > 65535 || g.z > 65535) fail("launch with grid (%u,%u,%u): grid y and z are at most 65535", g.x, g.y, g.z);
    if (g.x > 0x7fffffffu) fail("launch with grid x = %u: at most 2^31 - 1", g.x);
    if (cfg.smem > MAX_DYNAMIC_SMEM)
        fail("launch with %zu bytes of dynamic shared memory: more than 48 KiB needs cudaFuncSetAttribute", cfg.smem);
    if (g_machine) fail("a kernel launched a kernel (not emulated)");
    Machine m;
    m.cfg = cfg;
    m.body = &body;
    if (cfg.smem) m.smem = (unsigned char *)malloc(cfg.smem);  // exactly the bytes asked for: ASan sees overruns
    g_machine = &m;
    uint64_t nblocks = (uint64_t)g.x * g.y * g.z, done = 0;
    if (EMU_MUTATE == 5) nblocks--;
    for (unsigned z = 0; z < g.z; z++)
        for (unsigned y = 0; y < g.y; y++)
            for (unsigned x = 0; x < g.x && done < nblocks; x++, done++) run_block(m, uint3{x, y, z});
    g_machine = nullptr;
    for (char *s : m.stacks) munmap(s, STACK_BYTES);
    free(m.smem);
}

const uint3 &thread_idx() { return machine().cur->tid; }
const uint3 &block_idx() { return machine().bid; }
const dim3 &block_dim() { return machine().cfg.block; }
const dim3 &grid_dim() { return machine().cfg.grid; }

void *dynamic_shared() {
    Machine &m = machine();
    if (!m.smem) fail("extern __shared__ memory used by a kernel launched with 0 bytes of it");
    return m.smem;
}

void sync_block() {
    Machine &m = machine();
    Fiber &f = *m.cur;
    if (m.live < (int)m.fibers.size())
        fail("__syncthreads after %d thread(s) of the block exited: every thread must reach it",
             (int)m.fibers.size() - m.live);
    const unsigned g = m.bar_gen;
    if (++m.bar_arrived == m.live) {
        release_barrier(m);
        return;
    }
    f.wait = AT_BARRIER;
    f.gen = g;
    yield(m, f);
}

void shfl_bytes(unsigned mask, void *val, size_t n, ShflKind kind, int arg, int width) {
    Machine &m = machine();
    Fiber &f = *m.cur;
    if (mask != 0xffffffffu) fail("__shfl_*_sync with mask %#x: only full-warp masks are emulated", mask);
    if (width < 1 || width > 32 || (width & (width - 1))) fail("__shfl_*_sync with width %d", width);
    if (n > sizeof m.warps[0].slot[0]) fail("__shfl_*_sync of a %zu-byte value", n);
    Warp &w = m.warps[(size_t)f.warp];
    const int lane = f.lane, seg = lane & ~(width - 1);
    memcpy(w.slot[lane], val, n);
    warp_rendezvous(m, f, OP_SHFL_PUT);
    int src = lane;
    switch (kind) {
        case SHFL_XOR: src = lane ^ arg; break;
        case SHFL_IDX: src = seg + (arg & (width - 1)); break;
        case SHFL_DOWN: src = lane + arg; break;
        case SHFL_UP: src = lane - arg; break;
    }
    if (src < seg || src >= seg + width) src = lane;  // outside the segment: the lane keeps its own value
    if (EMU_MUTATE == 4 && kind == SHFL_XOR && arg == 2) src = lane;
    memcpy(val, w.slot[src], n);
    warp_rendezvous(m, f, OP_SHFL_GET);
}

void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    Machine &m = machine();
    Fiber &f = *m.cur;
    Warp &w = m.warps[(size_t)f.warp];
    MmaIn in;
    memcpy(in.a, a, sizeof in.a);
    in.b[0] = b0;
    in.b[1] = b1;
    memcpy(in.c, d, sizeof in.c);
    memcpy(w.slot[f.lane], &in, sizeof in);
    warp_rendezvous(m, f, OP_MMA_PUT);
    if (w.mma_gen != w.gen) {  // the first lane through computes the warp's product for all
        // The whole operands, rebuilt from the 32 lanes' registers as the PTX ISA lays them out.
        double A[16][16], B[16][8], C[16][8];
        for (int L = 0; L < 32; L++) {
            MmaIn r;
            memcpy(&r, w.slot[L], sizeof r);
            if (EMU_MUTATE == 1) std::swap(r.a[1], r.a[2]);
            if (EMU_MUTATE == 2) r.b[0] = r.b[0] >> 16 | r.b[0] << 16, r.b[1] = r.b[1] >> 16 | r.b[1] << 16;
            const int g = L >> 2, t = L & 3;
            for (int i = 0; i < 8; i++)
                A[g + (i & 2 ? 8 : 0)][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = bf16_half(r.a[i / 2], i & 1);
            for (int i = 0; i < 4; i++) B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = bf16_half(r.b[i / 2], i & 1);
            for (int i = 0; i < 4; i++) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = r.c[i];
        }
        for (int row = 0; row < 16; row++)
            for (int col = 0; col < 8; col++) {
                double s = C[row][col];
                for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];  // bf16 products are exact in double
                w.mma_d[row][col] = (float)s;
            }
        w.mma_gen = w.gen;
    }
    const int g = f.lane >> 2, t = f.lane & 3;
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = g + (i >= 2 ? 8 : 0);
        if (EMU_MUTATE == 3) row ^= 8;
        out[i] = w.mma_d[row][2 * t + (i & 1)];
    }
    warp_rendezvous(m, f, OP_MMA_GET);
    memcpy(d, out, sizeof out);
}

void ldmatrix(uint32_t *r, int num, bool trans, const void *row_addr) {
    Machine &m = machine();
    Fiber &f = *m.cur;
    if (num != 1 && num != 2 && num != 4) fail("ldmatrix .x%d", num);
    Warp &w = m.warps[(size_t)f.warp];
    memcpy(w.slot[f.lane], &row_addr, sizeof row_addr);
    warp_rendezvous(m, f, OP_LDM_PUT);
    const uint16_t *rows[32];
    for (int L = 0; L < 8 * num; L++) {
        memcpy(&rows[L], w.slot[L], sizeof rows[L]);
        if ((uintptr_t)rows[L] % 16) fail("ldmatrix: lane %d's row address %p is not 16-byte aligned", L, (const void *)rows[L]);
    }
    const int g = f.lane >> 2, t = f.lane & 3;
    uint32_t out[4];
    for (int k = 0; k < num; k++) {
        uint16_t lo, hi;
        if (trans) {
            lo = rows[8 * k + 2 * t][g];
            hi = rows[8 * k + 2 * t + 1][g];
        } else {
            lo = rows[8 * k + g][2 * t];
            hi = rows[8 * k + g][2 * t + 1];
        }
        out[k] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    warp_rendezvous(m, f, OP_LDM_GET);
    memcpy(r, out, sizeof(uint32_t) * (size_t)num);
}

}  // namespace emu
