/*
 * Types, tile geometry and load helpers shared by the accullm GEMV and tiled GEMM (see lowBitGemm.cuh).
 * Everything lives in an unnamed namespace: each kernel library translation unit instantiates what it uses.
 */
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace accullm
{
namespace
{

enum WeightKind : int
{
    kWeightFP16 = 0,
    kWeightINT4 = 1,
    kWeightINT8 = 2,
};

// The GEMV's tuning knobs. Each can be set at compile time (-DACCULLM_GEMV_THREADS=256, ...) so that
// plugins/tune_gemv.py can sweep them on a GPU; the defaults are what that sweep picked.
#ifndef ACCULLM_GEMV_THREADS
#define ACCULLM_GEMV_THREADS 128
#endif
#ifndef ACCULLM_GEMV_ROWS_PER_BATCH
#define ACCULLM_GEMV_ROWS_PER_BATCH 8
#endif
#ifndef ACCULLM_GEMV_SEGMENT_BYTES
#define ACCULLM_GEMV_SEGMENT_BYTES 64
#endif
#ifndef ACCULLM_GEMV_TARGET_BLOCKS
#define ACCULLM_GEMV_TARGET_BLOCKS 512
#endif

constexpr int kThreads = ACCULLM_GEMV_THREADS;             // GEMV block
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBatch = ACCULLM_GEMV_ROWS_PER_BATCH; // weight rows whose loads a thread has in flight together
constexpr int kRowSegmentBytes = ACCULLM_GEMV_SEGMENT_BYTES; // bytes of one weight row that one warp reads
constexpr int kMaxGemvRows = 8;         // rows of x the GEMV takes; more go to the tiled GEMM
constexpr int kMaxFusedOutliers = 64;   // outlier channels the GEMV fuses (more: tiled GEMM)
constexpr int kTargetBlocks = ACCULLM_GEMV_TARGET_BLOCKS; // split K until about this many blocks (shape-only)
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "ACCULLM_GEMV_THREADS: whole warps, at most 1024");
static_assert(kRowSegmentBytes >= 16 && (kRowSegmentBytes & (kRowSegmentBytes - 1)) == 0,
    "ACCULLM_GEMV_SEGMENT_BYTES: a power of two, at least 16");
constexpr size_t kSmemBudget = 40 * 1024;

// Bytes each thread loads per weight row: 16 where the accumulators allow, narrower for more rows of x so that
// one thread never holds more than 64 fp32 accumulators (values_per_load * rows). A warp's loads for one row
// stay 64 contiguous bytes at every width.
__host__ __device__ constexpr int load_bytes(int kind, int mt)
{
    return kind == kWeightINT4 ? (mt <= 2 ? 16 : mt <= 4 ? 8 : 4) : kind == kWeightINT8 ? (mt <= 4 ? 16 : 8) : 16;
}
__host__ __device__ constexpr int values_per_load(int kind, int mt)
{
    return kind == kWeightINT4 ? 2 * load_bytes(kind, mt)
                               : kind == kWeightINT8 ? load_bytes(kind, mt) : load_bytes(kind, mt) / 2;
}
__host__ __device__ constexpr int chunks_per_warp(int kind, int mt)
{
    return kRowSegmentBytes / load_bytes(kind, mt) < 32 ? kRowSegmentBytes / load_bytes(kind, mt) : 32;
}
__host__ __device__ constexpr int k_lanes_per_warp(int kind, int mt)
{
    return 32 / chunks_per_warp(kind, mt);
}
__host__ __device__ constexpr int tile_columns(int kind, int mt)
{
    return chunks_per_warp(kind, mt) * values_per_load(kind, mt);
}
__host__ __device__ constexpr int k_lanes_per_block(int kind, int mt)
{
    return kWarps * k_lanes_per_warp(kind, mt);
}
__host__ __device__ constexpr int bits_of(int kind)
{
    return kind == kWeightINT4 ? 4 : kind == kWeightINT8 ? 8 : 16;
}

// One y = x @ W (+ x[:, outlier_channels] @ outlier_weight) problem.
struct GemmProblem
{
    int kind;                       // WeightKind
    bool x_is_half;                 // x is fp16, else fp32
    bool out_is_half;               // y is fp16, else fp32
    int64_t M, K, N;
    void const* x;                  // [M, K]
    void const* weight;             // see the storage note above
    __half const* scales;           // int4 / int8 only
    int block_size;                 // int4 only
    int32_t const* outlier_channels; // [num_outliers] input channels, or nullptr
    __half const* outlier_weight;   // [num_outliers, N]
    int num_outliers;
    uint8_t const* column_keep;     // GEMV only, optional [N]: columns that must be computed (others may be 0)
    bool sparse_rows;               // GEMV only: skip rows of W whose x is 0 in every row of x
    void* y;                        // [M, N]
};

// y [M, N] = x [M, K] @ weight (scales and block_size as the kind needs), no outliers and no GEMV options: the
// caller sets those.
inline GemmProblem make_problem(int kind, int64_t M, int64_t K, int64_t N, void const* x, void const* weight,
    void const* scales, int block_size, void* y)
{
    GemmProblem p{};
    p.kind = kind;
    p.M = M;
    p.K = K;
    p.N = N;
    p.x = x;
    p.weight = weight;
    p.scales = static_cast<__half const*>(scales);
    p.block_size = block_size;
    p.y = y;
    return p;
}

struct GemvArgs
{
    void const* x;
    int64_t M, K, N;
    void const* weight;
    __half const* scales;
    int block_size;
    int32_t const* outlier_channels;
    __half const* outlier_weight;
    int num_outliers;
    uint8_t const* column_keep;
    int sparse_rows;
    int k_range;                    // rows of K handled by one block (blockIdx.y)
    float* partial;                 // [gridDim.y, M, N] when gridDim.y > 1
    void* out;                      // written directly when gridDim.y == 1
    int out_is_half;
};

// One output of a GEMV block: y directly when K is not split across blocks, else this split's fp32 partial.
__device__ __forceinline__ void store_output(GemvArgs const& a, int m, int64_t n, float sum)
{
    if (gridDim.y > 1)
    {
        a.partial[(static_cast<int64_t>(blockIdx.y) * a.M + m) * a.N + n] = sum;
    }
    else if (a.out_is_half)
    {
        static_cast<__half*>(a.out)[m * a.N + n] = __float2half_rn(sum);
    }
    else
    {
        static_cast<float*>(a.out)[m * a.N + n] = sum;
    }
}

struct GemvPlan
{
    int mt;
    int k_range;
    int splits;
    int n_tiles;
    size_t smem_bytes;
};

template <typename TX>
__device__ __forceinline__ float to_float(TX value);
template <>
__device__ __forceinline__ float to_float<__half>(__half value)
{
    return __half2float(value);
}
template <>
__device__ __forceinline__ float to_float<float>(float value)
{
    return value;
}

template <int BYTES>
__device__ __forceinline__ void load_words(uint32_t (&words)[BYTES / 4], char const* address)
{
    if constexpr (BYTES == 16)
    {
        uint4 const v = __ldg(reinterpret_cast<uint4 const*>(address));
        words[0] = v.x;
        words[1] = v.y;
        words[2] = v.z;
        words[3] = v.w;
    }
    else if constexpr (BYTES == 8)
    {
        uint2 const v = __ldg(reinterpret_cast<uint2 const*>(address));
        words[0] = v.x;
        words[1] = v.y;
    }
    else
    {
        words[0] = __ldg(reinterpret_cast<unsigned int const*>(address));
    }
}

// V consecutive fp16 values (16-byte aligned, V a multiple of 8) as halves.
template <int V>
__device__ __forceinline__ void load_halves(__half (&out)[V], __half const* address)
{
#pragma unroll
    for (int i = 0; i < V / 8; ++i)
    {
        uint4 const v = __ldg(reinterpret_cast<uint4 const*>(address) + i);
        uint32_t const words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int w = 0; w < 4; ++w)
        {
            __half2 const pair = *reinterpret_cast<__half2 const*>(&words[w]);
            out[8 * i + 2 * w] = __low2half(pair);
            out[8 * i + 2 * w + 1] = __high2half(pair);
        }
    }
}

} // namespace
} // namespace accullm
