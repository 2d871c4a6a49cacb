"""Symmetric integer quantization of weights, per output channel or in blocks along the input dimension.

Weights are in MatMul layout, [in_features, out_features]. Per-channel scales are one per output column
(shape [1, out]); blocked scales are one per (block of ``block_size`` input rows, output column), shape
[ceil(in / block_size), out], the layout of blocked DequantizeLinear with axis 0. When ``in_features`` is not
a multiple of the block size the last block is shorter (ragged), as ONNX's blocked quantization allows.
Zero points are always 0 (TensorRT's explicit-quantization convention) and the grid is symmetric,
[-qmax, qmax]: -8 / -128 are never used.

With ``search`` (recipe key ``weights.scale_search``, INT4 only) each block's scale is chosen from candidates
absmax * r / d (r in ``CLIP_RATIOS``, d in {qmax, qmax + 1}) to minimize the block's rounding error, weighted
per input row by E[x^2] when the input's second moments are known; the grid then takes its full range
[-qmax - 1, qmax] (zero point still 0: DequantizeLinear, MatMulNBits and TensorRT read -8 like any value).
Clipping the few largest weights of a block buys a finer step for all the others.

Blocked scales are rounded to values half precision holds exactly: the rewrite stores them as FP16 (one scale
per block of 64 rows costs 0.25 bits per weight in FP16, 0.5 in FP32), and the integers are computed against
the rounded scales, so storing them in half precision changes nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from accullm_export.errors import UserError


CLIP_RATIOS = np.linspace(0.70, 1.0, 13)  # fractions of a block's absmax tried as its clipping level
SEARCH_ELEMENTS = 1 << 18  # weights one search thread evaluates at once: its working arrays stay in cache


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed grid: 127 for int8, 7 for int4 (zero point 0)."""
    if bits not in (4, 8):
        raise UserError(f"weights quantize to 4 or 8 bits, not {bits}")
    return 2 ** (bits - 1) - 1


def qmin(bits: int, search: bool = False) -> int:
    """Most negative grid value: -qmax, or with ``search`` the full two's-complement range (-8 for int4)."""
    return -qmax(bits) - 1 if search else -qmax(bits)


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


def searched_scales(weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None) -> np.ndarray:
    """Per (block, output column), the candidate scale with the least weighted rounding error on the full grid.

    Args:
        weight: MatMul weight [in, out].
        bits: 4 (the search is for blocked INT4).
        block_size: rows per block.
        importance: per input row, the weight of its squared error (E[x^2] of that input channel); None: 1.

    Returns:
        float32 FP16-representable scales [blocks, out]; absmax / qmax is always a candidate (r = 1, d = qmax),
        so the weighted error is never above plain rounding's.
    """
    weight = np.asarray(weight, dtype=np.float32)
    low, high = qmin(bits, search=True), qmax(bits)
    grouped, rows_weight = grouped_blocks(weight, block_size, importance)
    absmax = np.abs(grouped).max(axis=1)
    best = weight_scales(weight, bits, block_size)

    def search(part: slice, values: np.ndarray, work: np.ndarray) -> None:
        peak, chosen = absmax[:, part], best[:, part]
        least = rounding_error(values, chosen, rows_weight, low, high, work)
        for ratio in CLIP_RATIOS:
            for divisor in (high, high + 1):
                candidate = half_representable(np.where(peak == 0, np.float32(1.0), peak * np.float32(ratio / divisor)))
                error = rounding_error(values, candidate, rows_weight, low, high, work)
                better = error < least
                np.copyto(chosen, candidate, where=better)
                np.copyto(least, error, where=better)

    search_column_parts(grouped, search)
    return best


def search_column_parts(grouped: np.ndarray, search: Callable[[slice, np.ndarray, np.ndarray], None]) -> None:
    """Call ``search(columns, values, work)`` over the output columns of ``grouped`` ([blocks, rows, out]) in
    parts of about ``SEARCH_ELEMENTS`` weights, ``values`` the part's weights (contiguous) and ``work`` a scratch
    array shaped like them, on a thread per core: NumPy's loops release the GIL, and each part writes only its
    own columns, so the result does not depend on the order."""
    blocks, rows, cols = grouped.shape
    width = max(1, SEARCH_ELEMENTS // max(1, blocks * rows))

    def one(start: int) -> None:
        part = slice(start, min(start + width, cols))
        values = np.ascontiguousarray(grouped[:, :, part])
        search(part, values, np.empty_like(values))

    starts = range(0, cols, width)
    threads = min(len(starts), os.cpu_count() or 1)
    if threads <= 1:
        for start in starts:
            one(start)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, starts):  # re-raises a part's error
            pass


def rounding_error(values: np.ndarray, scale: np.ndarray, rows_weight: np.ndarray, low: float, high: float,
                   work: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Per (block, column), the sum over the block's rows of weight * (w - Q(w))^2 with
    Q(w) = clip(round(w / scale), low, high) * scale, or with ``offset`` (asymmetric zero points, [blocks, out])
    Q(w) = (clip(round(w / scale) + offset, low, high) - offset) * scale. ``values`` [blocks, rows, out];
    computed in ``work`` (same shape), one pass per operation and no temporary arrays."""
    step = scale[:, None, :]
    np.divide(values, step, out=work)
    np.rint(work, out=work)
    if offset is not None:
        shift = offset[:, None, :].astype(np.float32)
        work += shift
    np.clip(work, low, high, out=work)
    if offset is not None:
        work -= shift
    work *= step
    work -= values
    np.square(work, out=work)
    work *= rows_weight
    return work.sum(axis=1)


def grouped_blocks(weight: np.ndarray, block_size: int,
                   importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [in, out] as [blocks, block_size, out] (a ragged last block padded with zero rows) and each
    row's error weight as [blocks, block_size, 1] (``importance``, or 1; 0 on the padding rows)."""
    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, cols), dtype=np.float32)
    padded[:rows] = weight
    rows_weight = np.zeros(blocks * block_size, dtype=np.float32)
    rows_weight[:rows] = 1.0 if importance is None else np.asarray(importance, dtype=np.float32)
    return padded.reshape(blocks, block_size, cols), rows_weight.reshape(blocks, block_size, 1)


def quantize_with_scales(weight: np.ndarray, scale: np.ndarray, bits: int, block_size: int | None = None,
                         search: bool = False) -> np.ndarray:
    """Round ``weight`` onto the grid of the given scales: int8 values in [qmin, qmax], shape [in, out]."""
    weight = np.asarray(weight, dtype=np.float32)
    expanded = scale[block_index(weight.shape[0], block_size)]
    return np.clip(np.round(weight / expanded), qmin(bits, search), qmax(bits)).astype(np.int8)


def quantize(weight: np.ndarray, bits: int, block_size: int | None = None, *, search: bool = False,
             importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer values (int8 storage, [in, out]) and float32 scales ([blocks, out]) of ``weight``; ``search``
    (blocked only) picks each block's scale by ``searched_scales``."""
    if search and block_size is not None:
        scale = searched_scales(weight, bits, block_size, importance)
    else:
        scale, search = weight_scales(weight, bits, block_size), False
    return quantize_with_scales(weight, scale, bits, block_size, search), scale


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
