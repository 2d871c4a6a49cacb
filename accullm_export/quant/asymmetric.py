"""Asymmetric blocked INT4 weights (``weights.asymmetric``): each block of ``block_size`` input rows of an
output column gets a scale s and a zero point z in [0, 15], and stores unsigned 4-bit q in [0, 15] with
w ~ (q - z) * s, the ``DequantizeLinear(uint4, scale, uint4 zero point)`` layout that ONNX Runtime fuses into
``MatMulNBits`` with zero points (onnxruntime-genai's builder writes the same when asked for asymmetric INT4).

A block's range [min(w, 0), max(w, 0)] maps onto all 16 levels, where the symmetric grid spends levels on
whichever side of zero the block does not reach. The zero points cost 4 bits per block (0.0625 bits per weight
at block 64). TensorRT takes only zero points of 0 (its IDequantizeLayer: "only symmetric quantization is
supported"): for it ``graph.passes.lower_zero_points`` rewrites this layout as signed INT4 plus a block offset.

The rest of the kit works on the signed integers v = q - z, which lie in [-z, 15 - z]: ``symmetric.dequantize``
(v * s) gives the weight, GPTQ rounds each row into its block's [-z, 15 - z], and distillation trains s with v
fixed. Scales are FP16 values (``symmetric.half_representable``) and z is chosen against the rounded scale.

With ``search`` each block's range is shrunk from both ends, by ratios in ``CLIP_RATIOS`` for the low and the
high end independently, and the candidate with the least rounding error (weighted per input row by E[x^2] when
it is known) is kept; the unshrunk range is a candidate, so the search is never worse than plain rounding.
"""

from __future__ import annotations

import numpy as np

from accullm_export.errors import UserError
from accullm_export.quant.symmetric import (CLIP_RATIOS, block_index, grouped_blocks, half_representable,
                                            rounding_error, search_column_parts)

LEVELS = 15  # the largest unsigned 4-bit value; zero points lie in [0, LEVELS]


def asymmetric_grid(weight: np.ndarray, block_size: int, *, search: bool = False,
                    importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per (block, output column) scale and zero point for blocked uint4 weights.

    Args:
        weight: MatMul weight [in, out].
        block_size: rows per block along the input (the last block may be shorter).
        search: shrink each block's range from both ends to the least weighted rounding error.
        importance: per input row, the weight of its squared error (E[x^2] of that input channel); None: 1.

    Returns:
        (float32 FP16-representable scales [blocks, out], uint8 zero points [blocks, out] in [0, 15]).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise UserError(f"asymmetric quantization takes a 2-D MatMul weight [in, out], got shape {weight.shape}")
    if block_size is None or block_size < 1:
        raise UserError(f"asymmetric INT4 is blocked: give a positive block size, not {block_size}")
    grouped, rows_weight = grouped_blocks(weight, block_size, importance)  # padding rows 0: in every block's range
    low, high = np.minimum(grouped.min(axis=1), 0.0), np.maximum(grouped.max(axis=1), 0.0)
    scales, zero_points = _candidate(low, high)
    if not search:
        return scales, zero_points

    def search_part(part: slice, values: np.ndarray, work: np.ndarray) -> None:
        chosen, chosen_zero, part_low, part_high = scales[:, part], zero_points[:, part], low[:, part], high[:, part]
        least = rounding_error(values, chosen, rows_weight, 0, LEVELS, work, offset=chosen_zero)
        for low_ratio in CLIP_RATIOS:
            for high_ratio in CLIP_RATIOS:
                scale, zero = _candidate(part_low * np.float32(low_ratio), part_high * np.float32(high_ratio))
                error = rounding_error(values, scale, rows_weight, 0, LEVELS, work, offset=zero)
                better = error < least
                np.copyto(chosen, scale, where=better)
                np.copyto(chosen_zero, zero, where=better)
                np.copyto(least, error, where=better)

    search_column_parts(grouped, search_part)
    return scales, zero_points


def _candidate(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point mapping [low, high] (low <= 0 <= high) onto [0, 15]; an all-zero block gets
    scale 1 and zero point 0."""
    span = (high - low).astype(np.float32)
    scale = half_representable(np.where(span == 0, np.float32(1.0), span / np.float32(LEVELS)))
    zero = np.clip(np.round(-low / scale), 0, LEVELS).astype(np.uint8)
    return scale, zero


def row_limits(zero_points: np.ndarray, rows: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input row and output column, the signed range [-z, 15 - z] of its block (float64 [rows, out])."""
    zero = np.asarray(zero_points, dtype=np.float64)[block_index(rows, block_size)]
    return -zero, LEVELS - zero


def quantize_asymmetric(weight: np.ndarray, block_size: int, *, search: bool = False,
                        importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed integers v = q - z (int8 [in, out]), float32 scales and uint8 zero points ([blocks, out]), so that
    ``symmetric.dequantize(v, scales, block_size)`` is the quantized weight and v + z the stored uint4."""
    weight = np.asarray(weight, dtype=np.float32)
    scales, zero_points = asymmetric_grid(weight, block_size, search=search, importance=importance)
    low, high = row_limits(zero_points, weight.shape[0], block_size)
    expanded = scales[block_index(weight.shape[0], block_size)]
    values = np.clip(np.round(weight / expanded), low, high).astype(np.int8)
    return values, scales, zero_points


def stored_unsigned(values: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """The uint4 values q = v + z that DequantizeLinear stores (uint8 [in, out] in [0, 15]).

    Raises:
        UserError: a value outside its block's [-z, 15 - z].
    """
    values = np.asarray(values, dtype=np.int16)
    stored = values + np.asarray(zero_points, dtype=np.int16)[block_index(values.shape[0], block_size)]
    if stored.size and (stored.min() < 0 or stored.max() > LEVELS):
        raise UserError("asymmetric INT4 values fall outside their block's range [-z, 15 - z]")
    return stored.astype(np.uint8)


def signed_values(stored: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """v = q - z from stored uint4 values and their zero points (int8 [in, out])."""
    stored = np.asarray(stored, dtype=np.int16)
    zero = np.asarray(zero_points, dtype=np.int16)[block_index(stored.shape[0], block_size)]
    return (stored - zero).astype(np.int8)
