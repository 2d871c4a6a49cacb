"""NumPy reference of ``accullm::SparseSkipMLP`` (version 1): what the TensorRT plugin must compute.

Inputs (by position; 5-7 only for ``method="predictor"``, 8-10 only when ``block_size`` > 0):
    0 x            [..., H]   float (fp32 or fp16)
    1 gate_weight  [H, I]     float, or int4 blocked along H when block_size > 0
    2 up_weight    [H, I]     as gate_weight
    3 down_weight  [I, H]     float, or int4 blocked along I when block_size > 0
    4 level        scalar     the selection level (|a| threshold, or the guesser's tau)
    5 down_rank    [H, r]     the guesser: logits = (x @ down_rank) @ up_rank + guess_bias
    6 up_rank      [r, I]
    7 guess_bias   [I]
    8-10 gate_scale [H/b, I], up_scale [H/b, I], down_scale [I/b, H]   (symmetric, zero point 0)
Attributes: method ("threshold" | "predictor"), block_size (0: float weights), activation (the gate's, a key of
ACTIVATIONS: 0 silu, 1 gelu_tanh; absent means 0).
Output: y [..., H].

Per token t: a = act(x W_gate) * (x W_up); score = |a| (threshold) or the guesser's logits (predictor); neuron n
is kept where score[t, n] > level; y[t] = sum over kept n of a[t, n] * W_down[n]. A kernel reads only the kept
rows/columns (for int4: whole packed blocks of the kept neurons' columns of gate/up, and the kept rows of
down, each row's int4 values and its block's scale).
"""

from __future__ import annotations

import numpy as np

OP_TYPE, DOMAIN, VERSION = "SparseSkipMLP", "accullm", 1


def silu(gate: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return gate / (1.0 + np.exp(-gate))


def gelu_tanh(gate: np.ndarray) -> np.ndarray:
    """ONNX Gelu with approximate="tanh": 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate ** 3)))


ACTIVATIONS = {0: silu, 1: gelu_tanh}  # the ``activation`` attribute -> the gate's activation


def dequantize_blocked(values: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """int4 values [K, N] with scales [ceil(K / block_size), N] along axis 0 -> float64."""
    return values.astype(np.float64) * np.repeat(scales.astype(np.float64), block_size, axis=0)[:values.shape[0]]


def sparse_skip_mlp(x, gate_weight, up_weight, down_weight, level, down_rank=None, up_rank=None, guess_bias=None,
                    gate_scale=None, up_scale=None, down_scale=None, *, method: str, block_size: int = 0,
                    activation: int = 0):
    """y for every token of x; computed in float64 and returned in x's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; the op takes {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    if block_size:
        gate_weight = dequantize_blocked(gate_weight, gate_scale, block_size)
        up_weight = dequantize_blocked(up_weight, up_scale, block_size)
        down_weight = dequantize_blocked(down_weight, down_scale, block_size)
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).astype(np.float64)
    gate_weight, up_weight, down_weight = (np.asarray(w, np.float64) for w in (gate_weight, up_weight, down_weight))
    out = np.zeros((rows.shape[0], down_weight.shape[1]))
    for t, row in enumerate(rows):
        if method == "predictor":
            score = row @ np.asarray(down_rank, np.float64) @ np.asarray(up_rank, np.float64) + guess_bias
            kept = np.flatnonzero(score > level)
            gate, up = row @ gate_weight[:, kept], row @ up_weight[:, kept]
            values = act(gate) * up
        elif method == "threshold":
            gate, up = row @ gate_weight, row @ up_weight
            full = act(gate) * up
            kept = np.flatnonzero(np.abs(full) > level)
            values = full[kept]
        else:
            raise ValueError(f"unknown method {method!r}")
        out[t] = values @ down_weight[kept]
    return out.reshape(*shape[:-1], down_weight.shape[1]).astype(x.dtype)
