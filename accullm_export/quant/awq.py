"""Activation-aware weight scaling (AWQ, Lin et al., 2023), searched from per-channel statistics only.

AWQ multiplies input row c of a weight by s[c] before quantizing and divides the activation channel c by s[c]
(folded into the previous layer or an explicit Mul), so that channels with large activations get a finer
effective grid: X W = (X diag(s)^-1) (diag(s) W). Candidates are s = mean|x| ** alpha for alpha on a grid in
[0, 1], normalised by sqrt(max(s) * min(s)) as AWQ does; alpha 0 (s = 1, plain rounding) is always one of them,
so the result is never worse than rounding under the proxy below.

The proxy: the output error of (X diag(s)^-1) Q(diag(s) W) against X W, with the input covariance E[x x^T]
replaced by its diagonal E[x^2]:

    sum over weights, over kept channels c, of E[x_c^2] / s[c]^2 * ||Q(diag(s) W)[c, :] - s[c] W[c, :]||^2.

The diagonal approximation ignores cross-channel covariance (errors of different rows that cancel or add up in
the output): the calibration profile keeps per-channel moments only, not raw activations or the full
covariance. For GPTQ, which needs the covariance, see ``accullm_export.calibration.hessian``.

Excluded channels (outliers computed exactly in FP16 elsewhere) keep s = 1, are zeroed before quantizing so they
do not widen any block's scale, and are left out of the error.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from accullm_export.errors import UserError
from accullm_export.quant.symmetric import fake_quantize

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AwqResult:
    """The chosen per-input-channel scales and the proxy error of every candidate.

    Attributes:
        scales: float32 [in]; multiply the weights' input rows by them, divide the activations by them.
        alpha: the exponent of mean|x| that produced ``scales``.
        errors: (alpha, proxy error) for every candidate, in grid order.
        baseline_error: the proxy error of plain rounding (alpha 0, s = 1).
    """

    scales: np.ndarray
    alpha: float
    errors: list[tuple[float, float]]
    baseline_error: float


def search_awq_scales(weights: Sequence[np.ndarray], mean_abs: np.ndarray, second_moment: np.ndarray, bits: int,
                      block_size: int | None, *, exclude: Sequence[int] = (), grid: int = 20) -> AwqResult:
    """Grid-search AWQ's scale exponent for weights that share one input.

    Args:
        weights: MatMul weights [in, out_k] reading the same activation (e.g. q, k and v projections).
        mean_abs: mean |x| per input channel, [in].
        second_moment: E[x^2] per input channel, [in].
        bits: 8 or 4.
        block_size: None for one scale per output column; else rows per block along in_features.
        exclude: input channels handled elsewhere (scale 1, left out of quantization and of the error).
        grid: number of steps; alpha runs over linspace(0, 1, grid + 1).

    Returns:
        The scales with the smallest proxy error (the first such alpha on ties).

    Raises:
        UserError: shapes disagree, statistics are negative or not finite, or grid < 1.
    """
    combined, mean_abs, second_moment, kept = _checked(weights, mean_abs, second_moment, exclude, grid)
    active = kept & (mean_abs > 0)
    errors: list[tuple[float, float]] = []
    best_scales, best_alpha, best_error = None, 0.0, np.inf
    for step in range(grid + 1):
        alpha = step / grid  # linspace(0, 1, grid + 1), without its 0.30000000000000004
        scales = candidate_scales(mean_abs, alpha, active)
        error = awq_proxy_error(combined, scales, second_moment, kept, bits, block_size)
        errors.append((alpha, error))
        if error < best_error:
            best_scales, best_alpha, best_error = scales, alpha, error
    log.debug("AWQ alpha %.2f: proxy error %.4g (rounding %.4g)", best_alpha, best_error, errors[0][1])
    return AwqResult(scales=best_scales, alpha=best_alpha, errors=errors, baseline_error=errors[0][1])


def candidate_scales(mean_abs: np.ndarray, alpha: float, active: np.ndarray) -> np.ndarray:
    """mean_abs ** alpha on the active channels, normalised by sqrt(max * min) over them; 1 elsewhere (float32)."""
    scales = np.ones(mean_abs.shape, dtype=np.float64)
    if active.any():
        powered = mean_abs[active].astype(np.float64) ** alpha
        scales[active] = powered / np.sqrt(powered.max() * powered.min())
    return scales.astype(np.float32)


def awq_proxy_error(weight: np.ndarray, scales: np.ndarray, second_moment: np.ndarray, kept: np.ndarray, bits: int,
                    block_size: int | None) -> float:
    """The diagonal-covariance output error of quantizing diag(scales) @ weight (see the module docstring).

    Args:
        weight: [in, out], the shared-input weights side by side (scales are per output column or block, so
            quantizing them together equals quantizing each alone).
        scales: float32 [in].
        second_moment: E[x^2] per input channel, [in].
        kept: bool [in]; False rows are zeroed before quantizing and left out of the sum.
        bits: 8 or 4.
        block_size: None or rows per block.
    """
    scaled = np.where(kept[:, None], weight * scales[:, None], np.float32(0.0)).astype(np.float32)
    difference = (fake_quantize(scaled, bits, block_size) - scaled).astype(np.float64)
    per_row = np.einsum("io,io->i", difference, difference)
    weights = second_moment.astype(np.float64) / scales.astype(np.float64) ** 2
    return float(np.sum(weights[kept] * per_row[kept]))


def _checked(weights: Sequence[np.ndarray], mean_abs: np.ndarray, second_moment: np.ndarray,
             exclude: Sequence[int], grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The weights side by side, the statistics as float64, and which channels are not excluded."""
    if not weights:
        raise UserError("AWQ needs at least one weight")
    arrays = [np.asarray(weight, dtype=np.float32) for weight in weights]
    rows = arrays[0].shape[0] if arrays[0].ndim == 2 else -1
    if any(array.ndim != 2 or array.shape[0] != rows for array in arrays):
        raise UserError(f"AWQ weights must be [in, out] with one in_features; got {[a.shape for a in arrays]}")
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    second_moment = np.asarray(second_moment, dtype=np.float64)
    for name, statistic in (("mean |x|", mean_abs), ("second moment", second_moment)):
        if statistic.shape != (rows,):
            raise UserError(f"AWQ {name} has shape {statistic.shape}; the weights need ({rows},)")
        if not np.isfinite(statistic).all() or (statistic < 0).any():
            raise UserError(f"AWQ {name} must be finite and non-negative")
    if grid < 1:
        raise UserError(f"AWQ grid must be at least 1, got {grid}")
    indices = np.asarray(list(exclude), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= rows):
        raise UserError(f"excluded input channels must lie in [0, {rows}), got {sorted(set(indices.tolist()))}")
    kept = np.ones(rows, dtype=bool)
    kept[indices] = False
    return np.concatenate(arrays, axis=1), mean_abs, second_moment, kept
