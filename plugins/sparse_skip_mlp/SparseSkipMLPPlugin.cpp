/*
 * accullm::SparseSkipMLP (version 1): IPluginV3 wrapper around accullm_sparse_skip_mlp.
 */
#include "SparseSkipMLPPlugin.h"

#include "SparseSkipMLPKernel.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <string>
#include <utility>

namespace accullm
{
namespace plugin
{

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace
{
constexpr char const* kTHRESHOLD = "threshold";
constexpr char const* kPREDICTOR = "predictor";

// Columns of a weight tensor, doubled when int4 arrives as its packed bytes in int8.
int64_t logicalColumns(Dims const& weight, bool packedInt8) noexcept
{
    int64_t const columns = weight.nbDims == 2 ? weight.d[1] : -1;
    return packedInt8 && columns >= 0 ? columns * 2 : columns;
}
} // namespace

SparseSkipMLPPlugin::SparseSkipMLPPlugin(std::string method, int32_t blockSize)
    : mMethod(std::move(method))
    , mBlockSize(blockSize)
{
    require(mMethod == kTHRESHOLD || mMethod == kPREDICTOR,
        "method must be \"threshold\" or \"predictor\", got \"" + mMethod + "\"");
    require(blockSize >= 0, "block_size must be >= 0 (0: fp16 weights)");
    initFieldsToSerialize();
}

SparseSkipMLPPlugin::SparseSkipMLPPlugin(SparseSkipMLPPlugin const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mMethod(other.mMethod)
    , mBlockSize(other.mBlockSize)
    , mNbInputs(other.mNbInputs)
{
    initFieldsToSerialize(); // the fields point at this object's members, never the source's
}

void SparseSkipMLPPlugin::initFieldsToSerialize()
{
    mFieldsToSerialize.clear();
    mFieldsToSerialize.emplace_back(
        "method", mMethod.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mMethod.size() + 1));
    mFieldsToSerialize.emplace_back("block_size", &mBlockSize, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
    mFieldCollection.fields = mFieldsToSerialize.data();
}

bool SparseSkipMLPPlugin::predictor() const noexcept
{
    return mMethod == kPREDICTOR;
}

int32_t SparseSkipMLPPlugin::defaultInputCount() const noexcept
{
    return 5 + (predictor() ? 3 : 0) + (mBlockSize > 0 ? 3 : 0);
}

SparseSkipMLPInputs SparseSkipMLPPlugin::inputsFor(int32_t nbInputs) const
{
    SparseSkipMLPInputs at;
    int32_t next = 5;
    if (predictor())
    {
        at.downRank = next++;
        at.upRank = next++;
        at.guessBias = next++;
    }
    if (mBlockSize > 0)
    {
        if (!predictor() && nbInputs == 11)
        {
            next = 8; // the three empty guesser inputs kept as placeholders
        }
        at.gateScale = next++;
        at.upScale = next++;
        at.downScale = next++;
    }
    at.count = next;
    require(nbInputs == at.count,
        "method " + mMethod + ", block_size " + std::to_string(mBlockSize) + ": expected " + std::to_string(at.count)
            + " inputs, got " + std::to_string(nbInputs));
    return at;
}

void SparseSkipMLPPlugin::checkShapes(Dims const* dims, SparseSkipMLPInputs const& at, bool packedInt8) const
{
    auto const agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: known at run time
    require(dims[at.x].nbDims >= 1, "x must have a feature dimension");
    for (int32_t w : {at.gate, at.up, at.down})
    {
        require(dims[w].nbDims == 2, "gate, up and down weights must be 2-D");
    }
    int64_t const hidden = lastDim(dims[at.x]);
    int64_t const intermediate = logicalColumns(dims[at.gate], packedInt8);
    require(agree(dims[at.gate].d[0], hidden) && agree(dims[at.up].d[0], hidden), "gate/up rows must equal H");
    require(agree(logicalColumns(dims[at.up], packedInt8), intermediate), "gate and up must have I columns");
    require(agree(dims[at.down].d[0], intermediate), "down rows must equal I");
    require(agree(logicalColumns(dims[at.down], packedInt8), hidden), "down columns must equal H");
    if (predictor())
    {
        require(dims[at.downRank].nbDims == 2 && dims[at.upRank].nbDims == 2, "down_rank / up_rank must be 2-D");
        require(agree(dims[at.downRank].d[0], hidden), "down_rank rows must equal H");
        require(agree(dims[at.upRank].d[0], dims[at.downRank].d[1]), "up_rank rows must equal the guesser rank");
        require(agree(dims[at.upRank].d[1], intermediate), "up_rank columns must equal I");
        require(agree(lastDim(dims[at.guessBias]), intermediate), "guess_bias must have I values");
    }
    if (mBlockSize > 0)
    {
        auto const blocks = [this](int64_t rows) { return rows < 0 ? rows : (rows + mBlockSize - 1) / mBlockSize; };
        require(agree(dims[at.gateScale].d[0], blocks(hidden)) && agree(dims[at.gateScale].d[1], intermediate),
            "gate_scale must be [ceil(H / block_size), I]");
        require(agree(dims[at.upScale].d[0], blocks(hidden)) && agree(dims[at.upScale].d[1], intermediate),
            "up_scale must be [ceil(H / block_size), I]");
        require(agree(dims[at.downScale].d[0], blocks(intermediate)) && agree(dims[at.downScale].d[1], hidden),
            "down_scale must be [ceil(I / block_size), H]");
    }
}

nvinfer1::IPluginCapability* SparseSkipMLPPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* SparseSkipMLPPlugin::clone() noexcept
{
    try
    {
        return new SparseSkipMLPPlugin(*this);
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::clone", e);
    }
    return nullptr;
}

char const* SparseSkipMLPPlugin::getPluginName() const noexcept
{
    return kSPARSE_SKIP_MLP_NAME;
}

char const* SparseSkipMLPPlugin::getPluginVersion() const noexcept
{
    return kSPARSE_SKIP_MLP_VERSION;
}

char const* SparseSkipMLPPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t SparseSkipMLPPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        require(in != nullptr && out != nullptr && nbOutputs == 1, "expects 1 output");
        SparseSkipMLPInputs const at = inputsFor(nbInputs);
        std::vector<Dims> dims(nbInputs);
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        checkShapes(dims.data(), at, mBlockSize > 0 && in[at.gate].desc.type == DataType::kINT8);
        mNbInputs = nbInputs;
        return 0;
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::configurePlugin", e);
    }
    return -1;
}

int32_t SparseSkipMLPPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        require(outputTypes != nullptr && inputTypes != nullptr && nbOutputs == 1, "expects 1 output");
        inputsFor(nbInputs);
        outputTypes[0] = DataType::kHALF;
        return 0;
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::getOutputDataTypes", e);
    }
    return -1;
}

int32_t SparseSkipMLPPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    try
    {
        require(inputs != nullptr && outputs != nullptr && nbOutputs == 1, "expects 1 output");
        inputsFor(nbInputs);
        outputs[0] = inputs[0]; // y has x's shape
        return 0;
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::getOutputShapes", e);
    }
    return -1;
}

bool SparseSkipMLPPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        require(inOut != nullptr && nbOutputs == 1 && pos >= 0 && pos <= nbInputs, "expects 1 output");
        SparseSkipMLPInputs const at = inputsFor(nbInputs);
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        bool const weight = pos == at.gate || pos == at.up || pos == at.down;
        if (weight && mBlockSize > 0)
        {
            bool const lowBit = desc.type == DataType::kINT4 || desc.type == DataType::kINT8;
            return lowBit && (pos == at.gate || desc.type == inOut[at.gate].desc.type); // all three stored alike
        }
        return desc.type == DataType::kHALF; // x, fp16 weights, level, guesser, scales, y
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::supportsFormatCombination", e);
    }
    return false;
}

int32_t SparseSkipMLPPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t SparseSkipMLPPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        require(inputs != nullptr, "null inputs");
        SparseSkipMLPInputs const at = inputsFor(nbInputs);
        bool const packed = mBlockSize > 0 && inputs[at.gate].desc.type == DataType::kINT8;
        int64_t const tokens = leadingVolume(inputs[at.x].max);
        int64_t const hidden = lastDim(inputs[at.x].max);
        int64_t const intermediate = logicalColumns(inputs[at.gate].max, packed);
        int64_t const rank = predictor() ? inputs[at.downRank].max.d[1] : 0;
        require(tokens >= 0 && hidden > 0 && intermediate > 0 && rank >= 0, "unbounded shapes");
        return accullm_sparse_skip_mlp_workspace_size(tokens, hidden, intermediate, rank,
            predictor() ? ACCULLM_SPARSE_METHOD_PREDICTOR : ACCULLM_SPARSE_METHOD_THRESHOLD, mBlockSize);
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::getWorkspaceSize", e);
    }
    return 0;
}

int32_t SparseSkipMLPPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        require(in != nullptr && out != nullptr && nbOutputs == 1, "expects 1 output");
        SparseSkipMLPInputs const at = inputsFor(nbInputs);
        std::vector<Dims> dims(nbInputs);
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims[i] = in[i].dims;
        }
        checkShapes(dims.data(), at, mBlockSize > 0 && in[at.gate].type == DataType::kINT8);
        mNbInputs = nbInputs;
        return 0;
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::onShapeChange", e);
    }
    return -1;
}

int32_t SparseSkipMLPPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        require(inputDesc != nullptr && outputDesc != nullptr && inputs != nullptr && outputs != nullptr,
            "null tensors");
        // enqueue is not told the input count: use the one onShapeChange / configurePlugin saw.
        SparseSkipMLPInputs const at = inputsFor(mNbInputs > 0 ? mNbInputs : defaultInputCount());
        bool const packed = mBlockSize > 0 && inputDesc[at.gate].type == DataType::kINT8;
        int64_t const tokens = leadingVolume(inputDesc[at.x].dims);
        int64_t const hidden = lastDim(inputDesc[at.x].dims);
        int64_t const intermediate = logicalColumns(inputDesc[at.gate].dims, packed);
        int64_t const rank = predictor() ? inputDesc[at.downRank].dims.d[1] : 0;
        int32_t const method = predictor() ? ACCULLM_SPARSE_METHOD_PREDICTOR : ACCULLM_SPARSE_METHOD_THRESHOLD;
        auto const input = [&](int32_t index) { return index >= 0 ? inputs[index] : nullptr; };
        size_t const workspaceBytes
            = accullm_sparse_skip_mlp_workspace_size(tokens, hidden, intermediate, rank, method, mBlockSize);
        int const status = accullm_sparse_skip_mlp(input(at.x), input(at.gate), input(at.up), input(at.down),
            input(at.level), input(at.downRank), input(at.upRank), input(at.guessBias), input(at.gateScale),
            input(at.upScale), input(at.downScale), outputs[0], tokens, hidden, intermediate, rank, method,
            mBlockSize, workspace, workspaceBytes, stream);
        if (status != 0)
        {
            reportError("SparseSkipMLP::enqueue",
                (std::string("kernel launch failed: ") + cudaGetErrorString(static_cast<cudaError_t>(status))).c_str());
        }
        return status;
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::enqueue", e);
    }
    return -1;
}

nvinfer1::IPluginV3* SparseSkipMLPPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* SparseSkipMLPPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------------------------

SparseSkipMLPPluginCreator::SparseSkipMLPPluginCreator()
{
    mFields.emplace_back("method", nullptr, PluginFieldType::kCHAR, 0);
    mFields.emplace_back("block_size", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* SparseSkipMLPPluginCreator::getPluginName() const noexcept
{
    return kSPARSE_SKIP_MLP_NAME;
}

char const* SparseSkipMLPPluginCreator::getPluginVersion() const noexcept
{
    return kSPARSE_SKIP_MLP_VERSION;
}

char const* SparseSkipMLPPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* SparseSkipMLPPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* SparseSkipMLPPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        require(fc != nullptr && (fc->nbFields == 0 || fc->fields != nullptr), "no plugin fields");
        std::string method;
        int32_t blockSize = 0;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr)
            {
                continue;
            }
            if (std::strcmp(field.name, "method") == 0)
            {
                method = stringField(field);
            }
            else if (std::strcmp(field.name, "block_size") == 0)
            {
                blockSize = intField(field);
            }
        }
        return new SparseSkipMLPPlugin(method, blockSize);
    }
    catch (std::exception const& e)
    {
        reportException("SparseSkipMLP::createPlugin", e);
    }
    return nullptr;
}

} // namespace plugin
} // namespace accullm
