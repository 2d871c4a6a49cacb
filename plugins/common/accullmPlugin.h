/*
 * Shared pieces of the accullm TensorRT 10 plugins (IPluginV3): the namespace constant, error reporting through
 * the logger TensorRT hands the library (setLoggerFinder), the exception guard of every noexcept method,
 * plugin-field parsing and dimension helpers. The IPluginV3 boilerplate itself: accullmPluginBase.h.
 */
#pragma once

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>

static_assert(NV_TENSORRT_MAJOR >= 10, "the accullm plugins implement IPluginV3: TensorRT 10 or later");

namespace accullm
{
namespace plugin
{

// The TensorRT types the plugins' sources use, by their short names (inside accullm::plugin only).
using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

// The ONNX parser finds a creator by (node op type, attribute plugin_version or "1", attribute plugin_namespace
// or ""): the swap passes set plugin_namespace = "accullm" on each node.
constexpr char const* kPLUGIN_NAMESPACE = "accullm";

//! Report an error in plugin::method through the logger TensorRT gave the library (stderr when it gave none).
void reportError(char const* plugin, char const* method, char const* message) noexcept;

//! The body of a noexcept TensorRT method: what body returns, or, when it throws, onError after reporting the
//! exception as an error in plugin::method.
template <typename Body>
std::invoke_result_t<Body&> guarded(
    char const* plugin, char const* method, std::invoke_result_t<Body&> onError, Body&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& error)
    {
        reportError(plugin, method, error.what());
    }
    catch (...)
    {
        reportError(plugin, method, "unknown exception");
    }
    return onError;
}

//! enqueue's result for a kernel's C ABI status (0 or a cudaError_t code), reporting a nonzero one.
int32_t enqueueStatus(char const* plugin, int status) noexcept;

//! The library-wide logger finder (set by setLoggerFinder, may be null).
void setLoggerFinderInstance(nvinfer1::ILoggerFinder* finder) noexcept;

//! Throw std::invalid_argument(message) unless condition holds.
inline void require(bool condition, std::string const& message)
{
    if (!condition)
    {
        throw std::invalid_argument(message);
    }
}

//! The field called name (the last one, should there be several), or nullptr. Other fields are ignored: the ONNX
//! parser also passes plugin_namespace / plugin_version.
nvinfer1::PluginField const* findField(nvinfer1::PluginFieldCollection const& fields, char const* name) noexcept;

//! An integer plugin field of any integer type, as int32 (the ONNX parser passes INT attributes as kINT32).
int32_t intField(nvinfer1::PluginField const& field);

//! A string plugin field (kCHAR, with or without a terminating NUL in its length).
std::string stringField(nvinfer1::PluginField const& field);

//! Product of the dimensions before the last (the rows of a [..., features] tensor); -1 if any is unknown.
int64_t leadingVolume(nvinfer1::Dims const& dims) noexcept;

//! The last dimension; -1 when the rank is 0 or the dimension is unknown.
int64_t lastDim(nvinfer1::Dims const& dims) noexcept;

} // namespace plugin
} // namespace accullm
