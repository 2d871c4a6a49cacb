/*
 * accullm::SparseSkipMLP (version 1): IPluginV3 wrapper around accullm_sparse_skip_mlp.
 */
#include "SparseSkipMLPPlugin.h"

#include "SparseSkipMLPKernel.h"

#include <string>
#include <utility>

namespace accullm
{
namespace plugin
{
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

SparseSkipMLPPlugin::SparseSkipMLPPlugin(std::string method, int32_t blockSize, int32_t activation)
    : mMethod(std::move(method))
    , mBlockSize(blockSize)
    , mActivation(activation)
{
    require(mMethod == kTHRESHOLD || mMethod == kPREDICTOR,
        "method must be \"threshold\" or \"predictor\", got \"" + mMethod + "\"");
    require(blockSize >= 0, "block_size must be >= 0 (0: fp16 weights)");
    require(activation == ACCULLM_SPARSE_ACTIVATION_SILU || activation == ACCULLM_SPARSE_ACTIVATION_GELU_TANH,
        "activation must be 0 (silu) or 1 (gelu_tanh), got " + std::to_string(activation));
}

SparseSkipMLPPlugin SparseSkipMLPPlugin::fromFields(PluginFieldCollection const& fields)
{
    PluginField const* method = findField(fields, "method");
    PluginField const* blockSize = findField(fields, "block_size");
    PluginField const* activation = findField(fields, "activation");
    return SparseSkipMLPPlugin(method != nullptr ? stringField(*method) : std::string(),
        blockSize != nullptr ? intField(*blockSize) : 0,
        activation != nullptr ? intField(*activation) : ACCULLM_SPARSE_ACTIVATION_SILU);
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

void SparseSkipMLPPlugin::checkShapes(PluginTensorDesc const* in, SparseSkipMLPInputs const& at, bool packedInt8) const
{
    auto const dims = [in](int32_t index) -> Dims const& { return in[index].dims; };
    auto const agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: known at run time
    require(dims(at.x).nbDims >= 1, "x must have a feature dimension");
    for (int32_t w : {at.gate, at.up, at.down})
    {
        require(dims(w).nbDims == 2, "gate, up and down weights must be 2-D");
    }
    int64_t const hidden = lastDim(dims(at.x));
    int64_t const intermediate = logicalColumns(dims(at.gate), packedInt8);
    require(agree(dims(at.gate).d[0], hidden) && agree(dims(at.up).d[0], hidden), "gate/up rows must equal H");
    require(agree(logicalColumns(dims(at.up), packedInt8), intermediate), "gate and up must have I columns");
    require(agree(dims(at.down).d[0], intermediate), "down rows must equal I");
    require(agree(logicalColumns(dims(at.down), packedInt8), hidden), "down columns must equal H");
    if (predictor())
    {
        require(dims(at.downRank).nbDims == 2 && dims(at.upRank).nbDims == 2, "down_rank / up_rank must be 2-D");
        require(agree(dims(at.downRank).d[0], hidden), "down_rank rows must equal H");
        require(agree(dims(at.upRank).d[0], dims(at.downRank).d[1]), "up_rank rows must equal the guesser rank");
        require(agree(dims(at.upRank).d[1], intermediate), "up_rank columns must equal I");
        require(agree(lastDim(dims(at.guessBias)), intermediate), "guess_bias must have I values");
    }
    if (mBlockSize > 0)
    {
        auto const blocks = [this](int64_t rows) { return rows < 0 ? rows : (rows + mBlockSize - 1) / mBlockSize; };
        require(agree(dims(at.gateScale).d[0], blocks(hidden)) && agree(dims(at.gateScale).d[1], intermediate),
            "gate_scale must be [ceil(H / block_size), I]");
        require(agree(dims(at.upScale).d[0], blocks(hidden)) && agree(dims(at.upScale).d[1], intermediate),
            "up_scale must be [ceil(H / block_size), I]");
        require(agree(dims(at.downScale).d[0], blocks(intermediate)) && agree(dims(at.downScale).d[1], hidden),
            "down_scale must be [ceil(I / block_size), H]");
    }
}

void SparseSkipMLPPlugin::configureTensors(PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs)
{
    require(nbOutputs == 1, "expects 1 output");
    SparseSkipMLPInputs const at = inputsFor(nbInputs);
    checkShapes(in, at, mBlockSize > 0 && in[at.gate].type == DataType::kINT8);
    mNbInputs = nbInputs;
}

int32_t SparseSkipMLPPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded(kSPARSE_SKIP_MLP_NAME, "getOutputDataTypes", -1, [&] {
        require(outputTypes != nullptr && inputTypes != nullptr && nbOutputs == 1, "expects 1 output");
        inputsFor(nbInputs);
        outputTypes[0] = DataType::kHALF;
        return 0;
    });
}

int32_t SparseSkipMLPPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    return guarded(kSPARSE_SKIP_MLP_NAME, "getOutputShapes", -1, [&] {
        require(inputs != nullptr && outputs != nullptr && nbOutputs == 1, "expects 1 output");
        inputsFor(nbInputs);
        outputs[0] = inputs[0]; // y has x's shape
        return 0;
    });
}

bool SparseSkipMLPPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded(kSPARSE_SKIP_MLP_NAME, "supportsFormatCombination", false, [&] {
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
    });
}

size_t SparseSkipMLPPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return guarded(kSPARSE_SKIP_MLP_NAME, "getWorkspaceSize", 0, [&] {
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
    });
}

int32_t SparseSkipMLPPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    return guarded(kSPARSE_SKIP_MLP_NAME, "enqueue", -1, [&] {
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
            mActivation, mBlockSize, workspace, workspaceBytes, stream);
        return enqueueStatus(kSPARSE_SKIP_MLP_NAME, status);
    });
}

PluginFieldCollection const* SparseSkipMLPPlugin::getFieldsToSerialize() noexcept
{
    int32_t const methodBytes = static_cast<int32_t>(mMethod.size() + 1); // with the terminating NUL
    return serializeFields({{"method", mMethod.c_str(), PluginFieldType::kCHAR, methodBytes},
        {"block_size", &mBlockSize, PluginFieldType::kINT32, 1},
        {"activation", &mActivation, PluginFieldType::kINT32, 1}});
}

// ---------------------------------------------------------------------------------------------------------------

SparseSkipMLPPluginCreator::SparseSkipMLPPluginCreator()
    : PluginCreatorV3OneBase({{"method", nullptr, PluginFieldType::kCHAR, 0},
        {"block_size", nullptr, PluginFieldType::kINT32, 1}, {"activation", nullptr, PluginFieldType::kINT32, 1}})
{
}

} // namespace plugin
} // namespace accullm
