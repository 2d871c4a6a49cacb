/*
 * accullm::SparseSkipMLP (version 1) as a TensorRT 10 IPluginV3 plugin.
 *
 * Inputs (reference.py's order): 0 x [..., H]; 1 gate_weight [H, I]; 2 up_weight [H, I]; 3 down_weight [I, H];
 * 4 level (one value); predictor only: 5 down_rank [H, r], 6 up_rank [r, I], 7 guess_bias [I]; block_size > 0
 * only: gate_scale [ceil(H / b), I], up_scale [ceil(H / b), I], down_scale [ceil(I / b), H] (inputs 8-10, or
 * 5-7 for "threshold" when the empty guesser inputs are not passed). Float tensors fp16; int4 weights as
 * DataType::kINT4 or as their packed bytes in int8 [rows, columns / 2]. Output y [..., H] fp16.
 * Fields: method (string "threshold" | "predictor"), block_size (int32, 0 for fp16 weights), activation (int32,
 * the gate's: 0 silu, 1 gelu_tanh; absent means 0).
 * Semantics: reference.py. Kernel: SparseSkipMLPKernel.h (C ABI).
 */
#pragma once

#include "../common/accullmPluginBase.h"

#include <cstdint>
#include <string>

namespace accullm
{
namespace plugin
{

constexpr char const* kSPARSE_SKIP_MLP_NAME = "SparseSkipMLP";
// Bump when the inputs or outputs change or a field changes meaning; a new field whose default keeps the old
// behaviour (activation: silu) leaves the files written before it valid, so it keeps the version.
constexpr char const* kSPARSE_SKIP_MLP_VERSION = "1";

//! Positions of the op's inputs for one (method, block_size, number of inputs); -1 for absent ones.
struct SparseSkipMLPInputs
{
    int32_t x{0}, gate{1}, up{2}, down{3}, level{4};
    int32_t downRank{-1}, upRank{-1}, guessBias{-1};
    int32_t gateScale{-1}, upScale{-1}, downScale{-1};
    int32_t count{5};
};

//! The IPluginV3 capabilities, clone, names, configurePlugin / onShapeChange: PluginV3OneBase.
class SparseSkipMLPPlugin : public PluginV3OneBase<SparseSkipMLPPlugin>
{
public:
    static constexpr char const* kNAME = kSPARSE_SKIP_MLP_NAME;
    static constexpr char const* kVERSION = kSPARSE_SKIP_MLP_VERSION;

    //! Throws std::invalid_argument for a method other than "threshold" / "predictor", a negative block size or
    //! an activation other than ACCULLM_SPARSE_ACTIVATION_SILU / _GELU_TANH.
    SparseSkipMLPPlugin(std::string method, int32_t blockSize, int32_t activation);
    //! From the fields method, block_size (default 0) and activation (default silu); throws std::invalid_argument.
    static SparseSkipMLPPlugin fromFields(nvinfer1::PluginFieldCollection const& fields);

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
    friend class PluginV3OneBase<SparseSkipMLPPlugin>;

    //! configurePlugin and onShapeChange: throws std::invalid_argument unless the tensors fit the op; keeps the
    //! input count for enqueue.
    void configureTensors(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs);
    bool predictor() const noexcept;
    //! Inputs without the empty guesser placeholders: 5, + 3 for the predictor, + 3 scales for int4.
    int32_t defaultInputCount() const noexcept;
    //! Throws std::invalid_argument when nbInputs does not fit (method, block_size).
    SparseSkipMLPInputs inputsFor(int32_t nbInputs) const;
    //! Throws std::invalid_argument when shapes disagree; -1 dimensions (unknown at build time) pass.
    void checkShapes(nvinfer1::PluginTensorDesc const* in, SparseSkipMLPInputs const& at, bool packedInt8) const;

    std::string mMethod;
    int32_t mBlockSize;
    int32_t mActivation;
    int32_t mNbInputs{0}; // as configured (build) or seen by onShapeChange (run time); enqueue is not told
};

class SparseSkipMLPPluginCreator : public PluginCreatorV3OneBase<SparseSkipMLPPlugin>
{
public:
    SparseSkipMLPPluginCreator();
};

} // namespace plugin
} // namespace accullm
