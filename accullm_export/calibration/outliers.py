"""Outlier-channel selection policies. Each is named, documented, and sees the same statistics.

* ``threshold`` (LLM.int8()): channels whose |x| ever exceeds ``threshold`` (default 6.0) on calibration data.
* ``topk``: a budget: the ``k`` channels with the largest absmax in each layer, or, with ``percent``, the
  top ``percent`` % of all channels of the model ranked by absmax over their layer's median absmax.
* ``ratio``: channels whose absmax is over ``ratio`` times their layer's median absmax.
* ``sensitivity`` (OWQ): channels with the largest E[x_c^2] * ||W_c - Q(W_c)||^2, the activation's second
  moment times the quantization error of that input channel's weight row (``bits``, ``block_size``); top ``k``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from accullm_export.errors import UserError
from accullm_export.quant.symmetric import row_quantization_error


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutlierPolicy:
    """The chosen policy and every policy's parameters (all are evaluated for the profile)."""

    name: str = "ratio"
    threshold: float = 6.0
    k: int = 8
    percent: float | None = None
    ratio: float = 20.0
    bits: int = 4
    block_size: int = 128
    version: int = 1

    def __post_init__(self):
        if self.name not in POLICIES:
            raise UserError(f"unknown outlier policy {self.name!r}; choose from {', '.join(POLICIES)}")
        if self.k < 0 or self.ratio <= 0 or self.threshold <= 0:
            raise UserError("outlier policy parameters must be positive (k >= 0)")
        if self.percent is not None and not 0 <= self.percent <= 100:
            raise UserError(f"--topk-percent must be within [0, 100], got {self.percent}")
        if self.bits not in (4, 8):
            raise UserError(f"sensitivity bits must be 4 or 8, got {self.bits}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "OutlierPolicy":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """What the policies read for one linear layer."""

    absmax: np.ndarray
    second_moment: np.ndarray
    weight: Callable[[], np.ndarray] | None  # [in, out]; loaded only by the sensitivity policy


def _threshold(stats: Mapping[str, LayerStatistics], policy: OutlierPolicy) -> dict[str, np.ndarray]:
    return {name: np.flatnonzero(s.absmax > policy.threshold) for name, s in stats.items()}


def _ratio_to_median(absmax: np.ndarray) -> np.ndarray:
    median = float(np.median(absmax))
    return absmax / median if median > 0 else np.zeros_like(absmax)


def _topk(stats: Mapping[str, LayerStatistics], policy: OutlierPolicy) -> dict[str, np.ndarray]:
    if policy.percent is None:
        return {name: _largest(s.absmax, policy.k) for name, s in stats.items()}
    names = list(stats)
    ratios = [_ratio_to_median(stats[name].absmax) for name in names]
    pooled = np.concatenate(ratios)
    budget = int(round(pooled.size * policy.percent / 100))
    if budget == 0:
        return {name: np.zeros(0, dtype=np.int64) for name in names}
    cutoff = np.partition(pooled, pooled.size - budget)[pooled.size - budget]
    return {name: np.flatnonzero(ratio >= cutoff) for name, ratio in zip(names, ratios)}


def _ratio(stats: Mapping[str, LayerStatistics], policy: OutlierPolicy) -> dict[str, np.ndarray]:
    return {name: np.flatnonzero(_ratio_to_median(s.absmax) > policy.ratio) for name, s in stats.items()}


def _sensitivity(stats: Mapping[str, LayerStatistics], policy: OutlierPolicy) -> dict[str, np.ndarray]:
    chosen = {}
    for name, s in stats.items():
        weight = s.weight()
        block = policy.block_size if policy.bits == 4 else None  # int8 is per output channel; int4 blocked
        score = s.second_moment.astype(np.float64) * row_quantization_error(weight, policy.bits, block)
        chosen[name] = _largest(score, policy.k)
    return chosen


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    k = min(k, values.size)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.argpartition(values, values.size - k)[values.size - k:])


POLICIES: dict[str, Callable[[Mapping[str, LayerStatistics], OutlierPolicy], dict[str, np.ndarray]]] = {
    "threshold": _threshold, "topk": _topk, "ratio": _ratio, "sensitivity": _sensitivity}


def select_outliers(stats: Mapping[str, LayerStatistics], policy: OutlierPolicy) -> dict[str, dict[str, list[int]]]:
    """Every policy's choice per layer: {policy: {layer: sorted channel indices}}."""
    return {name: {layer: sorted(int(c) for c in channels) for layer, channels in select(stats, policy).items()}
            for name, select in POLICIES.items()}
