/*
 * Shared pieces of the accullm TensorRT 10 plugins (IPluginV3): the namespace constant, error reporting through
 * the logger TensorRT hands the library (setLoggerFinder), plugin-field parsing and dimension helpers.
 */
#pragma once

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <stdexcept>
#include <string>

static_assert(NV_TENSORRT_MAJOR >= 10, "the accullm plugins implement IPluginV3: TensorRT 10 or later");

namespace accullm
{
namespace plugin
{

// The ONNX parser finds a creator by (node op type, attribute plugin_version or "1", attribute plugin_namespace
// or ""): the swap passes set plugin_namespace = "accullm" on each node.
constexpr char const* kPLUGIN_NAMESPACE = "accullm";

//! Report an error through the logger TensorRT gave the library (stderr when it gave none).
void reportError(char const* where, char const* message) noexcept;

//! Report a caught exception; every noexcept override ends its try block with this.
void reportException(char const* where, std::exception const& error) noexcept;

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
