"""Symmetric integer quantization of weights, per output channel or in blocks along the input dimension.

Weights are in MatMul layout, [in_features, out_features]. Per-channel scales are one per output column;
blocked scales are one per (block of ``block_size`` input rows, output column), the layout of blocked
DequantizeLinear with axis 0.
"""

from __future__ import annotations

import numpy as np

from accullm_export.errors import UserError


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed grid: 127 for int8, 7 for int4 (zero point 0)."""
    return 2 ** (bits - 1) - 1


def fake_quantize(weight: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Quantize and dequantize ``weight`` [in, out]; float32 result.

    Args:
        weight: MatMul weight, [in_features, out_features].
        bits: 8 or 4.
        block_size: None for one scale per output column; else rows per block along in_features.
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    block = rows if block_size is None else block_size
    if rows % block:
        raise UserError(f"in_features {rows} is not a multiple of the block size {block}")
    blocks = weight.reshape(rows // block, block, cols)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / qmax(bits)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    quantized = np.clip(np.round(blocks / scale), -qmax(bits), qmax(bits))
    return (quantized * scale).reshape(rows, cols).astype(np.float32)


def row_quantization_error(weight: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Squared quantization error per input row (input channel): sum over outputs of (W - Q(W))^2."""
    weight = np.asarray(weight, dtype=np.float32)
    return ((weight - fake_quantize(weight, bits, block_size)) ** 2).sum(axis=1).astype(np.float64)
