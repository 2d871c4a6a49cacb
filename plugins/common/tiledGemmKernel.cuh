/*
 * The tiled GEMM of lowBitGemm.cuh: prefill (more than 8 rows) and the shapes the GEMV does not take.
 */
#pragma once

#include "gemmCommon.cuh"

namespace accullm
{
namespace
{

// 64x64 outputs per block, 4x4 per thread, K in steps of 16 through shared memory, weights dequantized on their
// way into shared memory, the outlier rows as extra K steps. Any M, K, N; CUDA cores, not tensor cores.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kTiledThreads = 256;

template <int KIND>
__device__ __forceinline__ float dequantized(GemmProblem const& p, int64_t k, int64_t n)
{
    if constexpr (KIND == kWeightFP16)
    {
        return __half2float(static_cast<__half const*>(p.weight)[k * p.N + n]);
    }
    else if constexpr (KIND == kWeightINT8)
    {
        float const q = static_cast<float>(static_cast<int8_t const*>(p.weight)[k * p.N + n]);
        return q * __half2float(p.scales[n]);
    }
    else
    {
        int64_t const flat = k * p.N + n;
        uint8_t const byte = static_cast<uint8_t const*>(p.weight)[flat >> 1];
        int const nibble = (flat & 1) ? (byte >> 4) : (byte & 0xF);
        int const q = nibble >= 8 ? nibble - 16 : nibble;
        return __half2float(__hmul(__int2half_rn(q), p.scales[(k / p.block_size) * p.N + n]));
    }
}

// stage(fast, slow) for every element of a FAST x SLOW tile, the block's threads on consecutive `fast` (so that
// the global loads along `fast` coalesce).
template <int FAST, int SLOW, typename Stage>
__device__ __forceinline__ void for_each_tile_element(Stage const& stage)
{
    for (int i = threadIdx.x; i < FAST * SLOW; i += kTiledThreads)
    {
        stage(i % FAST, i / FAST);
    }
}

template <int KIND, typename TX>
__global__ void __launch_bounds__(kTiledThreads) tiled_gemm_kernel(GemmProblem p)
{
    __shared__ float xs[kTileK][kTileM + 1];
    __shared__ float ws[kTileK][kTileN];
    TX const* x = static_cast<TX const*>(p.x);
    int const tx = threadIdx.x % 16;
    int const ty = threadIdx.x / 16;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    int64_t const n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
    float acc[4][4] = {};

    // Main weight rows, then the outlier rows (x gathered at the outlier channels, fp16 weights).
    int64_t const main_steps = (p.K + kTileK - 1) / kTileK;
    int64_t const outlier_steps = (p.num_outliers + kTileK - 1) / kTileK;
    for (int64_t step = 0; step < main_steps + outlier_steps; ++step)
    {
        bool const outlier = step >= main_steps;
        int64_t const kb = (outlier ? step - main_steps : step) * kTileK;
        int64_t const k_end = outlier ? p.num_outliers : p.K;
        for_each_tile_element<kTileK, kTileM>([&](int kk, int mm) {
            int64_t const m = m0 + mm;
            int64_t const k = kb + kk;
            float v = 0.0f;
            if (m < p.M && k < k_end)
            {
                int64_t const channel = outlier ? p.outlier_channels[k] : k;
                v = (channel >= 0 && channel < p.K) ? to_float<TX>(x[m * p.K + channel]) : 0.0f;
            }
            xs[kk][mm] = v;
        });
        for_each_tile_element<kTileN, kTileK>([&](int nn, int kk) {
            int64_t const n = n0 + nn;
            int64_t const k = kb + kk;
            float v = 0.0f;
            if (n < p.N && k < k_end)
            {
                v = outlier ? __half2float(p.outlier_weight[k * p.N + n]) : dequantized<KIND>(p, k, n);
            }
            ws[kk][nn] = v;
        });
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk)
        {
            float xv[4];
            float wv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                xv[i] = xs[kk][ty + 16 * i];
                wv[i] = ws[kk][tx + 16 * i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int64_t const m = m0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            int64_t const n = n0 + tx + 16 * j;
            if (m < p.M && n < p.N)
            {
                if (p.out_is_half)
                {
                    static_cast<__half*>(p.y)[m * p.N + n] = __float2half_rn(acc[i][j]);
                }
                else
                {
                    static_cast<float*>(p.y)[m * p.N + n] = acc[i][j];
                }
            }
        }
    }
}

} // namespace
} // namespace accullm
