/*
 * accullm::OutlierSplitGemm (version 1): IPluginV3 wrapper around accullm_outlier_split_gemm.
 */
#include "OutlierSplitGemmPlugin.h"

#include "OutlierSplitGemmKernel.h"

#include <string>

namespace accullm
{
namespace plugin
{
namespace
{
enum Input : int32_t
{
    kX = 0,
    kWEIGHT = 1,
    kSCALES = 2,
    kOUTLIER_CHANNELS = 3,
    kOUTLIER_WEIGHT = 4,
};

void validateAttributes(int32_t bits, int32_t blockSize)
{
    require(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
    require(bits != 4 || blockSize > 0, "bits=4 needs block_size > 0, got " + std::to_string(blockSize));
    require(bits != 8 || blockSize == 0, "bits=8 is per output channel: block_size must be 0");
}

// Columns N of the weight, from the scales' last dimension (present for both bit widths).
int64_t outputColumns(Dims const& scales) noexcept
{
    return lastDim(scales);
}
} // namespace

OutlierSplitGemmPlugin::OutlierSplitGemmPlugin(int32_t bits, int32_t blockSize)
    : mBits(bits)
    , mBlockSize(blockSize)
{
    validateAttributes(bits, blockSize);
}

OutlierSplitGemmPlugin OutlierSplitGemmPlugin::fromFields(PluginFieldCollection const& fields)
{
    PluginField const* bits = findField(fields, "bits");
    PluginField const* blockSize = findField(fields, "block_size");
    require(bits != nullptr, "field bits is required");
    return OutlierSplitGemmPlugin(intField(*bits), blockSize != nullptr ? intField(*blockSize) : 0);
}

void OutlierSplitGemmPlugin::checkShapes(Dims const& x, Dims const& weight, Dims const& scales, Dims const& channels,
    Dims const& outlierWeight, bool weightPackedAsInt8) const
{
    require(x.nbDims >= 1, "x must have a feature dimension");
    require(weight.nbDims == 2, "weight must be 2-D [K, N]");
    require(channels.nbDims == 1, "outlier_channels must be 1-D [m]");
    require(outlierWeight.nbDims == 2, "outlier_weight must be 2-D [m, N]");
    require(scales.nbDims == (mBits == 4 ? 2 : 1), mBits == 4 ? "int4 scales must be [ceil(K / block_size), N]"
                                                              : "int8 scales must be [N] (per output channel)");
    auto const agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: known at run time
    int64_t const k = lastDim(x);
    int64_t const n = outputColumns(scales);
    require(agree(weight.d[0], k), "weight rows must equal x's last dimension K");
    int64_t const weightColumns = weightPackedAsInt8 && weight.d[1] >= 0 ? weight.d[1] * 2 : weight.d[1];
    require(agree(weightColumns, n), "weight columns (x2 when int4 arrives packed as int8) must equal N");
    require(agree(outlierWeight.d[1], n), "outlier_weight columns must equal N");
    require(agree(outlierWeight.d[0], channels.d[0]), "outlier_weight rows must equal the number of channels");
    require(channels.d[0] < 0 || channels.d[0] <= k || k < 0, "more outlier channels than input channels");
    if (mBits == 4 && k >= 0 && scales.d[0] >= 0)
    {
        require(scales.d[0] == (k + mBlockSize - 1) / mBlockSize, "int4 scales must have ceil(K / block_size) rows");
    }
}

void OutlierSplitGemmPlugin::configureTensors(PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs) const
{
    require(nbInputs == kNB_INPUTS && nbOutputs == 1, "expects 5 inputs and 1 output");
    checkShapes(in[kX].dims, in[kWEIGHT].dims, in[kSCALES].dims, in[kOUTLIER_CHANNELS].dims, in[kOUTLIER_WEIGHT].dims,
        in[kWEIGHT].type == DataType::kINT8 && mBits == 4);
}

int32_t OutlierSplitGemmPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded(kOUTLIER_SPLIT_GEMM_NAME, "getOutputDataTypes", -1, [&] {
        require(outputTypes != nullptr && inputTypes != nullptr && nbOutputs == 1 && nbInputs == kNB_INPUTS,
            "expects 5 inputs and 1 output");
        outputTypes[0] = inputTypes[kX];
        return 0;
    });
}

int32_t OutlierSplitGemmPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    return guarded(kOUTLIER_SPLIT_GEMM_NAME, "getOutputShapes", -1, [&] {
        require(inputs != nullptr && outputs != nullptr && nbInputs == kNB_INPUTS && nbOutputs == 1,
            "expects 5 inputs and 1 output");
        DimsExprs const& x = inputs[kX];
        DimsExprs const& scales = inputs[kSCALES];
        require(x.nbDims >= 1 && scales.nbDims >= 1, "x and scales need at least one dimension");
        outputs[0] = x; // y [..., N]: x's leading dimensions, the weight's columns
        outputs[0].d[x.nbDims - 1] = scales.d[scales.nbDims - 1];
        return 0;
    });
}

bool OutlierSplitGemmPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded(kOUTLIER_SPLIT_GEMM_NAME, "supportsFormatCombination", false, [&] {
        require(inOut != nullptr && nbInputs == kNB_INPUTS && nbOutputs == 1 && pos >= 0 && pos < 6,
            "expects 5 inputs and 1 output");
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kX: return desc.type == DataType::kHALF || desc.type == DataType::kFLOAT;
        case kWEIGHT:
            return mBits == 4 ? (desc.type == DataType::kINT4 || desc.type == DataType::kINT8)
                              : desc.type == DataType::kINT8;
        case kSCALES: return desc.type == DataType::kHALF;
        case kOUTLIER_CHANNELS: return desc.type == DataType::kINT32;
        case kOUTLIER_WEIGHT: return desc.type == DataType::kHALF;
        default: return desc.type == inOut[kX].desc.type; // y
        }
    });
}

size_t OutlierSplitGemmPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return guarded(kOUTLIER_SPLIT_GEMM_NAME, "getWorkspaceSize", 0, [&] {
        require(inputs != nullptr && nbInputs == kNB_INPUTS, "expects 5 inputs");
        int64_t const rows = leadingVolume(inputs[kX].max);
        int64_t const k = lastDim(inputs[kX].max);
        int64_t const n = outputColumns(inputs[kSCALES].max);
        int64_t const outliers = inputs[kOUTLIER_CHANNELS].max.d[0];
        require(rows >= 0 && k > 0 && n >= 0 && outliers >= 0, "unbounded shapes");
        return accullm_outlier_split_gemm_workspace_size(
            rows, k, n, static_cast<int32_t>(outliers), mBits, mBlockSize);
    });
}

int32_t OutlierSplitGemmPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    return guarded(kOUTLIER_SPLIT_GEMM_NAME, "enqueue", -1, [&] {
        require(inputDesc != nullptr && outputDesc != nullptr && inputs != nullptr && outputs != nullptr,
            "null tensors");
        int64_t const rows = leadingVolume(inputDesc[kX].dims);
        int64_t const k = lastDim(inputDesc[kX].dims);
        int64_t const n = outputColumns(inputDesc[kSCALES].dims);
        int32_t const outliers = static_cast<int32_t>(inputDesc[kOUTLIER_CHANNELS].dims.d[0]);
        int32_t const ioType
            = inputDesc[kX].type == DataType::kHALF ? ACCULLM_DTYPE_FLOAT16 : ACCULLM_DTYPE_FLOAT32;
        size_t const workspaceBytes
            = accullm_outlier_split_gemm_workspace_size(rows, k, n, outliers, mBits, mBlockSize);
        int const status = accullm_outlier_split_gemm(inputs[kX], inputs[kWEIGHT], inputs[kSCALES],
            static_cast<int32_t const*>(inputs[kOUTLIER_CHANNELS]), inputs[kOUTLIER_WEIGHT], outputs[0], rows, k, n,
            outliers, mBits, mBlockSize, ioType, workspace, workspaceBytes, stream);
        return enqueueStatus(kOUTLIER_SPLIT_GEMM_NAME, status);
    });
}

PluginFieldCollection const* OutlierSplitGemmPlugin::getFieldsToSerialize() noexcept
{
    return serializeFields({{"bits", &mBits, PluginFieldType::kINT32, 1},
        {"block_size", &mBlockSize, PluginFieldType::kINT32, 1}});
}

// ---------------------------------------------------------------------------------------------------------------

OutlierSplitGemmPluginCreator::OutlierSplitGemmPluginCreator()
    : PluginCreatorV3OneBase({{"bits", nullptr, PluginFieldType::kINT32, 1},
        {"block_size", nullptr, PluginFieldType::kINT32, 1}})
{
}

} // namespace plugin
} // namespace accullm
