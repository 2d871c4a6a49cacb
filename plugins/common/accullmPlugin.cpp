/*
 * Library entry points and shared helpers of libaccullm_plugins.so.
 *
 * Registration. TensorRT 10 loads a plugin shared library in two ways:
 *   - dynamically: IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library(path); trtexec
 *     --dynamicPlugins; a library serialized into a version-compatible engine with --setPluginsToSerialize) looks
 *     up the C symbols setLoggerFinder and getCreators and registers the creators getCreators returns;
 *   - statically: a plain dlopen (trtexec --staticPlugins, ctypes.CDLL) runs the library's static initializers,
 *     which register creators declared with REGISTER_TENSORRT_PLUGIN.
 * loadLibrary fails when one of the library's creators is already registered, so a library must not do both.
 * This one exports getCreators / setLoggerFinder (TensorRT's plugin-library entry points) and adds the static
 * registration only when built with -DACCULLM_STATIC_REGISTRATION (CMake option of the same name).
 */
#include "accullmPlugin.h"

#include "../outlier_split_gemm/OutlierSplitGemmPlugin.h"
#include "../sparse_skip_mlp/SparseSkipMLPPlugin.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstring>
#include <iostream>

namespace accullm
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

void setLoggerFinderInstance(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void reportError(char const* plugin, char const* method, char const* message) noexcept
{
    try
    {
        std::string const text = std::string("[accullm plugin] ") + plugin + "::" + method + ": " + message;
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        if (logger != nullptr)
        {
            logger->log(nvinfer1::ILogger::Severity::kERROR, text.c_str());
        }
        else
        {
            std::cerr << text << std::endl;
        }
    }
    catch (...)
    {
        // Reporting must never throw out of a noexcept override.
    }
}

int32_t enqueueStatus(char const* plugin, int status) noexcept
{
    if (status != 0)
    {
        char const* const error = cudaGetErrorString(static_cast<cudaError_t>(status));
        try
        {
            reportError(plugin, "enqueue", (std::string("kernel launch failed: ") + error).c_str());
        }
        catch (...)
        {
            reportError(plugin, "enqueue", error);
        }
    }
    return status;
}

nvinfer1::PluginField const* findField(nvinfer1::PluginFieldCollection const& fields, char const* name) noexcept
{
    nvinfer1::PluginField const* found = nullptr;
    for (int32_t i = 0; i < fields.nbFields; ++i)
    {
        if (fields.fields[i].name != nullptr && std::strcmp(fields.fields[i].name, name) == 0)
        {
            found = &fields.fields[i];
        }
    }
    return found;
}

int32_t intField(nvinfer1::PluginField const& field)
{
    require(field.data != nullptr && field.length >= 1, std::string("field ") + field.name + " is empty");
    switch (field.type)
    {
    case nvinfer1::PluginFieldType::kINT32: return *static_cast<int32_t const*>(field.data);
    case nvinfer1::PluginFieldType::kINT64: return static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
    case nvinfer1::PluginFieldType::kINT16: return *static_cast<int16_t const*>(field.data);
    case nvinfer1::PluginFieldType::kINT8: return *static_cast<int8_t const*>(field.data);
    default: break;
    }
    throw std::invalid_argument(std::string("field ") + field.name + " must be an integer");
}

std::string stringField(nvinfer1::PluginField const& field)
{
    require(field.type == nvinfer1::PluginFieldType::kCHAR && field.data != nullptr,
        std::string("field ") + field.name + " must be a string");
    char const* text = static_cast<char const*>(field.data);
    return std::string(text, strnlen(text, static_cast<size_t>(field.length)));
}

int64_t leadingVolume(nvinfer1::Dims const& dims) noexcept
{
    int64_t volume = 1;
    for (int32_t i = 0; i + 1 < dims.nbDims; ++i)
    {
        if (dims.d[i] < 0)
        {
            return -1;
        }
        volume *= dims.d[i];
    }
    return volume;
}

int64_t lastDim(nvinfer1::Dims const& dims) noexcept
{
    return dims.nbDims > 0 ? dims.d[dims.nbDims - 1] : -1;
}

} // namespace plugin
} // namespace accullm

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    accullm::plugin::setLoggerFinderInstance(finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static accullm::plugin::OutlierSplitGemmPluginCreator outlierSplitGemmCreator;
    static accullm::plugin::SparseSkipMLPPluginCreator sparseSkipMLPCreator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&outlierSplitGemmCreator, &sparseSkipMLPCreator};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}

#ifdef ACCULLM_STATIC_REGISTRATION
namespace accullm
{
namespace plugin
{
REGISTER_TENSORRT_PLUGIN(OutlierSplitGemmPluginCreator);
REGISTER_TENSORRT_PLUGIN(SparseSkipMLPPluginCreator);
} // namespace plugin
} // namespace accullm
#endif
