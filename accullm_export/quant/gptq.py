"""GPTQ: quantize a weight one input row at a time, spreading each row's rounding error onto the rows not yet
quantized so that the layer's output, not its weight, stays close (Frantar et al., 2022).

The objective is the layer-output error over the calibration inputs X: ||X W - X Q||^2 = trace(D^T H D) with
D = W - Q and H = X^T X / n, the mean outer product of the layer's input (see
``accullm_export.calibration.hessian``). Quantizing input row i optimally moves the remaining rows by the
Schur-complement update of H^-1; the upper Cholesky factor U of H^-1 (H^-1 = U^T U) holds every such update
at once, so row i's error goes onto rows j > i as U[i, j] / U[i, i] * error. Updates are applied lazily: within
a batch of rows immediately, to the rows after it in one matrix product.

Choices that keep the result on the exact layout of ``accullm_export.quant.symmetric`` (and of blocked
DequantizeLinear):

* rows are processed in their natural order 0..in-1 (no act-order), and
* scales are "static groups": computed by ``weight_scales`` from the original weight before any update (or
  given: ``gptq_grid`` makes them, with asymmetric INT4's zero points, and each row is then rounded into its
  block's signed range [-z, 15 - z], see ``quant.asymmetric``).

Rows listed in ``exclude`` (outlier input channels computed exactly in FP16 elsewhere) come back as 0 and do not
count towards the block scales: they are dropped from the problem (they neither receive nor spread error: H is
restricted to the kept rows).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from accullm_export.errors import UserError
from accullm_export.quant.asymmetric import asymmetric_grid, row_limits
from accullm_export.quant.symmetric import block_index, qmax, qmin, searched_scales, weight_scales

log = logging.getLogger(__name__)

DAMPING_RETRIES = 3  # after the first attempt, each retry multiplies the damping by 10
COLUMNS = 8192  # output columns per working copy
FACTOR_BLOCK = 256  # rows per block of the in-place Cholesky factor and triangular inverse


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int | None = None, *,
                  exclude: Sequence[int] = (), damp: float = 0.01, batch: int = 128,
                  act_order: bool = False, search: bool = False,
                  grid: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``weight`` with GPTQ error compensation.

    Args:
        weight: MatMul weight, [in_features, out_features].
        hessian: mean x x^T of the layer's input, [in_features, in_features] (float64 preferred).
        bits: 8 or 4.
        block_size: None for one scale per output column; else rows per block along in_features.
        exclude: input rows to leave out (returned as exactly 0; they get and give no error).
        damp: fraction of the mean diagonal of H added to the diagonal (retried x10 if H is not definite).
        batch: rows per lazy update.
        act_order: round the rows with the largest H[i, i] first (GPTQ's "act-order"). The scales stay fixed
            per block ("static groups"), so the result keeps the blocked DequantizeLinear layout.
        search: blocked only: pick each block's scale by ``symmetric.searched_scales`` (rounding error weighted
            by H[i, i]) and round onto the full grid [qmin, qmax].
        grid: (scales, uint8 zero points), both [blocks, out], from ``gptq_grid(..., asymmetric=True)``: blocked
            INT4 with zero points; each row is rounded into its block's [-z, 15 - z] (``search`` then only
            describes how the grid was made).

    Returns:
        int8 values [in, out] in [qmin, qmax] and float32 scales [blocks, out], so that
        ``symmetric.dequantize(values, scales, block_size)`` is the quantized weight.

    Raises:
        UserError: shapes disagree, H is not finite, or H stays indefinite after damping.
    """
    return _gptq(weight, hessian, bits, block_size, exclude, damp, batch, act_order, search, grid=grid)


def _gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int | None, exclude: Sequence[int],
          damp: float, batch: int, act_order: bool, search: bool,
          grid: tuple[np.ndarray, np.ndarray] | None = None,
          columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ over the rows not in ``exclude``, ``columns`` output columns at a time (the float64 working copy of
    a vocabulary-sized head would otherwise be several times the weight)."""
    weight, hessian = _checked(weight, hessian, batch, damp)
    rows = weight.shape[0]
    excluded = _excluded_mask(rows, exclude)
    search = search and block_size is not None
    if grid is None:
        scales, _ = gptq_grid(weight, hessian, bits, block_size, exclude=exclude, search=search)
        limits = (qmin(bits, search), qmax(bits))
    else:
        scales, zero_points = grid
        if block_size is None or bits != 4 or scales.shape != zero_points.shape \
                or scales.shape != (-(-rows // block_size), weight.shape[1]):
            raise UserError(f"GPTQ's asymmetric grid must be blocked INT4 scales and zero points of shape "
                            f"[{-(-rows // block_size) if block_size else '?'}, {weight.shape[1]}], got "
                            f"{scales.shape} and {zero_points.shape}")
        limits = None  # each row's own [-z, 15 - z], made per part of the columns
    values = np.zeros(weight.shape, dtype=np.int8)
    kept = np.flatnonzero(~excluded)
    if kept.size == 0:
        return values, scales
    order = np.argsort(-np.diag(hessian)[kept], kind="stable") if act_order else np.arange(kept.size)
    solved = kept[order]
    diagonal = np.diag(hessian)[solved].astype(np.float64)
    dead = diagonal == 0
    diagonal[dead] = 1.0  # an input that never fires: any weight is exact, so quantize it to 0
    upper = _upper_factor(lambda: _reversed_reduced(hessian, solved), damp, reference=float(np.mean(diagonal)))
    solved_blocks = block_index(rows, block_size)[solved]
    for start in range(0, weight.shape[1], columns):  # output columns are independent problems sharing H
        part = slice(start, min(start + columns, weight.shape[1]))
        work = weight[solved, part].astype(np.float64)
        work[dead] = 0.0
        row_scales = scales[solved_blocks, part].astype(np.float64)
        part_limits = limits if grid is None else \
            tuple(bound[solved] for bound in row_limits(grid[1][:, part], rows, block_size))
        values[solved, part] = _quantize_rows(work, upper, row_scales, part_limits, batch, count=kept.size)
    return values, scales


def gptq_grid(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int | None, *,
              exclude: Sequence[int] = (), search: bool = False, asymmetric: bool = False,
              columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray | None]:
    """The static-group grid GPTQ rounds onto, from the weight before any update with the ``exclude`` rows
    zeroed: (scales, None) for the symmetric grid (``search``: ``symmetric.searched_scales``, errors weighted by
    H[i, i]), or with ``asymmetric`` (blocked INT4) (scales, zero points) by ``asymmetric.asymmetric_grid``,
    to pass to ``gptq_quantize(..., grid=...)``. Each output column's grid is its own, so it is made
    ``columns`` columns at a time: a large vocabulary's head holds one part's working copies, not the whole
    weight's."""
    weight = np.asarray(weight, dtype=np.float32)
    excluded = _excluded_mask(weight.shape[0], exclude)
    importance = np.where(excluded, 0.0, np.diag(np.asarray(hessian)).astype(np.float64))
    if asymmetric and (bits != 4 or block_size is None):
        raise UserError("asymmetric weights are blocked INT4")
    parts = []
    for start in range(0, weight.shape[1], columns):
        original = np.where(excluded[:, None], np.float32(0.0), weight[:, start:start + columns])
        if asymmetric:
            parts.append(asymmetric_grid(original, block_size, search=search, importance=importance))
        elif search and block_size is not None:
            parts.append((searched_scales(original, bits, block_size, importance=importance), None))
        else:
            parts.append((weight_scales(original, bits, block_size), None))
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([scales for scales, _ in parts], axis=-1),
            None if parts[0][1] is None else np.concatenate([zeros for _, zeros in parts], axis=-1))


def gptq_proxy_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """trace((W - Q)^T H (W - Q)): the mean squared layer-output error the quantization causes on the inputs H
    was measured on (summed over output columns).

    Args:
        weight: the original weight [in, out].
        dequantized: its quantized version [in, out].
        hessian: mean x x^T of the layer's input, [in, in].
    """
    difference = np.asarray(weight, dtype=np.float64) - np.asarray(dequantized, dtype=np.float64)
    hessian = np.asarray(hessian, dtype=np.float64)
    if difference.ndim != 2 or hessian.shape != (difference.shape[0],) * 2:
        raise UserError(f"weight {difference.shape} and hessian {hessian.shape} do not match")
    return float(np.einsum("io,io->", difference, hessian @ difference))


def _checked(weight: np.ndarray, hessian: np.ndarray, batch: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    weight = np.asarray(weight)
    hessian = np.asarray(hessian)  # a float32 H stays float32 (exact in float64): only its reduced copy widens
    if hessian.dtype.kind != "f":
        hessian = hessian.astype(np.float64)
    if weight.ndim != 2:
        raise UserError(f"GPTQ needs a 2-D MatMul weight [in, out], got shape {weight.shape}")
    if hessian.shape != (weight.shape[0], weight.shape[0]):
        raise UserError(f"GPTQ Hessian has shape {hessian.shape}; the weight {weight.shape} needs "
                        f"({weight.shape[0]}, {weight.shape[0]})")
    if batch < 1:
        raise UserError(f"GPTQ batch must be positive, got {batch}")
    if not damp > 0:
        raise UserError(f"GPTQ damping must be positive, got {damp}")
    if not np.isfinite(hessian).all():
        raise UserError("GPTQ Hessian has non-finite entries (NaN or inf): the calibration activations "
                        "overflowed; recalibrate, e.g. in float32")
    if not np.isfinite(weight).all():
        raise UserError("GPTQ weight has non-finite entries (NaN or inf)")
    return weight, hessian


def _excluded_mask(rows: int, exclude: Sequence[int]) -> np.ndarray:
    indices = np.asarray(list(exclude), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= rows):
        raise UserError(f"excluded input channels must lie in [0, {rows}), got {sorted(set(indices.tolist()))}")
    mask = np.zeros(rows, dtype=bool)
    mask[indices] = True
    return mask


def _inverse_cholesky_upper(hessian: np.ndarray, damp: float, reference: float) -> np.ndarray:
    """Upper U with U^T U = (H + damping I)^-1, the damping ``damp`` x ``reference`` (a mean H[i, i]), raised x10
    while H is not positive definite (``_upper_factor`` on a float64 copy of H)."""
    return _upper_factor(lambda: _reversed(np.array(hessian, dtype=np.float64)), damp, reference)


def _reversed_reduced(hessian: np.ndarray, solved: np.ndarray) -> np.ndarray:
    """J H_s J in float64: H restricted to the rows and columns ``solved`` in that order, then both reversed,
    gathered a block of rows at a time (no float32 copy of the whole); a zero diagonal entry (an input that
    never fires) becomes 1."""
    order = solved[::-1]
    work = np.empty((order.size, order.size))
    for start in range(0, order.size, FACTOR_BLOCK):
        work[start:start + FACTOR_BLOCK] = hessian[order[start:start + FACTOR_BLOCK]][:, order]
    diagonal = np.einsum("ii->i", work)  # a writable view
    diagonal[diagonal == 0] = 1.0
    return work


def _upper_factor(make, damp: float, reference: float) -> np.ndarray:
    """Upper U with U^T U = (H + damping I)^-1 from ``make()``, a fresh float64 J H J (H with its rows and
    columns reversed), which it overwrites: U is that matrix's memory, so a down projection's factor holds one
    [in, in] float64 matrix (and blocks of it), not several. The damping is ``damp`` x ``reference`` (a mean
    H[i, i]), raised x10 while H is not positive definite, each try on a new ``make()``.

    With L L^T = J H J, U = J L^-1 J is upper and U^T U = H^-1: one Cholesky and one triangular inverse, where
    inverting H and factoring H^-1 would square its condition number."""
    for attempt in range(DAMPING_RETRIES + 1):
        fraction = damp * 10.0 ** attempt
        work = None  # the failed try's matrix is freed before the next is made
        work = make()
        np.einsum("ii->i", work)[:] += fraction * reference
        if not _cholesky_in_place(work):
            log.debug("GPTQ Hessian not positive definite with damping %g; retrying with more", fraction)
            continue
        _lower_inverse_in_place(work)
        upper = _reversed(work)
        if np.isfinite(upper).all():
            if attempt:
                log.warning("GPTQ Hessian needed damping %g (asked for %g) to be positive definite", fraction, damp)
            return upper
    raise UserError(f"GPTQ Hessian is not positive definite even with damping {fraction:g} x its mean diagonal: "
                    "collect it over more calibration tokens or quantize this layer without GPTQ")


def _cholesky_in_place(matrix: np.ndarray) -> bool:
    """L with L L^T = ``matrix`` (symmetric, C-contiguous float64), written over it with zeros above the
    diagonal: blocked, right-looking, so its only temporaries are a block column. False if it is not positive
    definite (the matrix is then spoiled)."""
    rows = matrix.shape[0]
    for start in range(0, rows, FACTOR_BLOCK):
        stop = min(start + FACTOR_BLOCK, rows)
        try:
            block = np.linalg.cholesky(matrix[start:stop, start:stop])
        except np.linalg.LinAlgError:
            return False
        matrix[start:stop, start:stop] = block
        if stop == rows:
            break
        panel = matrix[stop:, start:stop]
        panel[...] = np.linalg.solve(block, panel.T).T  # L21 = A21 L11^-T
        for column in range(stop, rows, FACTOR_BLOCK):  # the trailing lower part: A22 -= L21 L21^T
            end = min(column + FACTOR_BLOCK, rows)
            matrix[column:, column:end] -= matrix[column:, start:stop] @ matrix[column:end, start:stop].T
    for start in range(0, rows, FACTOR_BLOCK):  # the trailing updates wrote above the diagonal blocks' diagonals
        stop = min(start + FACTOR_BLOCK, rows)
        matrix[start:stop, stop:] = 0.0
        matrix[start:stop, start:stop] = np.tril(matrix[start:stop, start:stop])
    return True


def _lower_inverse_in_place(lower: np.ndarray) -> None:
    """L^-1 written over the lower-triangular ``lower`` (zeros above the diagonal), a block column at a time from
    the last: with X22 = L22^-1 already in place, inv([[L11, 0], [L21, L22]]) has X21 = -X22 L21 L11^-1."""
    rows = lower.shape[0]
    for start in reversed(range(0, rows, FACTOR_BLOCK)):
        stop = min(start + FACTOR_BLOCK, rows)
        first = np.tril(np.linalg.inv(lower[start:stop, start:stop]))  # LU leaves rounding noise above the diagonal
        if stop < rows:
            lower[stop:, start:stop] = -((lower[stop:, stop:] @ lower[stop:, start:stop]) @ first)
        lower[start:stop, start:stop] = first


def _reversed(matrix: np.ndarray) -> np.ndarray:
    """``matrix[::-1, ::-1]`` in place (C-contiguous: its flat order reversed), swapping a part at a time."""
    flat = matrix.reshape(-1)
    size, part = flat.size, FACTOR_BLOCK * FACTOR_BLOCK * 4
    for start in range(0, size // 2, part):
        stop = min(start + part, size // 2)
        front = flat[start:stop].copy()
        flat[start:stop] = flat[size - stop:size - start][::-1]
        flat[size - stop:size - start] = front[::-1]
    return matrix


def _quantize_rows(work: np.ndarray, upper: np.ndarray, row_scales: np.ndarray, limits: tuple,
                   batch: int, count: int) -> np.ndarray:
    """The GPTQ loop over the first ``count`` rows of ``work`` (float64, updated in place; the rows after them
    only receive updates); returns their int8 values. ``limits``: the grid's (low, high), two ints or two
    [count, out] arrays (each row's own range)."""
    low, high = limits
    per_row = np.ndim(low) == 2
    values = np.zeros((count, work.shape[1]), dtype=np.int8)
    for start in range(0, count, batch):
        stop = min(start + batch, count)
        block = work[start:stop]  # a view: the in-batch updates land in ``work``
        errors = np.zeros_like(block)
        for offset in range(stop - start):
            row = start + offset
            quantized = np.clip(np.round(block[offset] / row_scales[row]), low[row] if per_row else low,
                                high[row] if per_row else high)
            values[row] = quantized.astype(np.int8)
            errors[offset] = (block[offset] - quantized * row_scales[row]) / upper[row, row]
            block[offset + 1:] -= np.outer(upper[row, row + 1:stop], errors[offset])
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return values
