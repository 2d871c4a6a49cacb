/*
 * accullm::OutlierSplitGemm (version 1): the C ABI entry points over the shared low-bit GEMV / tiled GEMM.
 * See OutlierSplitGemmKernel.h for the contract and ../common/lowBitGemm.cuh for the kernels.
 */
#include "OutlierSplitGemmKernel.h"

#include "../common/lowBitGemm.cuh"

namespace
{

using accullm::GemmProblem;

constexpr int kMaxDecodeRows = accullm::kMaxGemvRows;

bool valid_quantization(int32_t bits, int32_t block_size)
{
    return (bits == 4 && block_size > 0) || (bits == 8 && block_size == 0);
}

// A problem with 16-byte aligned stand-in pointers: what the GEMV would plan for these shapes.
GemmProblem shape_only_problem(int64_t rows, int64_t in_features, int64_t out_features, int32_t num_outliers,
    int32_t bits, int32_t block_size)
{
    alignas(16) static __half const kAligned[8] = {};
    GemmProblem p = accullm::make_problem(bits == 4 ? accullm::kWeightINT4 : accullm::kWeightINT8, rows,
        in_features, out_features, nullptr, kAligned, kAligned, block_size, nullptr);
    p.outlier_weight = kAligned;
    p.num_outliers = num_outliers;
    return p;
}

template <typename TX, int KIND>
cudaError_t run(GemmProblem const& p, void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    return accullm::run_gemm<KIND, TX, kMaxDecodeRows>(p, workspace, workspace_bytes, stream);
}

} // namespace

extern "C" size_t accullm_outlier_split_gemm_workspace_size(int64_t max_rows, int64_t in_features,
    int64_t out_features, int32_t num_outliers, int32_t bits, int32_t block_size)
{
    if (!valid_quantization(bits, block_size) || max_rows < 1 || in_features < 1 || out_features < 1
        || num_outliers < 0)
    {
        return 0;
    }
    size_t bytes = 0; // the most any row count up to max_rows needs, with fp16 or fp32 x
    int64_t const gemv_rows = std::max<int64_t>(kMaxDecodeRows, accullm::kMaxMmaRows);
    for (int64_t rows = 1; rows <= std::min<int64_t>(max_rows, gemv_rows); ++rows)
    {
        for (bool const x_is_half : {false, true})
        {
            GemmProblem p = shape_only_problem(rows, in_features, out_features, num_outliers, bits, block_size);
            p.x_is_half = x_is_half;
            bytes = std::max(bytes, accullm::gemm_workspace_bytes(p, kMaxDecodeRows));
        }
    }
    return bytes;
}

extern "C" int accullm_outlier_split_gemm(void const* x, void const* weight, void const* scales,
    int32_t const* outlier_channels, void const* outlier_weight, void* y, int64_t rows, int64_t in_features,
    int64_t out_features, int32_t num_outliers, int32_t bits, int32_t block_size, int32_t io_dtype,
    void* workspace, size_t workspace_bytes, void* stream)
{
    if (!valid_quantization(bits, block_size) || rows < 0 || in_features < 1 || out_features < 0
        || num_outliers < 0 || (io_dtype != ACCULLM_DTYPE_FLOAT16 && io_dtype != ACCULLM_DTYPE_FLOAT32))
    {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || out_features == 0)
    {
        return cudaSuccess;
    }
    if (x == nullptr || weight == nullptr || scales == nullptr || y == nullptr
        || (num_outliers > 0 && (outlier_channels == nullptr || outlier_weight == nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    GemmProblem p = shape_only_problem(rows, in_features, out_features, num_outliers, bits, block_size);
    p.x = x;
    p.weight = weight;
    p.scales = static_cast<__half const*>(scales);
    p.outlier_channels = outlier_channels;
    p.outlier_weight = static_cast<__half const*>(outlier_weight);
    p.x_is_half = io_dtype == ACCULLM_DTYPE_FLOAT16;
    p.out_is_half = p.x_is_half;
    p.y = y;
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    if (p.x_is_half)
    {
        return bits == 4 ? run<__half, accullm::kWeightINT4>(p, workspace, workspace_bytes, s)
                         : run<__half, accullm::kWeightINT8>(p, workspace, workspace_bytes, s);
    }
    return bits == 4 ? run<float, accullm::kWeightINT4>(p, workspace, workspace_bytes, s)
                     : run<float, accullm::kWeightINT8>(p, workspace, workspace_bytes, s);
}
