/*
 * The IPluginV3 boilerplate both accullm plugins share, as CRTP bases in TensorRT's plugin layout:
 *
 *   PluginV3OneBase<Plugin>         IPluginV3 + IPluginV3OneCore/Build/Runtime: capabilities, clone, name,
 *                                   version and namespace, one output, attachToContext, configurePlugin and
 *                                   onShapeChange (both through Plugin::configureTensors), the serialized fields
 *   PluginCreatorV3OneBase<Plugin>  IPluginCreatorV3One: name, version, namespace, field names, createPlugin
 *                                   (through Plugin::fromFields)
 *
 * Plugin provides:
 *   static constexpr char const* kNAME, kVERSION;
 *   static Plugin fromFields(nvinfer1::PluginFieldCollection const&);      throws std::invalid_argument
 *   void configureTensors(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs);
 *       checks the tensors (throws std::invalid_argument), at build time and at run time alike, and keeps what
 *       enqueue needs;
 *   a copy constructor that clone and attachToContext may use (no per-context resources);
 *   the op's own methods: getOutputDataTypes, getOutputShapes, supportsFormatCombination, getWorkspaceSize,
 *   enqueue and getFieldsToSerialize (which returns serializeFields(...)).
 * Every method is noexcept and reports its errors (accullmPlugin.h: guarded).
 */
#pragma once

#include "accullmPlugin.h"

#include <initializer_list>
#include <vector>

namespace accullm
{
namespace plugin
{

template <typename Plugin>
class PluginV3OneBase : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime
{
public:
    PluginV3OneBase& operator=(PluginV3OneBase const&) = delete;
    ~PluginV3OneBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return Plugin::kNAME; }
    char const* getPluginVersion() const noexcept override { return Plugin::kVERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;

protected:
    PluginV3OneBase() = default;
    //! The serialized fields are not copied: they point at the source's members.
    PluginV3OneBase(PluginV3OneBase const& other);

    //! getFieldsToSerialize's answer: fields (whose data point at this plugin's members), kept until the next call.
    nvinfer1::PluginFieldCollection const* serializeFields(
        std::initializer_list<nvinfer1::PluginField> fields) noexcept;

private:
    Plugin& plugin() noexcept
    {
        return static_cast<Plugin&>(*this);
    }

    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

template <typename Plugin>
class PluginCreatorV3OneBase : public nvinfer1::IPluginCreatorV3One
{
public:
    PluginCreatorV3OneBase(PluginCreatorV3OneBase const&) = delete;
    PluginCreatorV3OneBase& operator=(PluginCreatorV3OneBase const&) = delete;
    ~PluginCreatorV3OneBase() override = default;

    char const* getPluginName() const noexcept override { return Plugin::kNAME; }
    char const* getPluginVersion() const noexcept override { return Plugin::kVERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

protected:
    //! fieldNames: the fields Plugin::fromFields reads (names and types, data nullptr).
    explicit PluginCreatorV3OneBase(std::initializer_list<nvinfer1::PluginField> fieldNames);

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// --- PluginV3OneBase --------------------------------------------------------------------------------------------

template <typename Plugin>
PluginV3OneBase<Plugin>::PluginV3OneBase(PluginV3OneBase const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
{
}

template <typename Plugin>
nvinfer1::IPluginCapability* PluginV3OneBase<Plugin>::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

template <typename Plugin>
nvinfer1::IPluginV3* PluginV3OneBase<Plugin>::clone() noexcept
{
    return guarded(Plugin::kNAME, "clone", nullptr, [this]() -> nvinfer1::IPluginV3* { return new Plugin(plugin()); });
}

template <typename Plugin>
int32_t PluginV3OneBase<Plugin>::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded(Plugin::kNAME, "configurePlugin", -1, [&] {
        require(in != nullptr && out != nullptr && nbInputs >= 0, "null tensors");
        std::vector<nvinfer1::PluginTensorDesc> descs(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            descs[i] = in[i].desc;
        }
        plugin().configureTensors(descs.data(), nbInputs, nbOutputs);
        return 0;
    });
}

template <typename Plugin>
int32_t PluginV3OneBase<Plugin>::getNbOutputs() const noexcept
{
    return 1;
}

template <typename Plugin>
int32_t PluginV3OneBase<Plugin>::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    return guarded(Plugin::kNAME, "onShapeChange", -1, [&] {
        require(in != nullptr && out != nullptr && nbInputs >= 0, "null tensors");
        plugin().configureTensors(in, nbInputs, nbOutputs);
        return 0;
    });
}

template <typename Plugin>
nvinfer1::IPluginV3* PluginV3OneBase<Plugin>::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

template <typename Plugin>
nvinfer1::PluginFieldCollection const* PluginV3OneBase<Plugin>::serializeFields(
    std::initializer_list<nvinfer1::PluginField> fields) noexcept
{
    return guarded(Plugin::kNAME, "getFieldsToSerialize", nullptr, [&]() -> nvinfer1::PluginFieldCollection const* {
        mFieldsToSerialize.assign(fields);
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollection.fields = mFieldsToSerialize.data();
        return &mFieldCollection;
    });
}

// --- PluginCreatorV3OneBase -------------------------------------------------------------------------------------

template <typename Plugin>
PluginCreatorV3OneBase<Plugin>::PluginCreatorV3OneBase(std::initializer_list<nvinfer1::PluginField> fieldNames)
    : mFieldNames(fieldNames)
{
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

template <typename Plugin>
nvinfer1::IPluginV3* PluginCreatorV3OneBase<Plugin>::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    return guarded(Plugin::kNAME, "createPlugin", nullptr, [fc]() -> nvinfer1::IPluginV3* {
        require(fc != nullptr && (fc->nbFields == 0 || fc->fields != nullptr), "no plugin fields");
        return new Plugin(Plugin::fromFields(*fc));
    });
}

} // namespace plugin
} // namespace accullm
