/*
 * Shared CUDA building blocks of the accullm kernels: y = x @ W for weights stored as fp16, blocked int4 or
 * per-channel int8, with an optional fp16 outlier branch, in two shapes:
 *
 *   - a decode GEMV for 1..8 rows of x (gemv_kernel): every weight byte is read once, with coalesced 4..16-byte
 *     loads (a warp reads 64 contiguous bytes of each of several rows), several outputs per thread, fp32
 *     accumulation, a warp-shuffle then shared-memory reduction, and split-K across blocks when N alone gives
 *     too few blocks (partials in fp32, summed by reduce_partials_kernel);
 *   - a plain tiled GEMM (tiled_gemm_kernel) for more rows (prefill) or shapes the GEMV does not take.
 *
 * Storage (all row-major, [K, N] = [input, output] as ONNX MatMul weights):
 *   fp16  element (k, n) at k*N + n.
 *   int4  element (k, n) is the nibble at flat index k*N + n, two per byte, low nibble first (ONNX's packing);
 *         symmetric, zero point 0; scales fp16 [ceil(K / block_size), N] (block along K).
 *   int8  element (k, n) at k*N + n; scales fp16 [N] (one per output channel).
 *
 * Dequantization follows ONNX DequantizeLinear with fp16 scales: q * scale is rounded to fp16 (int4), then
 * products with x accumulate in fp32. int8 applies its per-channel scale once to the fp32 column sum.
 *
 * Nothing here knows about TensorRT. gemmCommon.cuh holds the types and tile geometry, gemvKernel.cuh and
 * tiledGemmKernel.cuh the kernels; this header adds the host side (which path, how many K splits, how much
 * workspace) and run_gemm, the one entry point the kernel libraries call.
 */
#pragma once

#include "gemmCommon.cuh"
#include "gemvKernel.cuh"
#include "mmaGemvKernel.cuh"
#include "tiledGemmKernel.cuh"

namespace accullm
{
namespace
{

// Host side: which path, how many K splits, how much workspace. Deterministic in the shapes alone, so the
// workspace a TensorRT build reserves is the one enqueue needs on any device.

inline int gemv_rows_tile(int64_t M)
{
    return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
}

inline bool aligned16(void const* pointer)
{
    return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0;
}

// Whether the GEMV takes this problem (max_rows: the most rows of x the caller instantiated it for).
inline bool gemv_applies(GemmProblem const& p, int max_rows)
{
    if (p.M < 1 || p.M > max_rows || p.num_outliers > kMaxFusedOutliers)
    {
        return false;
    }
    int const mt = gemv_rows_tile(p.M);
    int const v = values_per_load(p.kind, mt);
    bool const scales_ok = p.kind == kWeightFP16 || aligned16(p.scales);
    bool const outliers_ok = p.num_outliers == 0 || aligned16(p.outlier_weight);
    // shared memory: the fixed part (outlier x, reduction tile) and at least one batch of rows per k-lane
    size_t const fixed = sizeof(float) * (static_cast<size_t>(mt) * p.num_outliers
                                             + static_cast<size_t>(kWarps) * mt * tile_columns(p.kind, mt));
    size_t const rows = static_cast<size_t>(k_lanes_per_block(p.kind, mt)) * kRowsPerBatch;
    bool const smem_ok = fixed + sizeof(float) * (mt + 1) * rows <= kSmemBudget;
    return p.N % v == 0 && aligned16(p.weight) && scales_ok && outliers_ok && smem_ok && p.K < (int64_t{1} << 31);
}

inline GemvPlan plan_gemv(GemmProblem const& p)
{
    GemvPlan plan{};
    plan.mt = gemv_rows_tile(p.M);
    int const k_lanes = k_lanes_per_block(p.kind, plan.mt);
    int const columns = tile_columns(p.kind, plan.mt);
    plan.n_tiles = static_cast<int>((p.N + columns - 1) / columns);
    size_t const fixed = sizeof(float) * (static_cast<size_t>(plan.mt) * p.num_outliers
                                             + static_cast<size_t>(kWarps) * plan.mt * columns);
    size_t const per_row = sizeof(float) * (plan.mt + (p.sparse_rows ? 1 : 0));
    int64_t const max_rows = static_cast<int64_t>((kSmemBudget - fixed) / per_row);
    int64_t rows_per_lane = kRowsPerBatch;
    // Longer runs per k-lane (fewer splits, less partial traffic) while enough blocks remain.
    while (k_lanes * rows_per_lane * 2 <= max_rows && k_lanes * rows_per_lane < p.K)
    {
        int64_t const next = k_lanes * rows_per_lane * 2;
        int64_t const splits = (p.K + next - 1) / next;
        if (plan.n_tiles * splits < kTargetBlocks)
        {
            break;
        }
        rows_per_lane *= 2;
    }
    int64_t const k_range = std::min<int64_t>(k_lanes * rows_per_lane, std::max<int64_t>(p.K, 1));
    plan.k_range = static_cast<int>(k_range);
    plan.splits = static_cast<int>((p.K + k_range - 1) / k_range);
    plan.smem_bytes = fixed + per_row * static_cast<size_t>(k_range);
    return plan;
}

// The tensor-core GEMV (mmaGemvKernel.cuh): fp16 x, int4 with blocks of a multiple of 16 or int8, kMinMmaRows
// (1) to 16 rows, no GEMV options: it needs fewer instructions per weight than the CUDA-core GEMV, which
// instruction issue bounds. `device_ok` is whether the device has mma.sync (sm_80+); the workspace assumes it has.
inline bool mma_gemv_applies(GemmProblem const& p, bool device_ok = true)
{
    bool const kind_ok = (p.kind == kWeightINT4 && p.block_size > 0 && p.block_size % 16 == 0)
        || p.kind == kWeightINT8;
    return device_ok && kind_ok && p.x_is_half && p.M >= kMinMmaRows && p.M <= kMaxMmaRows
        && p.N % mma_group_columns(p.kind) == 0 && p.num_outliers <= kMaxFusedOutliers && p.column_keep == nullptr
        && !p.sparse_rows && aligned16(p.weight) && aligned16(p.scales) && p.K < (int64_t{1} << 31);
}

inline bool device_has_mma()
{
    int device = 0;
    int major = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    {
        return false;
    }
    return major >= 8;
}

inline GemvPlan plan_mma_gemv(GemmProblem const& p)
{
    GemvPlan plan{};
    plan.mt = p.M <= 8 ? 8 : 16;
    int const columns = mma_tile_columns(p.kind);
    plan.n_tiles = static_cast<int>((p.N + columns - 1) / columns);
    int64_t const cap = static_cast<int64_t>(kMmaStageBytes / (sizeof(__half) * plan.mt));
    int64_t k_range = int64_t{kMmaWarps} * kMmaGroupRows;
    // Longer runs per warp (fewer splits, less partial traffic) while enough blocks remain.
    while (k_range * 2 <= cap && k_range < p.K)
    {
        int64_t const splits = (p.K + 2 * k_range - 1) / (2 * k_range);
        if (plan.n_tiles * splits < kMmaTargetBlocks)
        {
            break;
        }
        k_range *= 2;
    }
    plan.k_range = static_cast<int>(k_range);
    plan.splits = static_cast<int>((p.K + k_range - 1) / k_range);
    plan.smem_bytes = mma_region_bytes(p.kind, plan.mt / 8, plan.k_range) + mma_pipe_bytes()
        + sizeof(float) * plan.mt * p.num_outliers;
    return plan;
}

// The fp32 split-K partials [splits, M, N] a plan needs in the workspace (0 when it does not split K).
inline size_t partial_bytes(GemmProblem const& p, GemvPlan const& plan)
{
    return plan.splits > 1 ? sizeof(float) * static_cast<size_t>(plan.splits) * p.M * p.N : 0;
}

inline size_t gemm_workspace_bytes(GemmProblem const& p, int max_gemv_rows)
{
    size_t bytes = mma_gemv_applies(p) ? partial_bytes(p, plan_mma_gemv(p)) : 0;
    if (gemv_applies(p, max_gemv_rows)) // the CUDA-core GEMV: devices without mma.sync
    {
        bytes = std::max(bytes, partial_bytes(p, plan_gemv(p)));
    }
    return bytes;
}

template <int KIND, int NB>
cudaError_t launch_mma_gemv_tile(GemvArgs const& a, GemvPlan const& plan, cudaStream_t stream)
{
    if (plan.smem_bytes > 48 * 1024)
    {
        cudaError_t const status = cudaFuncSetAttribute(
            mma_gemv_kernel<KIND, NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
        if (status != cudaSuccess)
        {
            return status;
        }
    }
    dim3 const grid(plan.n_tiles, plan.splits);
    mma_gemv_kernel<KIND, NB><<<grid, kMmaThreads, plan.smem_bytes, stream>>>(a);
    return cudaGetLastError();
}

inline GemvArgs gemv_args(GemmProblem const& p, GemvPlan const& plan, float* partial)
{
    GemvArgs a{};
    a.x = p.x;
    a.M = p.M;
    a.K = p.K;
    a.N = p.N;
    a.weight = p.weight;
    a.scales = p.scales;
    a.block_size = p.block_size;
    a.outlier_channels = p.outlier_channels;
    a.outlier_weight = p.outlier_weight;
    a.num_outliers = p.num_outliers;
    a.column_keep = p.column_keep;
    a.sparse_rows = p.sparse_rows ? 1 : 0;
    a.k_range = plan.k_range;
    a.partial = partial;
    a.out = p.y;
    a.out_is_half = p.out_is_half ? 1 : 0;
    return a;
}

template <int KIND, int MT, typename TX>
cudaError_t launch_gemv_tile(GemmProblem const& p, GemvPlan const& plan, float* partial, cudaStream_t stream)
{
    dim3 const grid(plan.n_tiles, plan.splits);
    gemv_kernel<KIND, MT, TX><<<grid, kThreads, plan.smem_bytes, stream>>>(gemv_args(p, plan, partial));
    return cudaGetLastError();
}

template <int KIND, typename TX, int MAX_MT>
cudaError_t launch_gemv(GemmProblem const& p, GemvPlan const& plan, float* partial, cudaStream_t stream)
{
    if constexpr (MAX_MT >= 8)
    {
        if (plan.mt == 8)
        {
            return launch_gemv_tile<KIND, 8, TX>(p, plan, partial, stream);
        }
    }
    if constexpr (MAX_MT >= 4)
    {
        if (plan.mt == 4)
        {
            return launch_gemv_tile<KIND, 4, TX>(p, plan, partial, stream);
        }
    }
    if constexpr (MAX_MT >= 2)
    {
        if (plan.mt == 2)
        {
            return launch_gemv_tile<KIND, 2, TX>(p, plan, partial, stream);
        }
    }
    return launch_gemv_tile<KIND, 1, TX>(p, plan, partial, stream);
}

// The split-K partials' sum into y, when the plan split K (partial: [splits, M, N] fp32).
inline cudaError_t reduce_partials(GemmProblem const& p, GemvPlan const& plan, float const* partial,
    cudaStream_t stream)
{
    int64_t const count = p.M * p.N;
    int const blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
    reduce_partials_kernel<<<blocks, 256, 0, stream>>>(partial, plan.splits, count, p.y, p.out_is_half ? 1 : 0);
    return cudaGetLastError();
}

// Run a GEMV plan: `launch(partial)` with the fp32 partials in `workspace` when the plan splits K (nullptr when
// it does not), then their sum into y. Both GEMVs go through here.
template <typename Launch>
cudaError_t run_plan(GemmProblem const& p, GemvPlan const& plan, void* workspace, size_t workspace_bytes,
    cudaStream_t stream, Launch const& launch)
{
    size_t const needed = partial_bytes(p, plan);
    if (needed > 0 && (workspace == nullptr || workspace_bytes < needed))
    {
        return cudaErrorInvalidValue;
    }
    float* partial = needed > 0 ? static_cast<float*>(workspace) : nullptr;
    cudaError_t const status = launch(partial);
    if (status != cudaSuccess || partial == nullptr)
    {
        return status;
    }
    return reduce_partials(p, plan, partial, stream);
}

// y = x @ W (+ outliers) for one problem on `stream`. The caller dispatches KIND and TX; MAX_MT bounds the GEMV
// row tiles instantiated (1, 2, 4 or 8). workspace must hold gemm_workspace_bytes(p, MAX_MT).
template <int KIND, typename TX, int MAX_MT>
cudaError_t run_gemm(GemmProblem const& p, void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    if (p.M == 0 || p.N == 0)
    {
        return cudaSuccess;
    }
    if constexpr (std::is_same<TX, __half>::value && KIND != kWeightFP16)
    {
        if (mma_gemv_applies(p, device_has_mma()))
        {
            GemvPlan const plan = plan_mma_gemv(p);
            return run_plan(p, plan, workspace, workspace_bytes, stream, [&](float* partial) {
                GemvArgs const a = gemv_args(p, plan, partial);
                return plan.mt == 8 ? launch_mma_gemv_tile<KIND, 1>(a, plan, stream)
                                    : launch_mma_gemv_tile<KIND, 2>(a, plan, stream);
            });
        }
    }
    if (!gemv_applies(p, MAX_MT))
    {
        dim3 const grid(static_cast<unsigned>((p.N + kTileN - 1) / kTileN),
            static_cast<unsigned>((p.M + kTileM - 1) / kTileM));
        tiled_gemm_kernel<KIND, TX><<<grid, kTiledThreads, 0, stream>>>(p);
        return cudaGetLastError();
    }
    GemvPlan const plan = plan_gemv(p);
    return run_plan(p, plan, workspace, workspace_bytes, stream,
        [&](float* partial) { return launch_gemv<KIND, TX, MAX_MT>(p, plan, partial, stream); });
}

} // namespace
} // namespace accullm
