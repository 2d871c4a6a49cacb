// Greedy generation from a TensorRT engine built by `accullm-export build`, with the accullm plugin library.
//
//   accullm_generate ENGINE TOKEN_IDS [--plugins LIB] [--max-new-tokens N]
//
// TOKEN_IDS is the tokenized prompt, comma-separated (tokenize with the model folder's tokenizer.json; the
// Python sample does it for you). Prints the generated token ids, one line. Uses the engine's optimization
// profiles as `build` made them: 0 for the prompt (prefill), 1 for each new token (decode). The KV cache stays
// on the GPU: each step's present.* buffers become the next step's past_key_values.* inputs.
#include <NvInferRuntime.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace
{
class Logger : public nvinfer1::ILogger
{
    void log(Severity severity, char const* message) noexcept override
    {
        if (severity <= Severity::kWARNING)
            std::cerr << "[TensorRT] " << message << "\n";
    }
};

#define CHECK_CUDA(call)                                                                                           \
    do                                                                                                             \
    {                                                                                                              \
        cudaError_t status_ = (call);                                                                              \
        if (status_ != cudaSuccess)                                                                                \
        {                                                                                                          \
            std::cerr << "CUDA error " << cudaGetErrorString(status_) << " at " << __LINE__ << "\n";               \
            std::exit(1);                                                                                          \
        }                                                                                                          \
    } while (0)

size_t elementSize(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kBOOL: return 1;
    default: return 1;
    }
}

int64_t volume(nvinfer1::Dims const& dims)
{
    int64_t count = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i)
        count *= dims.d[i];
    return count;
}

// A device buffer that frees itself; never null (TensorRT wants a valid address for empty tensors too).
struct DeviceBuffer
{
    void* data{nullptr};
    size_t bytes{0};
    explicit DeviceBuffer(size_t size = 0) : bytes(size) { CHECK_CUDA(cudaMalloc(&data, size > 0 ? size : 16)); }
    ~DeviceBuffer() { cudaFree(data); }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

std::vector<char> readFile(std::string const& path)
{
    std::ifstream file(path, std::ios::binary);
    if (!file)
    {
        std::cerr << "cannot read " << path << "\n";
        std::exit(2);
    }
    return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

std::vector<int64_t> parseIds(std::string const& text)
{
    std::vector<int64_t> ids;
    std::stringstream stream(text);
    std::string item;
    while (std::getline(stream, item, ','))
        ids.push_back(std::stoll(item));
    return ids;
}

nvinfer1::Dims makeDims(std::vector<int64_t> const& shape)
{
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
        dims.d[i] = shape[i];
    return dims;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        std::cerr << "usage: accullm_generate ENGINE TOKEN_IDS [--plugins LIB] [--max-new-tokens N]\n";
        return 2;
    }
    std::string const enginePath = argv[1];
    std::vector<int64_t> prompt = parseIds(argv[2]);
    std::string pluginPath;
    int maxNewTokens = 32;
    for (int i = 3; i + 1 < argc; i += 2)
    {
        std::string flag = argv[i];
        if (flag == "--plugins")
            pluginPath = argv[i + 1];
        else if (flag == "--max-new-tokens")
            maxNewTokens = std::atoi(argv[i + 1]);
    }
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!pluginPath.empty() && runtime->getPluginRegistry().loadLibrary(pluginPath.c_str()) == nullptr)
    {
        std::cerr << "cannot load the plugin library " << pluginPath << "\n";
        return 1;
    }
    std::vector<char> blob = readFile(enginePath);
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(blob.data(), blob.size())};
    if (!engine)
    {
        std::cerr << enginePath << " is not an engine for this TensorRT version and GPU (rebuild it here)\n";
        return 1;
    }
    std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));

    std::vector<std::string> inputs, outputs;
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
    {
        char const* name = engine->getIOTensorName(i);
        (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? inputs : outputs).push_back(name);
    }
    nvinfer1::Dims const kvDims = engine->getTensorShape("past_key_values.0.key");
    nvinfer1::DataType const kvType = engine->getTensorDataType("past_key_values.0.key");
    nvinfer1::DataType const logitsType = engine->getTensorDataType("logits");

    std::map<std::string, std::shared_ptr<DeviceBuffer>> past;  // past_key_values.* (empty at first)
    std::map<std::string, std::vector<int64_t>> pastShape;
    for (auto const& name : inputs)
        if (name.rfind("past_key_values.", 0) == 0)
        {
            past[name] = std::make_shared<DeviceBuffer>(0);
            pastShape[name] = {1, kvDims.d[1], 0, kvDims.d[3]};
        }

    std::vector<int64_t> stepIds = prompt;
    int64_t length = 0;
    for (int step = 0; step < maxNewTokens; ++step)
    {
        int64_t const count = static_cast<int64_t>(stepIds.size());
        std::vector<int64_t> mask(length + count, 1), positions(count);
        for (int64_t i = 0; i < count; ++i)
            positions[i] = length + i;
        std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>> hostInputs{
            {"input_ids", {{1, count}, stepIds}},
            {"attention_mask", {{1, length + count}, mask}},
            {"position_ids", {{1, count}, positions}}};
        int32_t const profile = (step > 0 && engine->getNbOptimizationProfiles() > 1) ? 1 : 0;
        context->setOptimizationProfileAsync(profile, stream);
        std::vector<std::shared_ptr<DeviceBuffer>> keep;
        for (auto const& name : inputs)
        {
            auto host = hostInputs.find(name);
            if (host != hostInputs.end())
            {
                auto buffer = std::make_shared<DeviceBuffer>(host->second.second.size() * sizeof(int64_t));
                CHECK_CUDA(cudaMemcpyAsync(buffer->data, host->second.second.data(), buffer->bytes,
                                           cudaMemcpyHostToDevice, stream));
                context->setInputShape(name.c_str(), makeDims(host->second.first));
                context->setTensorAddress(name.c_str(), buffer->data);
                keep.push_back(buffer);
            }
            else
            {
                context->setInputShape(name.c_str(), makeDims(pastShape[name]));
                context->setTensorAddress(name.c_str(), past[name]->data);
            }
        }
        std::map<std::string, std::shared_ptr<DeviceBuffer>> results;
        for (auto const& name : outputs)
        {
            nvinfer1::Dims dims = context->getTensorShape(name.c_str());
            results[name] = std::make_shared<DeviceBuffer>(volume(dims) * elementSize(engine->getTensorDataType(
                                                                                  name.c_str())));
            context->setTensorAddress(name.c_str(), results[name]->data);
        }
        if (!context->enqueueV3(stream))
        {
            std::cerr << "TensorRT failed to run the engine\n";
            return 1;
        }
        nvinfer1::Dims const logitsDims = context->getTensorShape("logits");
        int64_t const vocab = logitsDims.d[logitsDims.nbDims - 1];
        size_t const rowBytes = vocab * elementSize(logitsType);
        std::vector<char> row(rowBytes);
        char const* last = static_cast<char const*>(results["logits"]->data) + (count - 1) * rowBytes;
        CHECK_CUDA(cudaMemcpyAsync(row.data(), last, rowBytes, cudaMemcpyDeviceToHost, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
        int64_t best = 0;
        float bestValue = -1e30f;
        for (int64_t v = 0; v < vocab; ++v)
        {
            float value = logitsType == nvinfer1::DataType::kHALF
                ? __half2float(reinterpret_cast<__half const*>(row.data())[v])
                : reinterpret_cast<float const*>(row.data())[v];
            if (value > bestValue)
            {
                bestValue = value;
                best = v;
            }
        }
        std::cout << (step ? "," : "") << best << std::flush;
        for (auto const& entry : past)  // present.i.key -> past_key_values.i.key
        {
            std::string present = "present." + entry.first.substr(std::string("past_key_values.").size());
            past[entry.first] = results[present];
            pastShape[entry.first] = {1, kvDims.d[1], length + count, kvDims.d[3]};
        }
        length += count;
        stepIds = {best};
    }
    std::cout << "\n";
    cudaStreamDestroy(stream);
    (void) kvType;
    return 0;
}
