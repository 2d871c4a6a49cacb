/*
 * accullm::SparseSkipMLP (version 1): selection, gate/up, activation and the down projection over the kept
 * neurons, as a short sequence of kernels on one stream. See SparseSkipMLPKernel.h for the contract and
 * ../common/lowBitGemm.cuh for the GEMV / tiled GEMM both projections use.
 *
 * Decode (one token) path:
 *   predictor:  hidden = x @ down_rank (GEMV), logits = hidden @ up_rank + guess_bias, keep = logits > level
 *   gate, up:   GEMV over [hidden, intermediate]; with the predictor, a thread skips its 16-byte row segments
 *               when none of their columns is kept (columns are strided in this layout, so this saves bytes
 *               only where the kept neurons cluster)
 *   activation: a = act(gate) * up (act: silu or gelu_tanh), zeroed where not kept (threshold: |a| <= level)
 *   down:       GEMV whose blocks stage only the rows with a != 0 and read only those rows of W_down (and, for
 *               int4, their packed bytes and their blocks' scales)
 * Several tokens take the tiled GEMM for the projections (int4 gate/up with the threshold method: the tensor-core
 * GEMV, up to 16 tokens): each token masked to its own selection, so the union of the tokens' selections is what
 * is computed, as the reference does.
 */
#include "SparseSkipMLPKernel.h"

#include "../common/lowBitGemm.cuh"

namespace
{

using accullm::GemmProblem;
using accullm::make_problem;

constexpr int kDecodeRows = 1; // the GEMV for one token; several tokens take the tiled fallback

struct Shapes
{
    int64_t tokens, hidden, intermediate, rank;
    int32_t method, block_size;
};

struct Layout
{
    size_t gate, up, activation, hidden, logits, keep, scratch, scratch_bytes, total;
};

alignas(16) __half const kAligned[8] = {};

size_t round_up(size_t bytes)
{
    return (bytes + 255) & ~size_t{255};
}

bool predictor(Shapes const& s)
{
    return s.method == ACCULLM_SPARSE_METHOD_PREDICTOR;
}

int projection_kind(Shapes const& s)
{
    return s.block_size > 0 ? accullm::kWeightINT4 : accullm::kWeightFP16;
}

GemmProblem rank_problem(Shapes const& s, void const* x, void const* down_rank, float* hidden)
{
    GemmProblem p = make_problem(accullm::kWeightFP16, s.tokens, s.hidden, s.rank, x, down_rank, nullptr, 0, hidden);
    p.x_is_half = true;
    return p;
}

GemmProblem gate_problem(
    Shapes const& s, void const* x, void const* weight, void const* scale, uint8_t const* keep, float* out)
{
    GemmProblem p
        = make_problem(projection_kind(s), s.tokens, s.hidden, s.intermediate, x, weight, scale, s.block_size, out);
    p.x_is_half = true;
    p.column_keep = keep;
    return p;
}

GemmProblem down_problem(Shapes const& s, float const* activation, void const* weight, void const* scale, void* y)
{
    GemmProblem p = make_problem(
        projection_kind(s), s.tokens, s.intermediate, s.hidden, activation, weight, scale, s.block_size, y);
    p.out_is_half = true;
    p.sparse_rows = true;
    return p;
}

// Buffers for `s.tokens` tokens, then one scratch region for the GEMV partial sums of whichever projection runs
// (they run one after another on the stream), sized for the GEMVs of up to s.tokens tokens with aligned weights.
Layout layout(Shapes const& s)
{
    Layout l{};
    size_t offset = 0;
    auto const take = [&offset](size_t bytes) {
        size_t const at = offset;
        offset += round_up(bytes);
        return at;
    };
    size_t const row_bytes = sizeof(float) * static_cast<size_t>(s.tokens) * s.intermediate;
    l.gate = take(row_bytes);
    l.up = take(row_bytes);
    l.activation = take(row_bytes);
    if (predictor(s))
    {
        l.hidden = take(sizeof(float) * static_cast<size_t>(s.tokens) * s.rank);
        l.logits = take(row_bytes);
        l.keep = take(static_cast<size_t>(s.intermediate));
    }
    l.scratch_bytes = 0; // the most any token count up to s.tokens needs (gate/up take the tensor-core GEMV
    for (int64_t tokens = 1; tokens <= std::min<int64_t>(s.tokens, accullm::kMaxMmaRows); ++tokens) // up to 16)
    {
        Shapes some = s;
        some.tokens = tokens;
        l.scratch_bytes = std::max({l.scratch_bytes,
            accullm::gemm_workspace_bytes(
                gate_problem(some, kAligned, kAligned, kAligned, nullptr, nullptr), kDecodeRows),
            accullm::gemm_workspace_bytes(down_problem(some, nullptr, kAligned, kAligned, nullptr), kDecodeRows)});
        if (predictor(s))
        {
            l.scratch_bytes = std::max(l.scratch_bytes,
                accullm::gemm_workspace_bytes(rank_problem(some, nullptr, kAligned, nullptr), kDecodeRows));
        }
    }
    l.scratch = take(l.scratch_bytes);
    l.total = offset;
    return l;
}

bool valid(Shapes const& s)
{
    bool const method_ok = s.method == ACCULLM_SPARSE_METHOD_THRESHOLD || (predictor(s) && s.rank > 0);
    return method_ok && s.tokens >= 0 && s.hidden > 0 && s.intermediate > 0 && s.rank >= 0 && s.block_size >= 0;
}

// logits[t, n] = guess_bias[n] + hidden[t] . up_rank[:, n]; keep[n] |= logits[t, n] > level.
__global__ void logits_kernel(float const* hidden, __half const* up_rank, __half const* guess_bias,
    __half const* level, int64_t rank, int64_t intermediate, float* logits, uint8_t* keep)
{
    int64_t const n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    int64_t const t = blockIdx.y;
    if (n >= intermediate)
    {
        return;
    }
    float sum = __half2float(guess_bias[n]);
    for (int64_t j = 0; j < rank; ++j)
    {
        sum = fmaf(hidden[t * rank + j], __half2float(up_rank[j * intermediate + n]), sum);
    }
    logits[t * intermediate + n] = sum;
    if (sum > __half2float(*level))
    {
        keep[n] = 1; // every writer writes 1: no race on the value
    }
}

bool known_activation(int32_t activation)
{
    return activation == ACCULLM_SPARSE_ACTIVATION_SILU || activation == ACCULLM_SPARSE_ACTIVATION_GELU_TANH;
}

// The gate's activation in fp32, as reference.py defines it.
template <int32_t ACTIVATION>
__device__ __forceinline__ float gate_activation(float g)
{
    if constexpr (ACTIVATION == ACCULLM_SPARSE_ACTIVATION_GELU_TANH)
    {
        constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
        return 0.5f * g * (1.0f + tanhf(kSqrtTwoOverPi * (g + 0.044715f * g * g * g)));
    }
    else
    {
        return g / (1.0f + expf(-g));
    }
}

// activation[t, n] = act(gate) * up where token t keeps neuron n, else 0.
template <int32_t ACTIVATION>
__global__ void activation_kernel(float const* gate, float const* up, float const* logits, __half const* level,
    int64_t count, float* activation)
{
    float const threshold = __half2float(*level);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float const a = gate_activation<ACTIVATION>(gate[i]) * up[i];
        bool const kept = logits != nullptr ? logits[i] > threshold : fabsf(a) > threshold;
        activation[i] = kept ? a : 0.0f;
    }
}

int blocks_for(int64_t count)
{
    return static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
}

template <int KIND>
cudaError_t projections(Shapes const& s, Layout const& l, char* ws, void const* x, void const* gate_weight,
    void const* up_weight, void const* down_weight, void const* gate_scale, void const* up_scale,
    void const* down_scale, __half const* level, int32_t activation_kind, void* y, cudaStream_t stream)
{
    uint8_t const* keep = predictor(s) ? reinterpret_cast<uint8_t const*>(ws + l.keep) : nullptr;
    float* gate = reinterpret_cast<float*>(ws + l.gate);
    float* up = reinterpret_cast<float*>(ws + l.up);
    float* activation = reinterpret_cast<float*>(ws + l.activation);
    void* scratch = ws + l.scratch;
    cudaError_t status
        = accullm::run_gemm<KIND, __half, kDecodeRows>(gate_problem(s, x, gate_weight, gate_scale, keep, gate),
            scratch, l.scratch_bytes, stream);
    if (status == cudaSuccess)
    {
        status = accullm::run_gemm<KIND, __half, kDecodeRows>(
            gate_problem(s, x, up_weight, up_scale, keep, up), scratch, l.scratch_bytes, stream);
    }
    if (status != cudaSuccess)
    {
        return status;
    }
    int64_t const count = s.tokens * s.intermediate;
    float const* logits = predictor(s) ? reinterpret_cast<float const*>(ws + l.logits) : nullptr;
    if (activation_kind == ACCULLM_SPARSE_ACTIVATION_GELU_TANH)
    {
        activation_kernel<ACCULLM_SPARSE_ACTIVATION_GELU_TANH>
            <<<blocks_for(count), 256, 0, stream>>>(gate, up, logits, level, count, activation);
    }
    else
    {
        activation_kernel<ACCULLM_SPARSE_ACTIVATION_SILU>
            <<<blocks_for(count), 256, 0, stream>>>(gate, up, logits, level, count, activation);
    }
    status = cudaGetLastError();
    if (status != cudaSuccess)
    {
        return status;
    }
    return accullm::run_gemm<KIND, float, kDecodeRows>(
        down_problem(s, activation, down_weight, down_scale, y), scratch, l.scratch_bytes, stream);
}

} // namespace

extern "C" size_t accullm_sparse_skip_mlp_workspace_size(int64_t max_tokens, int64_t hidden, int64_t intermediate,
    int64_t rank, int32_t method, int32_t block_size)
{
    Shapes const s{std::max<int64_t>(max_tokens, 1), hidden, intermediate, rank, method, block_size};
    return valid(s) ? layout(s).total : 0;
}

extern "C" int accullm_sparse_skip_mlp(void const* x, void const* gate_weight, void const* up_weight,
    void const* down_weight, void const* level, void const* down_rank, void const* up_rank, void const* guess_bias,
    void const* gate_scale, void const* up_scale, void const* down_scale, void* y, int64_t tokens, int64_t hidden,
    int64_t intermediate, int64_t rank, int32_t method, int32_t activation, int32_t block_size, void* workspace,
    size_t workspace_bytes, void* stream)
{
    Shapes const s{tokens, hidden, intermediate, rank, method, block_size};
    if (!valid(s) || !known_activation(activation))
    {
        return cudaErrorInvalidValue;
    }
    if (tokens == 0)
    {
        return cudaSuccess;
    }
    bool const pointers_ok = x != nullptr && gate_weight != nullptr && up_weight != nullptr && down_weight != nullptr
        && level != nullptr && y != nullptr && workspace != nullptr
        && (!predictor(s) || (down_rank != nullptr && up_rank != nullptr && guess_bias != nullptr))
        && (block_size == 0 || (gate_scale != nullptr && up_scale != nullptr && down_scale != nullptr));
    Layout const l = layout(s);
    if (!pointers_ok || workspace_bytes < l.total)
    {
        return cudaErrorInvalidValue;
    }
    cudaStream_t const st = static_cast<cudaStream_t>(stream);
    char* ws = static_cast<char*>(workspace);
    __half const* level_value = static_cast<__half const*>(level);
    if (predictor(s))
    {
        float* hidden_rank = reinterpret_cast<float*>(ws + l.hidden);
        cudaError_t status = accullm::run_gemm<accullm::kWeightFP16, __half, kDecodeRows>(
            rank_problem(s, x, down_rank, hidden_rank), ws + l.scratch, l.scratch_bytes, st);
        if (status == cudaSuccess)
        {
            status = cudaMemsetAsync(ws + l.keep, 0, static_cast<size_t>(intermediate), st);
        }
        if (status != cudaSuccess)
        {
            return status;
        }
        dim3 const grid(static_cast<unsigned>((intermediate + 255) / 256), static_cast<unsigned>(tokens));
        logits_kernel<<<grid, 256, 0, st>>>(hidden_rank, static_cast<__half const*>(up_rank),
            static_cast<__half const*>(guess_bias), level_value, rank, intermediate,
            reinterpret_cast<float*>(ws + l.logits), reinterpret_cast<uint8_t*>(ws + l.keep));
        status = cudaGetLastError();
        if (status != cudaSuccess)
        {
            return status;
        }
    }
    if (block_size > 0)
    {
        return projections<accullm::kWeightINT4>(s, l, ws, x, gate_weight, up_weight, down_weight, gate_scale,
            up_scale, down_scale, level_value, activation, y, st);
    }
    return projections<accullm::kWeightFP16>(s, l, ws, x, gate_weight, up_weight, down_weight, gate_scale,
        up_scale, down_scale, level_value, activation, y, st);
}
