"""Run a model over calibration feeds and stream statistics of every linear layer's input.

Inputs are tapped a group at a time: a group holds as many tensors as fit the activation budget for one
batch, and each group is one pass over the data, so a large model never marks every output at once.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from accullm_export.calibration.stats import ChannelStatistics, MagnitudeHistogram
from accullm_export.errors import UserError
from accullm_export.graph.linear import LinearLayer
from accullm_export.runtime.intermediates import IntermediateReader
from accullm_export.progress import progress

log = logging.getLogger(__name__)

# ONNX Runtime's full graph optimizations: the tapped tensors are the ones a deployed session computes
OPTIMIZATION = "all"
Feeds = Callable[[], Iterable[Mapping[str, np.ndarray]]]  # called once per pass; yields input feed dicts


@dataclasses.dataclass
class CollectedStatistics:
    """Per input tensor: channel statistics; per MLP down-projection input: a magnitude histogram."""

    channels: dict[str, ChannelStatistics]
    histograms: dict[str, MagnitudeHistogram]
    passes: int
    batches: int
    batch_digests: list[str]


def plan_groups(tensors: dict[str, int], rows_per_batch: int, budget_bytes: int) -> list[list[str]]:
    """Split tensors (name -> channels) into groups whose fp32 activations for one batch fit the budget."""
    return group_by_size({name: rows_per_batch * channels * 4 for name, channels in tensors.items()}, budget_bytes)


def group_by_size(sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """Consecutive groups of names (in order) whose sizes in bytes fit the budget together; a name whose size
    alone is over it gets a group of its own."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return [group for group in groups if group]


def collect_statistics(model_path: str | Path, layers: list[LinearLayer], feeds: Feeds, *, total_rows: int,
                       rows_per_batch: int, sink: bool, budget_bytes: int = 512 << 20) -> CollectedStatistics:
    """Stream statistics of every linear layer's input over ``feeds``.

    Args:
        model_path: the ONNX model (or exported folder).
        layers: its linear layers (several may share one input tensor; each input is measured once).
        feeds: a callable returning a fresh iterable of feeds for each pass.
        total_rows: rows (tokens) the main statistics will see, for the exact p99.9.
        rows_per_batch: rows per feed, to size the groups.
        sink: treat position 0 of each sequence ([batch, seq, channels] tensors) as the attention sink.
        budget_bytes: activation bytes tapped per batch.
    """
    if not layers:
        raise UserError(f"{model_path} has no linear layers (MatMul/Gemm with an initializer weight) to calibrate")
    inputs = {layer.input: layer.in_features for layer in layers}
    down_inputs = {layer.input for layer in layers if layer.is_mlp_down_projection}
    channels = {name: ChannelStatistics(count, total_rows) for name, count in inputs.items()}
    histograms = {name: MagnitudeHistogram() for name in down_inputs}
    reader = IntermediateReader(model_path, OPTIMIZATION)
    groups = plan_groups(inputs, rows_per_batch, budget_bytes)
    log.info("calibrating %d input tensors of %d linear layers in %d pass(es)", len(inputs), len(layers), len(groups))
    digests: list[str] = []
    batches = 0
    for number, group in enumerate(groups):
        tap = reader.open(group)
        for feed in progress(feeds(), f"calibration pass {number + 1}/{len(groups)}"):
            values = tap.run(feed)
            if number == 0:
                digests.append(_digest(feed))
                batches += 1
            for name in group:
                _accumulate(channels[name], histograms.get(name), values[name], sink)
        # one session (and one batch's values) at a time: the next group's session is made once these are freed
        tap = values = None
    return CollectedStatistics(channels=channels, histograms=histograms, passes=len(groups), batches=batches,
                               batch_digests=digests)


def _accumulate(stats: ChannelStatistics, histogram: MagnitudeHistogram | None, value: np.ndarray,
                sink: bool) -> None:
    value = np.asarray(value)
    if sink and value.ndim == 3:
        stats.update(value[:, 1:, :].reshape(-1, value.shape[-1]), value[:, 0, :])
        main = value[:, 1:, :]
    else:
        stats.update(value.reshape(-1, value.shape[-1]))
        main = value
    if histogram is not None:
        histogram.update(main)


def _digest(feed: Mapping[str, np.ndarray]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(feed):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()[:16]
