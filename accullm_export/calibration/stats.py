"""Streamed statistics of activations, one accumulator per tapped tensor.

Per channel (the last axis): absmax, p99.9 of |x|, mean |x|, second moment E[x^2], and how often |x|
exceeds the LLM.int8() threshold 6.0. The p99.9 is exact without holding the data: only the top
``n - floor((n - 1) * 0.999)`` magnitudes of each channel can be the percentile's neighbours, so that many
are kept per channel (66 for 65,536 rows), given the total row count up front.

The attention-sink token (position 0 of every sequence) is accumulated separately, since its activations can
be orders of magnitude larger than the rest; the main statistics exclude it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

OUTLIER_THRESHOLD = 6.0  # LLM.int8()
QUANTILE = 0.999
SPARSITY_LEVELS = (0.25, 0.40, 0.50, 0.60, 0.70)
# Magnitude histogram buckets come straight from float32 bit patterns: the top 16 bits (sign, exponent and 7
# mantissa bits) of a positive float split every octave into 128 log-spaced buckets (0.54% wide), with no
# logarithm to compute. Buckets span 2^-30 .. 2^20; smaller values (zeros too) and larger ones get a bin each.
_FIRST_BUCKET = (127 - 30) << 7  # the top 16 bits of 2^-30
_HIST_BINS = 50 << 7


def top_rows_needed(total_rows: int, quantile: float = QUANTILE) -> int:
    """How many of the largest values per channel determine np.percentile(..., quantile) (linear method)."""
    return total_rows - int(np.floor((total_rows - 1) * quantile))


@dataclasses.dataclass
class ChannelStatistics:
    """Accumulates one tensor's per-channel statistics over batches of rows [rows, channels]."""

    channels: int
    expected_rows: int
    rows: int = 0
    abs_sum: np.ndarray = None
    square_sum: np.ndarray = None
    absmax: np.ndarray = None
    over_threshold: np.ndarray = None
    top: np.ndarray = None  # [channels, k], the k largest |x| seen per channel (unsorted)
    sink_rows: int = 0
    sink_absmax: np.ndarray = None
    sink_abs_sum: np.ndarray = None

    def __post_init__(self):
        zeros = lambda dtype=np.float64: np.zeros(self.channels, dtype=dtype)  # noqa: E731
        self.abs_sum, self.square_sum, self.sink_abs_sum = zeros(), zeros(), zeros()
        self.absmax, self.sink_absmax = zeros(np.float32), zeros(np.float32)
        self.over_threshold = zeros(np.int64)
        self.top = np.zeros((self.channels, 0), dtype=np.float32)
        self._keep = top_rows_needed(max(self.expected_rows, 1))

    def update(self, rows: np.ndarray, sink: np.ndarray | None = None) -> None:
        """Add rows [n, channels] (the sink rows, if any, separately)."""
        rows = np.asarray(rows, dtype=np.float32)
        # channel-major: the per-channel reductions and the partition then run over contiguous memory
        magnitude = np.empty(rows.shape[::-1], dtype=np.float32)
        np.abs(rows.T, out=magnitude)
        self.rows += magnitude.shape[1]
        self.abs_sum += magnitude.sum(axis=1, dtype=np.float64)
        self.square_sum += np.einsum("ij,ij->i", magnitude, magnitude).astype(np.float64)
        self.absmax = np.maximum(self.absmax, magnitude.max(axis=1, initial=0.0))
        self.over_threshold += np.count_nonzero(magnitude > OUTLIER_THRESHOLD, axis=1)
        if self.top.shape[1] < self._keep:
            self._fill_top(magnitude)
        else:
            self._merge_top(magnitude)
        if sink is not None and len(sink):
            sink_magnitude = np.abs(np.asarray(sink, dtype=np.float32))
            self.sink_rows += sink_magnitude.shape[0]
            self.sink_absmax = np.maximum(self.sink_absmax, sink_magnitude.max(axis=0))
            self.sink_abs_sum += sink_magnitude.sum(axis=0, dtype=np.float64)

    def _fill_top(self, magnitude: np.ndarray) -> None:
        """The first batches: the running top k from the kept values and all of the batch's."""
        if magnitude.shape[1] > self._keep:  # only this batch's top k can join the running top k
            magnitude = np.partition(magnitude, magnitude.shape[1] - self._keep, axis=1)[:, -self._keep:]
        merged = np.concatenate([self.top, magnitude], axis=1)
        if merged.shape[1] > self._keep:
            merged = np.partition(merged, merged.shape[1] - self._keep, axis=1)[:, -self._keep:]
        self.top = merged

    def _merge_top(self, magnitude: np.ndarray) -> None:
        """Once k values are kept per channel, only a batch value over its channel's smallest kept one can
        join: those few are merged in, each channel's beside its kept values, instead of partitioning the whole
        batch (the kept multiset is the same either way)."""
        keep = self._keep
        above = magnitude > self.top.min(axis=1, keepdims=True)
        counts = np.count_nonzero(above, axis=1)
        selected = np.flatnonzero(counts)
        if not len(selected):
            return
        counts = counts[selected]
        width = int(counts.max())
        padded = np.zeros((len(selected), keep + width), dtype=np.float32)  # a 0 never outranks a kept |x|
        padded[:, :keep] = self.top[selected]
        channel, position = np.nonzero(above[selected])  # grouped by channel, in order
        slot = np.arange(len(channel)) - np.repeat(np.cumsum(counts) - counts, counts)
        padded[channel, keep + slot] = magnitude[selected[channel], position]
        self.top[selected] = np.partition(padded, width, axis=1)[:, width:]

    def percentile(self, quantile: float = QUANTILE) -> tuple[np.ndarray, bool]:
        """Per-channel percentile of |x| (linear interpolation) and whether it is exact."""
        kept = self.top.shape[1]
        exact = top_rows_needed(self.rows, quantile) <= kept
        ordered = np.sort(self.top, axis=1)  # ascending; column j holds overall rank (rows - kept + j)
        position = (self.rows - 1) * quantile - (self.rows - kept)
        low = int(np.clip(np.floor(position), 0, kept - 1))
        high = int(np.clip(low + 1, 0, kept - 1))
        fraction = position - np.floor(position)
        return ordered[:, low] + (ordered[:, high] - ordered[:, low]) * fraction, exact

    def finish(self) -> dict[str, np.ndarray]:
        rows = max(self.rows, 1)
        p999, exact = self.percentile()
        return {
            "absmax": self.absmax,
            "p999": p999.astype(np.float32),
            "mean_abs": (self.abs_sum / rows).astype(np.float32),
            "second_moment": (self.square_sum / rows).astype(np.float32),
            "over_threshold": self.over_threshold,
            "rows": np.int64(self.rows),
            "p999_exact": np.bool_(exact),
            "sink_absmax": self.sink_absmax,
            "sink_mean_abs": (self.sink_abs_sum / max(self.sink_rows, 1)).astype(np.float32),
        }


@dataclasses.dataclass
class MagnitudeHistogram:
    """Log-spaced histogram of |x| over all elements of a tensor (an MLP's down-projection input).

    ``counts[0]`` holds values under 2^-30 (zeros included), ``counts[1:-1]`` the buckets between
    consecutive ``edges()``, ``counts[-1]`` values of 2^20 and over.
    """

    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(_HIST_BINS + 2, dtype=np.int64))

    @staticmethod
    def edges() -> np.ndarray:
        bits = (np.arange(_HIST_BINS + 1, dtype=np.int64) + _FIRST_BUCKET) << 16
        return bits.astype(np.int32).view(np.float32).astype(np.float64)

    def update(self, values: np.ndarray) -> None:
        magnitude = np.abs(np.ascontiguousarray(values, dtype=np.float32)).ravel()
        every_bucket = np.bincount(magnitude.view(np.int32) >> 16, minlength=1 << 15)  # all positive floats
        last = _FIRST_BUCKET + _HIST_BINS
        self.counts[0] += every_bucket[:_FIRST_BUCKET].sum()
        self.counts[1:-1] += every_bucket[_FIRST_BUCKET:last]
        self.counts[-1] += every_bucket[last:].sum()

    def thresholds(self, levels=SPARSITY_LEVELS) -> np.ndarray:
        """|x| under which the given fractions of elements fall (upper bin edge: at least that sparse)."""
        cumulative = np.cumsum(self.counts) / max(self.counts.sum(), 1)
        edges = np.concatenate([[0.0], self.edges(), [np.inf]])
        return np.array([edges[min(int(np.searchsorted(cumulative, level)) + 1, len(edges) - 1)] for level in levels])

    def cdf(self, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(|x|, fraction of elements <= |x|) at ``points`` log-spaced magnitudes, for plots."""
        cumulative = np.cumsum(self.counts[1:-1]) + self.counts[0]
        fractions = cumulative / max(self.counts.sum(), 1)
        chosen = np.linspace(0, _HIST_BINS - 1, points).astype(int)
        return self.edges()[1:][chosen], fractions[chosen]
