/*
 * accullm::OutlierSplitGemm (version 1) CUDA kernel: C ABI, no TensorRT types.
 *
 *   y[..., N] = x[..., K] @ dequantize(weight) + x[..., outlier_channels] @ outlier_weight
 *
 * The semantics are plugins/outlier_split_gemm/reference.py's. Pointers, stream and result as every accullm
 * kernel's: ../common/accullmKernelApi.h.
 */
#ifndef ACCULLM_OUTLIER_SPLIT_GEMM_KERNEL_H
#define ACCULLM_OUTLIER_SPLIT_GEMM_KERNEL_H

#include "../common/accullmKernelApi.h"

/* Activation (x and y) element types. */
#define ACCULLM_DTYPE_FLOAT16 0
#define ACCULLM_DTYPE_FLOAT32 1

/* Workspace bytes that any call with at most `max_rows` rows of x (and these sizes) needs; 0 when none. */
ACCULLM_KERNEL_API size_t accullm_outlier_split_gemm_workspace_size(int64_t max_rows, int64_t in_features,
    int64_t out_features, int32_t num_outliers, int32_t bits, int32_t block_size);

/*
 * x                 [rows, in_features]           fp16 (io_dtype 0) or fp32 (io_dtype 1)
 * weight            bits 4: int4 [in_features, out_features], two per byte, low nibble first, element (k, n) at
 *                   flat index k * out_features + n; bits 8: int8 [in_features, out_features]
 * scales            fp16; bits 4: [ceil(in_features / block_size), out_features]; bits 8: [out_features]
 * outlier_channels  int32 [num_outliers] (input channel indices; out-of-range ones read as 0)
 * outlier_weight    fp16 [num_outliers, out_features]
 * y                 [rows, out_features], io_dtype
 * block_size        bits 4: > 0 (64 or 128 in practice); bits 8: 0
 *
 * Paths: rows 1..8 take the decode GEMV (each weight byte read once, outliers fused) when out_features is a
 * multiple of 32 (int4) / 16 (int8), the weight, scales and outlier_weight are 16-byte aligned and
 * num_outliers <= 64; anything else takes the tiled GEMM (also fused, slower, any shape).
 */
ACCULLM_KERNEL_API int accullm_outlier_split_gemm(void const* x, void const* weight, void const* scales,
    int32_t const* outlier_channels, void const* outlier_weight, void* y, int64_t rows, int64_t in_features,
    int64_t out_features, int32_t num_outliers, int32_t bits, int32_t block_size, int32_t io_dtype,
    void* workspace, size_t workspace_bytes, void* stream);

#endif /* ACCULLM_OUTLIER_SPLIT_GEMM_KERNEL_H */
