/*
 * The decode GEMV (1..8 rows of x) of lowBitGemm.cuh: each weight byte read once with coalesced 4..16-byte loads
 * (a warp reads 64 contiguous bytes of each of several rows), several outputs per thread, fp32 accumulation,
 * warp-shuffle then shared-memory reduction, split-K partials summed by reduce_partials_kernel.
 */
#pragma once

#include "gemmCommon.cuh"

namespace accullm
{
namespace
{

// int4 word (8 nibbles, element j at bits 4j..4j+3) times scales, accumulated: the nibbles become exact fp16
// integers with the 1024-bias trick (no integer-to-float conversion instructions), two per half2.
// scale_pairs[4w + k] holds (scale[8w + k], scale[8w + k + 4]).
template <int MT, int V>
__device__ __forceinline__ void accumulate_int4(
    float (&acc)[MT][V], uint32_t const* words, __half2 const* scale_pairs, float const (&xv)[MT])
{
#pragma unroll
    for (int w = 0; w < V / 8; ++w)
    {
        uint32_t const biased = words[w] ^ 0x88888888u; // signed nibble e -> e + 8 in 0..15
#pragma unroll
        for (int k = 0; k < 4; ++k)
        {
            uint32_t const bits = ((biased >> (4 * k)) & 0x000F000Fu) | 0x64006400u; // (1024 + u, 1024 + u')
            __half2 const q = __hsub2(*reinterpret_cast<__half2 const*>(&bits), __float2half2_rn(1032.0f));
            float2 const w2 = __half22float2(__hmul2(q, scale_pairs[4 * w + k]));
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                acc[m][8 * w + k] = fmaf(xv[m], w2.x, acc[m][8 * w + k]);
                acc[m][8 * w + k + 4] = fmaf(xv[m], w2.y, acc[m][8 * w + k + 4]);
            }
        }
    }
}

// int8 word (4 signed bytes) accumulated unscaled: byte b -> float via the 2^23 exponent trick.
template <int MT, int V>
__device__ __forceinline__ void accumulate_int8(
    float (&acc)[MT][V], uint32_t const* words, float const (&xv)[MT])
{
#pragma unroll
    for (int w = 0; w < V / 4; ++w)
    {
        uint32_t const biased = words[w] ^ 0x80808080u;
#pragma unroll
        for (int b = 0; b < 4; ++b)
        {
            float const q = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | b)) - 8388736.0f;
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                acc[m][4 * w + b] = fmaf(xv[m], q, acc[m][4 * w + b]);
            }
        }
    }
}

template <int MT, int V>
__device__ __forceinline__ void accumulate_fp16(
    float (&acc)[MT][V], uint32_t const* words, float const (&xv)[MT])
{
#pragma unroll
    for (int w = 0; w < V / 2; ++w)
    {
        float2 const f = __half22float2(*reinterpret_cast<__half2 const*>(&words[w]));
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            acc[m][2 * w] = fmaf(xv[m], f.x, acc[m][2 * w]);
            acc[m][2 * w + 1] = fmaf(xv[m], f.y, acc[m][2 * w + 1]);
        }
    }
}

// Stage this block's rows of x into shared memory (fp32). Dense: rows k0 .. k0 + span. Sparse: only the rows
// where some row of x is non-zero, compacted in order (row indices in `rows`). Returns the staged count.
template <int MT, typename TX>
__device__ int stage_x(GemvArgs const& a, float* xs, int* rows, int64_t k0, int span)
{
    TX const* x = static_cast<TX const*>(a.x);
    if (!a.sparse_rows)
    {
        for (int i = threadIdx.x; i < MT * span; i += kThreads)
        {
            int const m = i / span;
            int const e = i - m * span;
            xs[m * a.k_range + e] = m < a.M ? to_float<TX>(x[m * a.K + k0 + e]) : 0.0f;
        }
        return span;
    }
    __shared__ int warp_counts[kWarps];
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int base = 0;
    for (int start = 0; start < span; start += kThreads)
    {
        int const e = start + threadIdx.x;
        float v[MT];
        bool nonzero = false;
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            v[m] = (e < span && m < a.M) ? to_float<TX>(x[m * a.K + k0 + e]) : 0.0f;
            nonzero |= v[m] != 0.0f;
        }
        unsigned const ballot = __ballot_sync(0xffffffffu, nonzero);
        if (lane == 0)
        {
            warp_counts[warp] = __popc(ballot);
        }
        __syncthreads();
        int offset = base;
        int total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
        {
            offset += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        if (nonzero)
        {
            int const position = offset + __popc(ballot & ((1u << lane) - 1u));
            rows[position] = static_cast<int>(k0 + e);
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                xs[m * a.k_range + position] = v[m];
            }
        }
        base += total;
        __syncthreads();
    }
    return base;
}

// Decode GEMV: grid (ceil(N / tile_columns), splits), kThreads threads. In a warp, lane % CH picks the column
// chunk (V columns, VB bytes of a row) and lane / CH the k-lane; the block's k-lanes share its rows of K.
template <int KIND, int MT>
struct GemvTile
{
    static constexpr int VB = load_bytes(KIND, MT);
    static constexpr int V = values_per_load(KIND, MT);
    static constexpr int CH = chunks_per_warp(KIND, MT);
    static constexpr int KLW = k_lanes_per_warp(KIND, MT);
    static constexpr int TN = tile_columns(KIND, MT);
    static constexpr int KLB = k_lanes_per_block(KIND, MT);
    static constexpr int WORDS = VB / 4;
};

// x at the outlier channels, for the block on the first K slice: xo[m * num_outliers + j].
template <int MT, typename TX>
__device__ void stage_outlier_x(GemvArgs const& a, float* xo)
{
    TX const* x = static_cast<TX const*>(a.x);
    for (int i = threadIdx.x; i < MT * a.num_outliers; i += kThreads)
    {
        int const m = i / a.num_outliers;
        int32_t const channel = a.outlier_channels[i - m * a.num_outliers];
        bool const valid = m < a.M && channel >= 0 && channel < a.K;
        xo[i] = valid ? to_float<TX>(x[m * a.K + channel]) : 0.0f;
    }
}

// Whether this thread's V columns exist and (with column_keep) hold a column that must be computed.
template <int V>
__device__ bool chunk_active(GemvArgs const& a, int64_t n0)
{
    if (n0 >= a.N)
    {
        return false;
    }
    if (a.column_keep == nullptr)
    {
        return true;
    }
    bool any = false;
#pragma unroll
    for (int j = 0; j < V; ++j)
    {
        any |= a.column_keep[n0 + j] != 0;
    }
    return any;
}

// int4 scales of the block holding `row` for this thread's columns, as (s[8w + k], s[8w + k + 4]) pairs.
template <int V>
__device__ void load_scale_pairs(GemvArgs const& a, int block, int64_t n0, __half2 (&pairs)[V / 2])
{
    __half s[V];
    load_halves<V>(s, a.scales + static_cast<int64_t>(block) * a.N + n0);
#pragma unroll
    for (int w = 0; w < V / 8; ++w)
    {
#pragma unroll
        for (int k = 0; k < 4; ++k)
        {
            pairs[4 * w + k] = __halves2half2(s[8 * w + k], s[8 * w + k + 4]);
        }
    }
}

// acc += x[:, rows] @ W[rows, n0 : n0 + V] over this k-lane's share of the staged rows, kRowsPerBatch loads in flight.
template <int KIND, int MT>
__device__ void accumulate_rows(GemvArgs const& a, float const* xs, int const* rows, int64_t k0, int count,
    int k_lane, int64_t n0, float (&acc)[MT][GemvTile<KIND, MT>::V])
{
    using T = GemvTile<KIND, MT>;
    constexpr int R = kRowsPerBatch;
    char const* weight = static_cast<char const*>(a.weight);
    int64_t const row_bytes = a.N * bits_of(KIND) / 8;
    int64_t const column_byte = n0 * bits_of(KIND) / 8;
    int const per_lane = (count + T::KLB - 1) / T::KLB;
    int const first = k_lane * per_lane;
    int const last = min(first + per_lane, count);
    __half2 scale_pairs[KIND == kWeightINT4 ? T::V / 2 : 1];
    int block_begin = 0; // rows [block_begin, block_end) share scale_pairs; a lane's rows only increase, so this
    int block_end = 0;   // costs one integer division per int4 block, not one per row

    for (int e0 = first; e0 < last; e0 += R)
    {
        uint32_t words[R][T::WORDS];
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            if (e0 + r < last)
            {
                int64_t const row = a.sparse_rows ? rows[e0 + r] : k0 + e0 + r;
                load_words<T::VB>(words[r], weight + row * row_bytes + column_byte);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            int const e = e0 + r;
            if (e >= last)
            {
                continue;
            }
            float xv[MT];
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                xv[m] = xs[m * a.k_range + e];
            }
            if constexpr (KIND == kWeightINT4)
            {
                int const row = a.sparse_rows ? rows[e] : static_cast<int>(k0 + e);
                if (row >= block_end || row < block_begin)
                {
                    int const block = row / a.block_size;
                    block_begin = block * a.block_size;
                    block_end = block_begin + a.block_size;
                    load_scale_pairs<T::V>(a, block, n0, scale_pairs);
                }
                accumulate_int4<MT, T::V>(acc, words[r], scale_pairs, xv);
            }
            else if constexpr (KIND == kWeightINT8)
            {
                accumulate_int8<MT, T::V>(acc, words[r], xv);
            }
            else
            {
                accumulate_fp16<MT, T::V>(acc, words[r], xv);
            }
        }
    }
}

// int8: the column scales, once per thread (linear, so per split-K partial too).
template <int MT, int V>
__device__ void apply_column_scales(GemvArgs const& a, int64_t n0, float (&acc)[MT][V])
{
    __half s[V];
    load_halves<V>(s, a.scales + n0);
#pragma unroll
    for (int j = 0; j < V; ++j)
    {
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            acc[m][j] *= __half2float(s[j]);
        }
    }
}

// acc += x[:, outlier_channels] @ outlier_weight[:, n0 : n0 + V] over this k-lane's share of the outlier rows.
template <int MT, int V, int KLB>
__device__ void add_outliers(GemvArgs const& a, float const* xo, int k_lane, int64_t n0, float (&acc)[MT][V])
{
    for (int j = k_lane; j < a.num_outliers; j += KLB)
    {
        __half w[V];
        load_halves<V>(w, a.outlier_weight + j * a.N + n0);
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            float const xv = xo[m * a.num_outliers + j];
#pragma unroll
            for (int c = 0; c < V; ++c)
            {
                acc[m][c] = fmaf(xv, __half2float(w[c]), acc[m][c]);
            }
        }
    }
}

// Sum the k-lanes (warp shuffles over lanes chunk, chunk + CH, ..., then the warps through shared memory) and write
// the block's tile: y directly when K is not split, else this split's fp32 partial.
template <int KIND, int MT>
__device__ void reduce_and_store(GemvArgs const& a, float (&acc)[MT][GemvTile<KIND, MT>::V], float* red)
{
    using T = GemvTile<KIND, MT>;
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
#pragma unroll
    for (int offset = T::CH; offset < 32; offset <<= 1)
    {
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
#pragma unroll
            for (int j = 0; j < T::V; ++j)
            {
                acc[m][j] += __shfl_xor_sync(0xffffffffu, acc[m][j], offset);
            }
        }
    }
    if (lane < T::CH)
    {
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
#pragma unroll
            for (int j = 0; j < T::V; ++j)
            {
                red[(warp * MT + m) * T::TN + lane * T::V + j] = acc[m][j];
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < MT * T::TN; i += kThreads)
    {
        int const m = i / T::TN;
        int const c = i - m * T::TN;
        int64_t const n = static_cast<int64_t>(blockIdx.x) * T::TN + c;
        if (m >= a.M || n >= a.N)
        {
            continue;
        }
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
        {
            sum += red[(w * MT + m) * T::TN + c];
        }
        store_output(a, m, n, sum);
    }
}

template <int KIND, int MT, typename TX>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a)
{
    using T = GemvTile<KIND, MT>;
    extern __shared__ float smem[];
    bool const with_outliers = blockIdx.y == 0 && a.num_outliers > 0;
    float* xs = smem;                                                             // [MT][k_range]
    int* rows = reinterpret_cast<int*>(xs + MT * a.k_range);                      // [k_range] (sparse only)
    float* xo = reinterpret_cast<float*>(rows + (a.sparse_rows ? a.k_range : 0)); // [MT][num_outliers]
    float* red = xo + (with_outliers ? MT * a.num_outliers : 0);                  // [kWarps][MT][TN]

    int const lane = threadIdx.x % 32;
    int const k_lane = (threadIdx.x / 32) * T::KLW + lane / T::CH;
    int64_t const n0 = static_cast<int64_t>(blockIdx.x) * T::TN + (lane % T::CH) * T::V;
    int64_t const k0 = static_cast<int64_t>(blockIdx.y) * a.k_range;
    int const span = static_cast<int>(min(static_cast<int64_t>(a.k_range), a.K - k0));

    int const count = stage_x<MT, TX>(a, xs, rows, k0, span);
    if (with_outliers)
    {
        stage_outlier_x<MT, TX>(a, xo);
    }
    __syncthreads();

    float acc[MT][T::V];
#pragma unroll
    for (int m = 0; m < MT; ++m)
    {
#pragma unroll
        for (int j = 0; j < T::V; ++j)
        {
            acc[m][j] = 0.0f;
        }
    }
    if (chunk_active<T::V>(a, n0))
    {
        accumulate_rows<KIND, MT>(a, xs, rows, k0, count, k_lane, n0, acc);
        if constexpr (KIND == kWeightINT8)
        {
            apply_column_scales<MT, T::V>(a, n0, acc);
        }
        if (with_outliers)
        {
            add_outliers<MT, T::V, T::KLB>(a, xo, k_lane, n0, acc);
        }
    }
    reduce_and_store<KIND, MT>(a, acc, red);
}

__global__ void reduce_partials_kernel(float const* partial, int splits, int64_t count, void* out, int out_is_half)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s)
        {
            sum += partial[s * count + i];
        }
        if (out_is_half)
        {
            static_cast<__half*>(out)[i] = __float2half_rn(sum);
        }
        else
        {
            static_cast<float*>(out)[i] = sum;
        }
    }
}

} // namespace
} // namespace accullm
