"""Symmetric integer quantization of weights, per output channel or in blocks along the input dimension.

Weights are in MatMul layout, [in_features, out_features]. Per-channel scales are one per output column
(shape [1, out]); blocked scales are one per (block of ``block_size`` input rows, output column), shape
[ceil(in / block_size), out], the layout of blocked DequantizeLinear with axis 0. When ``in_features`` is not
a multiple of the block size the last block is shorter (ragged), as ONNX's blocked quantization allows.
Zero points are always 0 (TensorRT's explicit-quantization convention) and the grid is symmetric,
[-qmax, qmax]: -8 / -128 are never used.

Blocked scales are rounded to values half precision holds exactly: the rewrite stores them as FP16 (one scale
per block of 64 rows costs 0.25 bits per weight in FP16, 0.5 in FP32), and the integers are computed against
the rounded scales, so storing them in half precision changes nothing.
"""

from __future__ import annotations

import numpy as np

from accullm_export.errors import UserError


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed grid: 127 for int8, 7 for int4 (zero point 0)."""
    if bits not in (4, 8):
        raise UserError(f"weights quantize to 4 or 8 bits, not {bits}")
    return 2 ** (bits - 1) - 1


def block_rows(in_features: int, block_size: int | None) -> int:
    """Rows per block: all of them for per-channel quantization."""
    if block_size is None:
        return in_features
    if block_size < 1:
        raise UserError(f"block size must be positive, got {block_size}")
    return block_size


def block_index(in_features: int, block_size: int | None) -> np.ndarray:
    """For each input row, the index of its block (the row of the scale array)."""
    return np.arange(in_features) // block_rows(in_features, block_size)


def half_representable(scale: np.ndarray) -> np.ndarray:
    """float32 scales rounded to the nearest FP16 value (at least FP16's smallest normal, 6.1e-5: a block whose
    largest weight is under 4e-4 rounds to a few steps of it, an error far under any other block's).

    Raises:
        UserError: a scale beyond FP16's range (a weight over 65504 x qmax).
    """
    scale = np.asarray(scale, dtype=np.float32)
    largest = float(np.finfo(np.float16).max)
    if scale.size and float(scale.max()) > largest:
        raise UserError(f"a block scale of {float(scale.max()):g} does not fit in half precision (max {largest:g}): "
                        "the weights are too large for blocked INT4 with FP16 scales")
    tiny = np.float32(np.finfo(np.float16).tiny)
    return np.maximum(scale, tiny).astype(np.float16).astype(np.float32)


def weight_scales(weight: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """absmax / qmax per (block, output column), float32 [blocks, out]; an all-zero block gets scale 1.
    Blocked scales are rounded to FP16 values (``half_representable``), per-channel scales are not."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    block = block_rows(rows, block_size)
    blocks = -(-rows // block)
    padded = np.zeros((blocks * block, cols), dtype=np.float32)
    padded[:rows] = np.abs(weight)
    scale = padded.reshape(blocks, block, cols).max(axis=1) / np.float32(qmax(bits))
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    return half_representable(scale) if block_size is not None else scale


def quantize_with_scales(weight: np.ndarray, scale: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Round ``weight`` onto the grid of the given scales: int8 values in [-qmax, qmax], shape [in, out]."""
    weight = np.asarray(weight, dtype=np.float32)
    expanded = scale[block_index(weight.shape[0], block_size)]
    limit = qmax(bits)
    return np.clip(np.round(weight / expanded), -limit, limit).astype(np.int8)


def quantize(weight: np.ndarray, bits: int, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer values (int8 storage, [in, out]) and float32 scales ([blocks, out]) of ``weight``."""
    scale = weight_scales(weight, bits, block_size)
    return quantize_with_scales(weight, scale, bits, block_size), scale


def dequantize(values: np.ndarray, scale: np.ndarray, block_size: int | None = None) -> np.ndarray:
    """values * scale, broadcast over each block's rows; float32 [in, out]."""
    values = np.asarray(values)
    return (values.astype(np.float32) * scale[block_index(values.shape[0], block_size)]).astype(np.float32)


def fake_quantize(weight: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Quantize and dequantize ``weight`` [in, out]; float32 result.

    Args:
        weight: MatMul weight, [in_features, out_features].
        bits: 8 or 4.
        block_size: None for one scale per output column; else rows per block along in_features.
    """
    values, scale = quantize(weight, bits, block_size)
    return dequantize(values, scale, block_size)


def row_quantization_error(weight: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Squared quantization error per input row (input channel): sum over outputs of (W - Q(W))^2."""
    weight = np.asarray(weight, dtype=np.float32)
    return ((weight - fake_quantize(weight, bits, block_size)) ** 2).sum(axis=1).astype(np.float64)
