/*
 * The tensor-core GEMV of lowBitGemm.cuh: y = x @ W for 1..16 rows of fp16 x and int4 (blocked) or int8
 * (per-channel) weights, on mma.sync.m16n8k16 (sm_80 and newer: Orin sm_87, Hopper sm_90).
 *
 * Why: at batch 1 the CUDA-core GEMV spends about seven instructions per weight (unpack, convert, scale, FMA), so
 * it is bound by instruction issue, not by memory. Here the tensor cores do the multiply-adds and a thread only
 * unpacks: about two instructions per weight (a byte permute, shift and mask for a pair of rows, then a
 * subtraction and, for int4, the multiplication by the scale in fp16, which rounds exactly as ONNX's
 * DequantizeLinear does). Products accumulate in fp32.
 *
 * Mapping. The weights are the MMA's A operand transposed (A[n][k] = W[k][n]) and x is B (B[k][m] = x[m][k]),
 * so that a 16 x 16 A tile is 16 output columns by 16 weight rows and the batch is the MMA's N = 8 (two MMAs
 * share each A fragment for 9..16 rows). The storage is [K, N] with N contiguous, while an A fragment holds
 * pairs of consecutive k for one column, so the kernel renames both indices instead of moving data:
 *   - k: thread t of its quad (lane % 4) loads four consecutive weight rows 4t..4t+3 of each 16-row slice and
 *     gives them to the MMA as its logical rows 2t, 2t+1, 2t+8, 2t+9; its B fragment (x) uses the same rows;
 *   - n: thread group g (lane / 4) loads an 8-byte segment of each row (16 int4 or 8 int8 columns) and feeds
 *     column pair (2j, 2j+1) of it to MMA j as output rows g and g + 8.
 * So one 8-byte load per row and thread, a warp reading 64 contiguous bytes of each of 16 rows per slice, and
 * every fragment is built in registers (__byte_perm pairs the same byte of two rows). The accumulators say
 * which output each value is: the store undoes the renaming.
 *
 * A block is kMmaWarps warps on one tile of columns; each warp takes a contiguous run of 32-row groups of the
 * block's rows, kept kMmaStages - 1 groups ahead by cp.async into shared memory (the copies are the thread's
 * own, so a wait_group is all the synchronization they need); the weights' first groups are requested before
 * x is staged. The warps' sums meet in shared memory, and K is split across blocks (fp32 partials,
 * reduce_partials_kernel) as in the CUDA-core GEMV.
 */
#pragma once

#include "gemmCommon.cuh"

namespace accullm
{
namespace
{

#ifndef ACCULLM_MMA_WARPS
#define ACCULLM_MMA_WARPS 4
#endif
#ifndef ACCULLM_MMA_TARGET_BLOCKS
#define ACCULLM_MMA_TARGET_BLOCKS 256
#endif
#ifndef ACCULLM_MMA_MIN_ROWS
#define ACCULLM_MMA_MIN_ROWS 1
#endif
#ifndef ACCULLM_MMA_STAGES
#define ACCULLM_MMA_STAGES 3
#endif

constexpr int kMmaWarps = ACCULLM_MMA_WARPS;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaTargetBlocks = ACCULLM_MMA_TARGET_BLOCKS; // split K until about this many blocks (shape-only)
constexpr int kMaxMmaRows = 16;                             // rows of x: two MMAs of 8 per A fragment
constexpr int kMinMmaRows = ACCULLM_MMA_MIN_ROWS;           // fewer rows would take the CUDA-core GEMV
constexpr int kMmaGroupRows = 32;                           // weight rows per thread iteration: two 16-row slices
constexpr int kMmaStages = ACCULLM_MMA_STAGES;              // groups of weight rows in flight per warp (cp.async)
static_assert(kMmaStages >= 2, "ACCULLM_MMA_STAGES: at least 2");
constexpr size_t kMmaStageBytes = 32 * 1024;                // most shared memory the staged fp16 x may take

// Columns one thread group covers: 8 bytes of a row.
__host__ __device__ constexpr int mma_group_columns(int kind)
{
    return kind == kWeightINT4 ? 16 : 8;
}
__host__ __device__ constexpr int mma_tile_columns(int kind)
{
    return 8 * mma_group_columns(kind);
}
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap(); // the host never picks this path below sm_80 (mma_gemv_applies)
#endif
}

__device__ __forceinline__ uint32_t half2_bits(__half2 value)
{
    return *reinterpret_cast<uint32_t*>(&value);
}

// Byte `b` and `b + 1` of `low_row` in bytes 0 and 1, of `high_row` in bytes 2 and 3 (b in 0..2).
__device__ __forceinline__ uint32_t pair_rows(uint32_t low_row, uint32_t high_row, int b)
{
    return __byte_perm(low_row, high_row, b | ((b + 1) << 4) | ((b + 4) << 8) | ((b + 5) << 12));
}

// int4: nibble at bit `shift` of bytes 0 and 2 of p as (q, q') halves, q the signed value: 0x6408 ^ n is
// 1024 + (n ^ 8) = 1024 + q + 8 exactly, then 1032 is subtracted.
__device__ __forceinline__ __half2 int4_pair(uint32_t p, int shift)
{
    uint32_t const bits = ((p >> shift) & 0x000F000Fu) ^ 0x64086408u;
    return __hsub2(*reinterpret_cast<__half2 const*>(&bits), __float2half2_rn(1032.0f));
}

// int8: byte at bit `shift` of bytes 0 and 2 (shift 0) or 1 and 3 (shift 8) as (q, q') halves.
__device__ __forceinline__ __half2 int8_pair(uint32_t p, int shift)
{
    uint32_t const bits = ((p >> shift) & 0x00FF00FFu) ^ 0x64806480u; // 1024 + q + 128
    return __hsub2(*reinterpret_cast<__half2 const*>(&bits), __float2half2_rn(1152.0f));
}

// The A fragments of the J = 8 (int4) or 4 (int8) MMAs of one 16-row slice, from this thread's four rows
// r0..r3 (8 bytes each) and, for int4, the slice's scales as (s, s) pairs per column.
template <int KIND>
__device__ __forceinline__ void slice_fragments(uint2 const (&w)[4], __half2 const* scale_pairs,
    uint32_t (&a)[mma_group_columns(KIND) / 2][4])
{
    constexpr int J = mma_group_columns(KIND) / 2;
    uint32_t const r0[2] = {w[0].x, w[0].y};
    uint32_t const r1[2] = {w[1].x, w[1].y};
    uint32_t const r2[2] = {w[2].x, w[2].y};
    uint32_t const r3[2] = {w[3].x, w[3].y};
    if constexpr (KIND == kWeightINT4)
    {
        // byte j of a row holds columns 2j (low nibble) and 2j + 1: MMA j's output rows g and g + 8
#pragma unroll
        for (int j = 0; j < J; j += 2)
        {
            uint32_t const p01 = pair_rows(r0[j / 4], r1[j / 4], j % 4);
            uint32_t const p23 = pair_rows(r2[j / 4], r3[j / 4], j % 4);
#pragma unroll
            for (int h = 0; h < 2; ++h) // MMA j + h: bytes h of the pairs
            {
                __half2 const s_even = scale_pairs[2 * (j + h)];
                __half2 const s_odd = scale_pairs[2 * (j + h) + 1];
                a[j + h][0] = half2_bits(__hmul2(int4_pair(p01, 8 * h), s_even));
                a[j + h][1] = half2_bits(__hmul2(int4_pair(p01, 8 * h + 4), s_odd));
                a[j + h][2] = half2_bits(__hmul2(int4_pair(p23, 8 * h), s_even));
                a[j + h][3] = half2_bits(__hmul2(int4_pair(p23, 8 * h + 4), s_odd));
            }
        }
    }
    else
    {
        // byte c of a row is column c: MMA j takes columns 2j and 2j + 1 (scales applied to the fp32 sums)
#pragma unroll
        for (int j = 0; j < J; ++j)
        {
            uint32_t const p01 = pair_rows(r0[j / 2], r1[j / 2], 2 * (j % 2));
            uint32_t const p23 = pair_rows(r2[j / 2], r3[j / 2], 2 * (j % 2));
            a[j][0] = half2_bits(int8_pair(p01, 0));
            a[j][1] = half2_bits(int8_pair(p01, 8));
            a[j][2] = half2_bits(int8_pair(p23, 0));
            a[j][3] = half2_bits(int8_pair(p23, 8));
        }
    }
}

// Shared memory of one block: [region: staged x, later the warps' sums] [pipeline] [outliers' x].
__host__ __device__ constexpr size_t mma_pipe_bytes()
{
    return static_cast<size_t>(kMmaWarps) * kMmaStages * 8 * 32 * sizeof(uint2); // 8 rows per lane a group
}
__host__ __device__ inline size_t mma_region_bytes(int kind, int nb, int k_range)
{
    size_t const staged = sizeof(__half) * 8 * nb * static_cast<size_t>(k_range);
    size_t const sums = sizeof(float) * kMmaWarps * 8 * nb * mma_tile_columns(kind);
    return ((staged > sums ? staged : sums) + 15) & ~size_t{15};
}

__device__ __forceinline__ void cp_async_8(void* shared, void const* global, bool valid)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned const address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(address), "l"(global),
        "r"(valid ? 8 : 0)); // source size 0: the 8 bytes are zero-filled
#endif
}
__device__ __forceinline__ void cp_async_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

// Grid (ceil(N / tile columns), splits), kMmaThreads threads, NB = 1 or 2 MMAs of 8 rows of x.
template <int KIND, int NB>
__global__ void __launch_bounds__(kMmaThreads) mma_gemv_kernel(GemvArgs a)
{
    constexpr int MT = 8 * NB;
    constexpr int GC = mma_group_columns(KIND);
    constexpr int TN = mma_tile_columns(KIND);
    constexpr int J = GC / 2;
    constexpr int STAGE = 8 * 32; // uint2 per warp and pipeline stage: [row 4s + i][lane]
    extern __shared__ float smem[];
    size_t const region = mma_region_bytes(KIND, NB, a.k_range);
    __half* xs = reinterpret_cast<__half*>(smem);                                 // [MT][k_range] (main loop)
    float* red = smem;                                                             // [kMmaWarps][MT][TN] (after)
    uint2* pipe = reinterpret_cast<uint2*>(reinterpret_cast<char*>(smem) + region); // [warp][stage][8][32]
    float* xo = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + region + mma_pipe_bytes());

    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int const g = lane / 4;
    int const t = lane % 4;
    int64_t const k0 = static_cast<int64_t>(blockIdx.y) * a.k_range;
    int const span = static_cast<int>(min(static_cast<int64_t>(a.k_range), a.K - k0));
    int const groups = (span + kMmaGroupRows - 1) / kMmaGroupRows;
    bool const with_outliers = blockIdx.y == 0 && a.num_outliers > 0;

    int64_t const column = static_cast<int64_t>(blockIdx.x) * TN + g * GC; // this thread group's first column
    bool const columns_in = column < a.N;
    int64_t const row_bytes = a.N * bits_of(KIND) / 8;
    char const* weight = static_cast<char const*>(a.weight) + (columns_in ? column * bits_of(KIND) / 8 : 0);
    int const per_warp = (groups + kMmaWarps - 1) / kMmaWarps;
    int const first = warp * per_warp;
    int const last = min(first + per_warp, groups);
    uint2* my_pipe = pipe + warp * kMmaStages * STAGE + lane;

    // Group `group`'s rows for this thread (slice s, row 4t + i) into pipeline stage `stage`, one commit group.
    auto issue = [&](int group, int stage) {
        if (group < last)
        {
#pragma unroll
            for (int s = 0; s < 2; ++s)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                {
                    int const e = group * kMmaGroupRows + 16 * s + 4 * t + i;
                    bool const valid = columns_in && e < span;
                    cp_async_8(my_pipe + stage * STAGE + (4 * s + i) * 32,
                        weight + (valid ? (k0 + e) * row_bytes : 0), valid);
                }
        }
        cp_async_commit(); // empty groups too: wait_group counts stay uniform
    };
#pragma unroll
    for (int st = 0; st < kMmaStages - 1; ++st)
    {
        issue(first + st, st);
    }

    __half const* x = static_cast<__half const*>(a.x);
    for (int m = 0; m < a.M; ++m) // the rows of x there are (the MMA reads zeros for the others), zero-padded
    {
        for (int e = threadIdx.x; e < groups * kMmaGroupRows; e += kMmaThreads)
        {
            xs[m * a.k_range + e] = e < span ? x[m * a.K + k0 + e] : __float2half(0.0f);
        }
    }
    if (with_outliers)
    {
        for (int i = threadIdx.x; i < a.M * a.num_outliers; i += kMmaThreads)
        {
            int const m = i / a.num_outliers;
            int32_t const channel = a.outlier_channels[i - m * a.num_outliers];
            bool const valid = m < a.M && channel >= 0 && channel < a.K;
            xo[i] = valid ? __half2float(x[m * a.K + channel]) : 0.0f;
        }
    }
    __syncthreads();

    float acc[NB][J][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                acc[nb][j][i] = 0.0f;

    __half2 scale_pairs[KIND == kWeightINT4 ? GC : 1];
#pragma unroll
    for (int c = 0; c < (KIND == kWeightINT4 ? GC : 1); ++c)
    {
        scale_pairs[c] = __float2half2_rn(0.0f); // columns past N: their zero weights stay zero
    }
    int64_t scale_block = -1;
    for (int group = first; group < last; ++group)
    {
        int const stage = (group - first) % kMmaStages;
        cp_async_wait<kMmaStages - 2>(); // this thread's copies of `group` have landed (only it reads them)
        issue(group + kMmaStages - 1, (group - first + kMmaStages - 1) % kMmaStages);
#pragma unroll
        for (int s = 0; s < 2; ++s)
        {
            int const slice_row = group * kMmaGroupRows + 16 * s; // warp-uniform
            if (slice_row >= span)
            {
                break;
            }
            if constexpr (KIND == kWeightINT4)
            {
                int64_t const block = (k0 + slice_row) / a.block_size; // block_size % 16 == 0: one per slice
                if (block != scale_block && columns_in)
                {
                    __half s16[16];
                    load_halves<16>(s16, a.scales + block * a.N + column);
#pragma unroll
                    for (int c = 0; c < GC; ++c)
                    {
                        scale_pairs[c] = __half2half2(s16[c]);
                    }
                    scale_block = block;
                }
            }
            uint2 w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                w[i] = my_pipe[stage * STAGE + (4 * s + i) * 32];
            }
            uint32_t frag[J][4];
            slice_fragments<KIND>(w, scale_pairs, frag);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
            {
                uint2 const xv = 8 * nb + g < a.M
                    ? *reinterpret_cast<uint2 const*>(xs + (8 * nb + g) * a.k_range + slice_row + 4 * t)
                    : make_uint2(0u, 0u);
#pragma unroll
                for (int j = 0; j < J; ++j)
                {
                    mma_16816(acc[nb][j], frag[j], xv.x, xv.y);
                }
            }
        }
    }
    cp_async_wait<0>();

    if constexpr (KIND == kWeightINT8)
    {
        if (columns_in) // per-channel scales on the fp32 sums (linear, so per warp and split too)
        {
            __half s8[8];
            load_halves<8>(s8, a.scales + column);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int j = 0; j < J; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        acc[nb][j][i] *= __half2float(s8[2 * j + i / 2]);
        }
    }

    __syncthreads(); // xs is dead: its space takes the warps' sums
    // acc[nb][j][i]: output column g * GC + 2j + i / 2 of the tile, row of x 8nb + 2t + i % 2
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                int const m = 8 * nb + 2 * t + i % 2;
                if (m < a.M)
                {
                    red[(warp * MT + m) * TN + g * GC + 2 * j + i / 2] = acc[nb][j][i];
                }
            }
    __syncthreads();
    for (int i = threadIdx.x; i < a.M * TN; i += kMmaThreads)
    {
        int const m = i / TN;
        int const c = i % TN;
        int64_t const n = static_cast<int64_t>(blockIdx.x) * TN + c;
        if (n >= a.N)
        {
            continue;
        }
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kMmaWarps; ++w)
        {
            sum += red[(w * MT + m) * TN + c];
        }
        if (with_outliers)
        {
            for (int o = 0; o < a.num_outliers; ++o)
            {
                sum = fmaf(xo[m * a.num_outliers + o], __half2float(a.outlier_weight[o * a.N + n]), sum);
            }
        }
        store_output(a, m, n, sum);
    }
}

} // namespace
} // namespace accullm
