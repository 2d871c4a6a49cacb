/*
 * accullm::OutlierSplitGemm (version 1) as a TensorRT 10 IPluginV3 plugin.
 *
 * Inputs:  0 x [..., K] fp16|fp32; 1 weight: bits 4: int4 [K, N] (DataType::kINT4) or its packed bytes as int8
 *          [K, N / 2]; bits 8: int8 [K, N]; 2 scales fp16 (bits 4: [ceil(K / block_size), N]; bits 8: [N]);
 *          3 outlier_channels int32 [m]; 4 outlier_weight fp16 [m, N].
 * Output:  y [..., N], x's type.
 * Fields:  bits (int32: 4 | 8), block_size (int32: > 0 for bits 4, 0 for bits 8).
 * Semantics: reference.py. Kernel: OutlierSplitGemmKernel.h (C ABI).
 */
#pragma once

#include "../common/accullmPluginBase.h"

#include <cstdint>

namespace accullm
{
namespace plugin
{

constexpr char const* kOUTLIER_SPLIT_GEMM_NAME = "OutlierSplitGemm";
constexpr char const* kOUTLIER_SPLIT_GEMM_VERSION = "1"; // bump when the inputs, outputs or fields change

//! The IPluginV3 capabilities, clone, names, configurePlugin / onShapeChange: PluginV3OneBase.
class OutlierSplitGemmPlugin : public PluginV3OneBase<OutlierSplitGemmPlugin>
{
public:
    static constexpr char const* kNAME = kOUTLIER_SPLIT_GEMM_NAME;
    static constexpr char const* kVERSION = kOUTLIER_SPLIT_GEMM_VERSION;
    static constexpr int32_t kNB_INPUTS = 5;

    //! Throws std::invalid_argument for attributes outside the op's definition.
    OutlierSplitGemmPlugin(int32_t bits, int32_t blockSize);
    //! From the fields bits (required) and block_size (default 0); throws std::invalid_argument.
    static OutlierSplitGemmPlugin fromFields(nvinfer1::PluginFieldCollection const& fields);

    // IPluginV3OneBuild
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    friend class PluginV3OneBase<OutlierSplitGemmPlugin>;

    //! configurePlugin and onShapeChange: throws std::invalid_argument unless the tensors fit the op.
    void configureTensors(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs) const;
    //! Throws std::invalid_argument when the tensors' ranks or sizes disagree with each other or with bits.
    void checkShapes(nvinfer1::Dims const& x, nvinfer1::Dims const& weight, nvinfer1::Dims const& scales,
        nvinfer1::Dims const& channels, nvinfer1::Dims const& outlierWeight, bool weightPackedAsInt8) const;

    int32_t mBits;
    int32_t mBlockSize;
};

class OutlierSplitGemmPluginCreator : public PluginCreatorV3OneBase<OutlierSplitGemmPlugin>
{
public:
    OutlierSplitGemmPluginCreator();
};

} // namespace plugin
} // namespace accullm
