// k_attention.cuh: causal grouped-query attention over packed sequences.
//
// Input: qkv (T, (nh + 2 nkv) * hd) bf16, RoPE already applied, sequences laid
// end to end (cu_seqlens, no padding). Output: out (T, nh * hd) bf16.
// Query head h reads key/value head h / (nh / nkv). Memory is O(tile), never
// L x L: scores live in registers and the softmax is the online (running max,
// running sum) one.
//
// attention_tc_kernel<HD> (HD in 16, 32, 64, 128): tensor cores. One CTA per
// (tile, query head); a tile is 64 queries of one sequence (host-planned
// list, cuda_attn_plan), 4 warps of 16 query rows each. Per block of BK keys:
//   S = Q K^T      mma.m16n8k16 bf16 -> fp32, Q held in registers
//   causal mask, running max m and sum l per row (fp32, exp2 domain)
//   O = O * exp2(m_old - m_new) + P V, P rounded to bf16 for the mma
// The fp32 accumulator of S (m16n8 layout) is exactly the A-operand layout of
// P for the P V mma, so P never leaves registers. K is staged row-major in
// shared memory, V transposed (Vt[d][key]) so both B operands are 32-bit
// loads of two consecutive bf16.
//
// attention_warp_kernel: any even head_dim. One warp per (query token,
// head), keys walked one at a time; slow, exact fp32 softmax. Used for head
// dims the tensor-core kernel is not built for (tiny test models).
#ifndef ARMORM_CUDA_K_ATTENTION_CUH
#define ARMORM_CUDA_K_ATTENTION_CUH

#include "k_common.cuh"
#include "backend_cuda.h"

#define ATT_WARPS 4
#define ATT_BQ (ATT_WARPS * 16)
static_assert(ATT_BQ == CUDA_ATTN_BLOCK_Q, "the host plans tiles of ATT_BQ queries");

// d (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col)
static __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef ARMORM_CUDA_EMU  // the CPU emulation (tests/cuda_emu) runs the instruction from its documented layout
    emu_mma_m16n8k16_bf16(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two bf16, the first in the low half (the lower column index of a fragment pair).
static __device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

static __device__ __forceinline__ uint32_t ld_pair(const bf16 *p) { return *reinterpret_cast<const uint32_t *>(p); }

template <int HD>
struct AttShape {
    static constexpr int BK = 64;        // keys per step
    static constexpr int KP = HD + 8;    // Ks row pitch (bf16): 16-byte rows, conflict-free fragment loads
    static constexpr int VP = BK + 8;    // Vt row pitch
};

// Grid (ntiles, nh), block 128. tiles[i] = (sequence, first query of the tile).
template <int HD>
__global__ void __launch_bounds__(ATT_WARPS * 32) attention_tc_kernel(bf16 *out, const bf16 *qkv, const int32_t *cu,
                                                                      const CudaAttnTile *tiles, int nh, int nkv,
                                                                      float scale_log2) {
    constexpr int BK = AttShape<HD>::BK, KP = AttShape<HD>::KP, VP = AttShape<HD>::VP;
    static_assert(HD % 16 == 0 && HD <= 128, "tensor-core attention is built for HD 16..128, multiples of 16");
    __shared__ __align__(16) bf16 Ks[BK * KP];  // (BK, HD) keys, row-major
    __shared__ __align__(16) bf16 Vt[HD * VP];  // (HD, BK) values, transposed
    const CudaAttnTile tile = tiles[blockIdx.x];
    const int h = blockIdx.y, kvh = h / (nh / nkv);
    const int start = cu[tile.seq], len = cu[tile.seq + 1] - start, q0 = tile.q0;
    const int64_t stride = (int64_t)(nh + 2 * nkv) * HD;
    const bf16 *qb = qkv + (int64_t)start * stride + (int64_t)h * HD;
    const bf16 *kb_ = qkv + (int64_t)start * stride + (int64_t)(nh + kvh) * HD;
    const bf16 *vb_ = qkv + (int64_t)start * stride + (int64_t)(nh + nkv + kvh) * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two query rows, within the sequence

    // Q fragments for this warp's 16 rows, read once from global memory (rows past the end are 0).
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int c = kk * 16 + tq * 2;
        qa[kk][0] = r0 < len ? ld_pair(qb + (int64_t)r0 * stride + c) : 0u;
        qa[kk][1] = r1 < len ? ld_pair(qb + (int64_t)r1 * stride + c) : 0u;
        qa[kk][2] = r0 < len ? ld_pair(qb + (int64_t)r0 * stride + c + 8) : 0u;
        qa[kk][3] = r1 < len ? ld_pair(qb + (int64_t)r1 * stride + c + 8) : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const int kend = min(len, q0 + ATT_BQ);      // causal: no query of the tile sees a later key
    const int wlast = q0 + warp * 16 + 15;       // this warp's last query row

    for (int kb = 0; kb < kend; kb += BK) {
        __syncthreads();  // every warp is done with the previous block's K and V
        // Stage keys kb .. kb+BK-1; thread -> (key j, 8 dims at c); consecutive threads take
        // consecutive keys, so the transposed V stores of a warp hit distinct banks. Zeros past
        // the sequence keep 0 * garbage out of the P V product.
        for (int idx = threadIdx.x; idx < BK * (HD / 8); idx += ATT_WARPS * 32) {
            const int j = idx % BK, c = (idx / BK) * 8;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
            if (kb + j < len) {
                kv = *reinterpret_cast<const uint4 *>(kb_ + (int64_t)(kb + j) * stride + c);
                vv = *reinterpret_cast<const uint4 *>(vb_ + (int64_t)(kb + j) * stride + c);
            }
            *reinterpret_cast<uint4 *>(&Ks[j * KP + c]) = kv;
            const bf16 *ve = reinterpret_cast<const bf16 *>(&vv);
#pragma unroll
            for (int u = 0; u < 8; u++) Vt[(c + u) * VP + j] = ve[u];
        }
        __syncthreads();
        if (kb > wlast) continue;  // all of this warp's rows precede these keys

        // S (16 x BK) = Q K^T, one m16n8 accumulator per 8 keys
        float s[BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const bf16 *krow = &Ks[(nt * 8 + g) * KP + tq * 2];
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) mma_16816(s[nt], qa[kk], ld_pair(krow + kk * 16), ld_pair(krow + kk * 16 + 8));
        }
        // scale into the exp2 domain, causal mask, block row maxima (elements 0,1: row r0; 2,3: row r1)
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kb + nt * 8 + tq * 2 + (e & 1), row = e < 2 ? r0 : r1;
                float v = s[nt][e] * scale_log2;
                if (key > row || key >= len) v = -INFINITY;
                s[nt][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v);
                else mx1 = fmaxf(mx1, v);
            }
        }
        // a row's 16 x BK scores are spread over the 4 threads of a quad
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // a row that has seen no key yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN
        const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
        m0 = mn0;
        m1 = mn1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            o[dt][0] *= corr0;
            o[dt][1] *= corr0;
            o[dt][2] *= corr1;
            o[dt][3] *= corr1;
        }
        // P = exp2(S - m) as bf16 A fragments: keys 16kc..16kc+15 come from accumulators 2kc, 2kc+1
        uint32_t pa[BK / 16][4];
#pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) {
            const float *a = s[2 * kc], *b = s[2 * kc + 1];
            const float p0 = exp2f(a[0] - base0), p1 = exp2f(a[1] - base0);
            const float p2 = exp2f(a[2] - base1), p3 = exp2f(a[3] - base1);
            const float p4 = exp2f(b[0] - base0), p5 = exp2f(b[1] - base0);
            const float p6 = exp2f(b[2] - base1), p7 = exp2f(b[3] - base1);
            l0 += p0 + p1 + p4 + p5;
            l1 += p2 + p3 + p6 + p7;
            pa[kc][0] = pack_bf16x2(p0, p1);  // row r0, keys 2tq, 2tq+1
            pa[kc][1] = pack_bf16x2(p2, p3);  // row r1, same keys
            pa[kc][2] = pack_bf16x2(p4, p5);  // row r0, keys 8+2tq, 8+2tq+1
            pa[kc][3] = pack_bf16x2(p6, p7);  // row r1, same keys
        }
        // O (16 x HD) += P (16 x BK) V (BK x HD)
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            const bf16 *vrow = &Vt[(dt * 8 + g) * VP + tq * 2];
#pragma unroll
            for (int kc = 0; kc < BK / 16; kc++) mma_16816(o[dt], pa[kc], ld_pair(vrow + kc * 16), ld_pair(vrow + kc * 16 + 8));
        }
    }
    // each thread summed its own columns of P: add the quad's partial sums
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int64_t QD = (int64_t)nh * HD;
    bf16 *ob = out + (int64_t)start * QD + (int64_t)h * HD + tq * 2;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        if (r0 < len) *reinterpret_cast<uint32_t *>(ob + (int64_t)r0 * QD + dt * 8) = pack_bf16x2(o[dt][0] * inv0, o[dt][1] * inv0);
        if (r1 < len) *reinterpret_cast<uint32_t *>(ob + (int64_t)r1 * QD + dt * 8) = pack_bf16x2(o[dt][2] * inv1, o[dt][3] * inv1);
    }
}

// Grid (T, nh), block 32, dynamic shared memory 2 * hd floats.
// pos[t] is t's position in its sequence, so its keys are t - pos[t] .. t.
static __global__ void attention_warp_kernel(bf16 *out, const bf16 *qkv, const int32_t *pos, int nh, int nkv, int hd,
                                             float scale) {
    EXTERN_SHARED(float, att_sm);
    float *q = att_sm, *acc = att_sm + hd;  // each lane touches only its own dims d = lane + 32i
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y, kvh = h / (nh / nkv), lane = threadIdx.x;
    const int64_t stride = (int64_t)(nh + 2 * nkv) * hd;
    for (int d = lane; d < hd; d += 32) {
        q[d] = bf2f(qkv[t * stride + (int64_t)h * hd + d]);
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int64_t j = t - pos[t]; j <= t; j++) {
        const bf16 *k = qkv + j * stride + (int64_t)(nh + kvh) * hd, *v = k + (int64_t)nkv * hd;
        float dot = 0.0f;
        for (int d = lane; d < hd; d += 32) dot += q[d] * bf2f(k[d]);
        const float sc = warp_sum(dot) * scale;
        const float mn = fmaxf(m, sc), corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
        for (int d = lane; d < hd; d += 32) acc[d] = acc[d] * corr + p * bf2f(v[d]);
        m = mn;
    }
    bf16 *o = out + t * (int64_t)nh * hd + (int64_t)h * hd;
    for (int d = lane; d < hd; d += 32) o[d] = f2bf(acc[d] / l);
}

// Launches the kernel cuda_launch_attention picks for head_dim.
static void launch_attention(bf16 *out, const bf16 *qkv, const int32_t *cu, const int32_t *pos,
                             const CudaAttnTile *tiles, int64_t ntiles, int64_t T, int nh, int nkv, int hd,
                             cudaStream_t st) {
    const CudaLaunch l = cuda_launch_attention(ntiles, T, nh, hd);
    const dim3 grid(l.grid_x, l.grid_y, l.grid_z);
    const float scale = 1.0f / sqrtf((float)hd);
    const float scale_log2 = scale * 1.4426950408889634f;  // softmax in base 2: exp(x) = exp2(x log2 e)
    switch (cuda_attn_tc_supported(hd) ? hd : 0) {
        case 16: LAUNCH_KERNEL(attention_tc_kernel<16>, grid, l.block, 0, st)(out, qkv, cu, tiles, nh, nkv, scale_log2); break;
        case 32: LAUNCH_KERNEL(attention_tc_kernel<32>, grid, l.block, 0, st)(out, qkv, cu, tiles, nh, nkv, scale_log2); break;
        case 64: LAUNCH_KERNEL(attention_tc_kernel<64>, grid, l.block, 0, st)(out, qkv, cu, tiles, nh, nkv, scale_log2); break;
        case 128: LAUNCH_KERNEL(attention_tc_kernel<128>, grid, l.block, 0, st)(out, qkv, cu, tiles, nh, nkv, scale_log2); break;
        default: LAUNCH_KERNEL(attention_warp_kernel, grid, l.block, l.smem, st)(out, qkv, pos, nh, nkv, hd, scale); break;
    }
}

#endif
