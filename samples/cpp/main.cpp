// Greedy generation from a TensorRT engine built by `accullm-export build`, with the accullm plugin library;
// with --golden, golden mode: a low-bit draft engine proposes tokens and ENGINE (the verifier) checks them.
//
//   accullm_generate ENGINE TOKEN_IDS [--plugins LIB] [--max-new-tokens N] [--eos IDS]
//                    [--golden DRAFT_ENGINE [--draft-tokens K]]
//
// TOKEN_IDS is the tokenized prompt, comma-separated (tokenize with the model folder's tokenizer.json; the
// Python sample does it for you). Prints the generated token ids, one line. Uses the engine's optimization
// profiles as `build` made them: 0 for the prompt (prefill on an empty cache), 1 for every pass on a cache (one
// token, or the verifier's K + 1). The KV cache stays on the GPU: each pass's present.* buffers become the next
// pass's past_key_values.* inputs, and golden mode cuts both caches back to the tokens the verifier kept. The
// output of golden mode is the verifier's own greedy output (speculative.h); the draft must come from the same
// model and tokenizer (`build --golden` pairs them and the kit's Python runtime checks golden.json; this sample
// trusts its arguments).
#include "speculative.h"

#include <NvInferRuntime.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
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
    {
        try
        {
            ids.push_back(std::stoll(item));
        }
        catch (std::exception const&)
        {
            std::cerr << "not a comma-separated list of token ids: " << text << "\n";
            std::exit(2);
        }
    }
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
// One decoder engine and its KV cache on the GPU, as speculative.h's Model: forward() appends tokens to the
// cache and returns the greedy token after each of them.
class EngineModel
{
public:
    EngineModel(nvinfer1::IRuntime& runtime, std::string const& path, cudaStream_t stream)
        : mPath(path)
        , mStream(stream)
    {
        std::vector<char> blob = readFile(path);
        mEngine.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
        if (!mEngine)
        {
            std::cerr << path << " is not an engine for this TensorRT version and GPU (rebuild it here)\n";
            std::exit(1);
        }
        mContext.reset(mEngine->createExecutionContext());
        for (int32_t i = 0; i < mEngine->getNbIOTensors(); ++i)
        {
            char const* name = mEngine->getIOTensorName(i);
            (mEngine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? mInputs : mOutputs).push_back(name);
        }
        if (mEngine->getTensorIOMode("past_key_values.0.key") != nvinfer1::TensorIOMode::kINPUT
            || mEngine->getTensorIOMode("logits") != nvinfer1::TensorIOMode::kOUTPUT)
        {
            std::cerr << path << " is not a decoder engine with a KV cache (past_key_values.0.key, logits)\n";
            std::exit(2);
        }
        mKvDims = mEngine->getTensorShape("past_key_values.0.key");
        mKvItem = elementSize(mEngine->getTensorDataType("past_key_values.0.key"));
        mLogitsType = mEngine->getTensorDataType("logits");
        for (auto const& name : mInputs)
            if (name.rfind("past_key_values.", 0) == 0)
                mPast[name] = std::make_shared<DeviceBuffer>(0);
    }

    std::vector<int64_t> forward(std::vector<int64_t> const& tokens)
    {
        int64_t const count = static_cast<int64_t>(tokens.size());
        std::vector<int64_t> mask(mLength + count, 1), positions(count);
        for (int64_t i = 0; i < count; ++i)
            positions[i] = mLength + i;
        std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>> hostInputs{
            {"input_ids", {{1, count}, tokens}},
            {"attention_mask", {{1, mLength + count}, mask}},
            {"position_ids", {{1, count}, positions}}};
        int32_t const profile = (mLength > 0 && mEngine->getNbOptimizationProfiles() > 1) ? 1 : 0;
        mContext->setOptimizationProfileAsync(profile, mStream);
        std::vector<std::shared_ptr<DeviceBuffer>> keep;
        for (auto const& name : mInputs)
        {
            auto host = hostInputs.find(name);
            bool shaped = false;
            if (host != hostInputs.end())
            {
                auto buffer = std::make_shared<DeviceBuffer>(host->second.second.size() * sizeof(int64_t));
                CHECK_CUDA(cudaMemcpyAsync(buffer->data, host->second.second.data(), buffer->bytes,
                                           cudaMemcpyHostToDevice, mStream));
                shaped = mContext->setInputShape(name.c_str(), makeDims(host->second.first));
                mContext->setTensorAddress(name.c_str(), buffer->data);
                keep.push_back(buffer);
            }
            else
            {
                shaped = mContext->setInputShape(name.c_str(), makeDims({1, mKvDims.d[1], mLength, mKvDims.d[3]}));
                mContext->setTensorAddress(name.c_str(), mPast[name]->data);
            }
            if (!shaped)
            {
                std::cerr << mPath << ": " << count << " token(s) on a cache of " << mLength
                          << " do not fit the engine's optimization profile " << profile
                          << " (rebuild it with `accullm-export build`, whose decode profile takes a golden "
                             "verifier's pass, or use fewer --draft-tokens)\n";
                std::exit(2);
            }
        }
        std::map<std::string, std::shared_ptr<DeviceBuffer>> results;
        for (auto const& name : mOutputs)
        {
            nvinfer1::Dims dims = mContext->getTensorShape(name.c_str());
            results[name] = std::make_shared<DeviceBuffer>(volume(dims) * elementSize(mEngine->getTensorDataType(
                                                                                  name.c_str())));
            mContext->setTensorAddress(name.c_str(), results[name]->data);
        }
        if (!mContext->enqueueV3(mStream))
        {
            std::cerr << "TensorRT failed to run " << mPath << "\n";
            std::exit(1);
        }
        nvinfer1::Dims const logitsDims = mContext->getTensorShape("logits");
        int64_t const vocabulary = logitsDims.d[logitsDims.nbDims - 1];
        size_t const rowBytes = vocabulary * elementSize(mLogitsType);
        std::vector<char> rows(rowBytes * count);
        CHECK_CUDA(cudaMemcpyAsync(rows.data(), results["logits"]->data, rows.size(), cudaMemcpyDeviceToHost,
                                   mStream));
        CHECK_CUDA(cudaStreamSynchronize(mStream));
        std::vector<int64_t> choices;
        for (int64_t position = 0; position < count; ++position)
            choices.push_back(argmax(rows.data() + position * rowBytes, vocabulary));
        for (auto& entry : mPast)  // present.i.key -> past_key_values.i.key
            entry.second = results["present." + entry.first.substr(std::string("past_key_values.").size())];
        mLength += count;
        return choices;
    }

    int64_t length() const { return mLength; }

    // Keep the first `length` positions of every layer's [1, heads, positions, head_dim] cache.
    void truncate(int64_t length)
    {
        if (length >= mLength)
            return;
        size_t const rowBytes = static_cast<size_t>(mKvDims.d[3]) * mKvItem;
        for (auto& entry : mPast)
        {
            auto kept = std::make_shared<DeviceBuffer>(mKvDims.d[1] * length * rowBytes);
            if (length > 0)
                CHECK_CUDA(cudaMemcpy2DAsync(kept->data, length * rowBytes, entry.second->data, mLength * rowBytes,
                                             length * rowBytes, mKvDims.d[1], cudaMemcpyDeviceToDevice, mStream));
            entry.second = kept;
        }
        CHECK_CUDA(cudaStreamSynchronize(mStream));
        mLength = length;
    }

private:
    int64_t argmax(char const* row, int64_t vocabulary) const
    {
        int64_t best = 0;
        float bestValue = -1e30f;
        for (int64_t v = 0; v < vocabulary; ++v)
        {
            float value = mLogitsType == nvinfer1::DataType::kHALF
                ? __half2float(reinterpret_cast<__half const*>(row)[v])
                : reinterpret_cast<float const*>(row)[v];
            if (value > bestValue)
            {
                bestValue = value;
                best = v;
            }
        }
        return best;
    }

    std::string mPath;
    cudaStream_t mStream;
    std::unique_ptr<nvinfer1::ICudaEngine> mEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mContext;
    std::vector<std::string> mInputs, mOutputs;
    nvinfer1::Dims mKvDims{};
    size_t mKvItem{2};
    nvinfer1::DataType mLogitsType{nvinfer1::DataType::kFLOAT};
    std::map<std::string, std::shared_ptr<DeviceBuffer>> mPast;
    int64_t mLength{0};
};
} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        std::cerr << "usage: accullm_generate ENGINE TOKEN_IDS [--plugins LIB] [--max-new-tokens N] [--eos IDS] "
                     "[--golden DRAFT_ENGINE [--draft-tokens K]]\n";
        return 2;
    }
    std::string const enginePath = argv[1];
    std::vector<int64_t> const prompt = parseIds(argv[2]);
    std::string pluginPath, draftPath;
    int64_t maxNewTokens = 32, draftTokens = 4;
    std::set<int64_t> eos;
    for (int i = 3; i < argc; i += 2)
    {
        std::string const flag = argv[i];
        if (i + 1 >= argc)
        {
            std::cerr << flag << " needs a value\n";
            return 2;
        }
        std::string const value = argv[i + 1];
        if (flag == "--plugins")
            pluginPath = value;
        else if (flag == "--golden")
            draftPath = value;
        else if (flag == "--eos")
            for (int64_t id : parseIds(value))
                eos.insert(id);
        else if (flag == "--max-new-tokens" || flag == "--draft-tokens")
        {
            int64_t const number = std::atoll(value.c_str());
            if (number < 1 || (flag == "--draft-tokens" && number > 64))
            {
                std::cerr << flag << " must be a positive integer" << (flag == "--draft-tokens" ? " up to 64" : "")
                          << ", got " << value << "\n";
                return 2;
            }
            (flag == "--max-new-tokens" ? maxNewTokens : draftTokens) = number;
        }
        else
        {
            std::cerr << "unknown option " << flag << "\n";
            return 2;
        }
    }
    if (prompt.empty())
    {
        std::cerr << "TOKEN_IDS is empty: give the tokenized prompt\n";
        return 2;
    }
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!pluginPath.empty() && runtime->getPluginRegistry().loadLibrary(pluginPath.c_str()) == nullptr)
    {
        std::cerr << "cannot load the plugin library " << pluginPath << "\n";
        return 1;
    }
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    {
        EngineModel verifier(*runtime, enginePath, stream);
        auto const started = std::chrono::steady_clock::now();
        std::vector<int64_t> output;
        accullm::GoldenStats stats;
        if (draftPath.empty())
        {
            output.push_back(verifier.forward(prompt).back());
            std::cout << output.back() << std::flush;
            while (static_cast<int64_t>(output.size()) < maxNewTokens && !eos.count(output.back()))
            {
                output.push_back(verifier.forward({output.back()}).back());
                std::cout << "," << output.back() << std::flush;
            }
        }
        else
        {
            EngineModel draft(*runtime, draftPath, stream);
            output = accullm::goldenGreedy(draft, verifier, prompt, maxNewTokens, draftTokens, eos, &stats);
            for (size_t i = 0; i < output.size(); ++i)
                std::cout << (i ? "," : "") << output[i];
        }
        std::cout << "\n";
        double const seconds
            = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        if (!draftPath.empty())
            std::cerr << "golden: " << stats.accepted << " of " << stats.proposed << " draft tokens accepted ("
                      << 100.0 * stats.acceptanceRate() << "%), "
                      << (stats.verifierPasses ? static_cast<double>(output.size() - 1) / stats.verifierPasses : 0.0)
                      << " tokens per verifier pass, " << output.size() / seconds << " tokens/s\n";
    }
    cudaStreamDestroy(stream);
    return 0;
}
