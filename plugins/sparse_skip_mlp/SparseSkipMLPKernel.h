/*
 * accullm::SparseSkipMLP (version 1) CUDA kernel: C ABI, no TensorRT types.
 *
 * Semantics: plugins/sparse_skip_mlp/reference.py. Per token t, a[t] = act(x[t] W_gate) * (x[t] W_up) over the
 * neurons token t keeps (score > level; score = |a| for "threshold", the guesser's logits
 * (x[t] down_rank) up_rank + guess_bias for "predictor"), and y[t] = sum over kept n of a[t, n] W_down[n]. act is
 * silu(g) = g / (1 + exp(-g)) or gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))).
 *
 * All float tensors are fp16; a[t] and the selection are computed in fp32. int4 weights (block_size > 0) are
 * packed two per byte, low nibble first, row-major: gate/up [hidden, intermediate] blocked along hidden with
 * fp16 scales [ceil(hidden / block_size), intermediate]; down [intermediate, hidden] blocked along intermediate
 * with fp16 scales [ceil(intermediate / block_size), hidden].
 *
 * One token (decode): the selection is computed first, then only the kept neurons' rows of W_down are read (in
 * place, no copy), and with the predictor only the 16-byte segments of W_gate / W_up rows holding a kept column.
 * Several tokens: dense gate/up, each token masked to its own selection, down over the union (the reference's
 * numbers exactly; no bytes saved).
 *
 * Pointers, stream and result as every accullm kernel's: ../common/accullmKernelApi.h.
 */
#ifndef ACCULLM_SPARSE_SKIP_MLP_KERNEL_H
#define ACCULLM_SPARSE_SKIP_MLP_KERNEL_H

#include "../common/accullmKernelApi.h"

#define ACCULLM_SPARSE_METHOD_THRESHOLD 0
#define ACCULLM_SPARSE_METHOD_PREDICTOR 1

/* The gate's activation: reference.py's ACTIVATIONS, the op's activation attribute. */
#define ACCULLM_SPARSE_ACTIVATION_SILU 0
#define ACCULLM_SPARSE_ACTIVATION_GELU_TANH 1

/* Workspace bytes for any call with at most max_tokens tokens (rank: the guesser's r, 0 for threshold). */
ACCULLM_KERNEL_API size_t accullm_sparse_skip_mlp_workspace_size(int64_t max_tokens, int64_t hidden,
    int64_t intermediate, int64_t rank, int32_t method, int32_t block_size);

/*
 * x [tokens, hidden]; level: one fp16 value (device); down_rank [hidden, rank], up_rank [rank, intermediate],
 * guess_bias [intermediate] (predictor only, else may be NULL); *_scale only when block_size > 0;
 * y [tokens, hidden]; activation one of ACCULLM_SPARSE_ACTIVATION_*.
 */
ACCULLM_KERNEL_API int accullm_sparse_skip_mlp(void const* x, void const* gate_weight, void const* up_weight,
    void const* down_weight, void const* level, void const* down_rank, void const* up_rank, void const* guess_bias,
    void const* gate_scale, void const* up_scale, void const* down_scale, void* y, int64_t tokens, int64_t hidden,
    int64_t intermediate, int64_t rank, int32_t method, int32_t activation, int32_t block_size, void* workspace,
    size_t workspace_bytes, void* stream);

#endif /* ACCULLM_SPARSE_SKIP_MLP_KERNEL_H */
