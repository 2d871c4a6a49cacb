"""8-bit block scales (``weights.scale_bits = 8``): each INT4 block's scale stored as a uint8 code c on a
logarithmic grid, s = exp(log_min + c * log_step), instead of as an FP16 value.

A blocked INT4 layer spends 16 bits per block on its FP16 scale (0.25 bits per weight at block 64); the code
spends 8 (0.125). The grid is shared by the layers that read the same input (q/k/v; gate/up), so that merging them
(``merge_parallel_linears``) concatenates their codes; it spans the group's smallest to largest positive scale in
255 equal steps of log(s). A code moves its scale by at most half a step, log(max / min) / 510; for the spans
a group's scales have, a weight v * s (|v| <= 15) then moves by a small fraction of a quantization step, where
rounding moved it by up to half a step. The codes are applied last,
after GPTQ and distillation chose the scales, and the integers are kept: only the scales move, to their nearest
code.

The graph decodes them with standard ops, Cast(uint8 -> float32), Mul(log_step), Add(log_min), Exp (and a Cast
to FP16 in an FP16 graph), on constants only: ONNX Runtime folds the chain at load time, so the
DequantizeLinear still has a constant scale and still fuses into ``MatMulNBits``. ``decode`` computes the same
float32 values. The TensorRT bundle decodes them into constants (``fold_scale_casts``): TensorRT's Dequantize
takes only build-time constant scales, and its engine stores its own.

A block whose integers are all zero (the quantizers give it scale 1) gives zero weights whatever its scale:
``code_block_scales`` leaves it out of the grid and gives it code 0, as ``encode`` does a scale that is not
positive.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CODE_LEVELS = 256  # uint8 codes
SCALE_BITS = (16, 8)  # weights.scale_bits: FP16 block scales, or 8-bit codes


def scale_grid(scales: Sequence[np.ndarray]) -> tuple[np.float32, np.float32]:
    """(log_min, log_step) of the grid spanning the positive values of ``scales`` (several layers' [blocks, out]
    scales) in ``CODE_LEVELS - 1`` steps; a single positive value (or none) gets a step of 1."""
    positive = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scales])
    positive = positive[positive > 0]
    if not positive.size:
        return np.float32(0.0), np.float32(1.0)
    low, high = np.log(positive.min()), np.log(positive.max())
    step = (high - low) / (CODE_LEVELS - 1) if high > low else 1.0
    return np.float32(low), np.float32(step)


def encode(scales: np.ndarray, log_min: np.float32, log_step: np.float32) -> np.ndarray:
    """uint8 codes of ``scales``: each positive scale's nearest grid point in log(s) (non-positive ones: 0)."""
    scales = np.asarray(scales, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        position = (np.log(np.where(scales > 0, scales, 1.0)) - float(log_min)) / float(log_step)
    codes = np.clip(np.rint(position), 0, CODE_LEVELS - 1)
    codes = np.where(scales > 0, codes, 0).astype(np.uint8)
    # the nearest point in log(s) can differ from the nearest after float32 decoding by a rounding hair: take
    # whichever of the two neighbours decodes closer
    for shift in (-1, 1):
        other = np.clip(codes.astype(np.int64) + shift, 0, CODE_LEVELS - 1).astype(np.uint8)
        closer = np.abs(decode(other, log_min, log_step) - scales) < np.abs(decode(codes, log_min, log_step) - scales)
        codes = np.where(closer & (scales > 0), other, codes)
    return codes


def decode(codes: np.ndarray, log_min: np.float32, log_step: np.float32) -> np.ndarray:
    """The float32 scales of ``codes``, computed as the graph's Cast, Mul, Add and Exp do."""
    return np.exp(np.asarray(codes).astype(np.float32) * np.float32(log_step) + np.float32(log_min))
