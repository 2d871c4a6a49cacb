"""Stream the mean outer product H = E[x x^T] (and the mean E[x]) of chosen activation tensors over calibration
feeds (for GPTQ), and the same of the attention sink's position alone.

x is a tensor's last axis (the channels) and the mean runs over every other position. Tensors are tapped a
group at a time, as ``accullm_export.calibration.collect`` does: a group's fp32 activations for one batch fit
``budget_bytes``, and each group is one pass over the feeds. Per-batch sizes come from ONNX shape inference with
the symbolic input dimensions bound to the first feed's shapes; a tensor whose size stays unknown is tapped
in a group of its own. The [C, C] float64 accumulators themselves are not part of the budget: ask for as many
tensors at a time as their C^2 * 8 bytes allow.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from accullm_export.calibration.collect import OPTIMIZATION, Feeds, plan_groups
from accullm_export.errors import UserError
from accullm_export.runtime.intermediates import IntermediateReader

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # rows converted to float64 at a time, bounding the temporary copy


@dataclasses.dataclass(frozen=True)
class Moments:
    """What ``collect_moments`` measures, tensor name -> float64 array, in the order asked for."""

    second: dict[str, np.ndarray]  # E[x x^T] [C, C] over every row but position 0's (when skipped)
    mean: dict[str, np.ndarray]  # E[x] [C] over the same rows
    # position 0 (the attention sink) alone, for [batch, seq, C] tensors when it is skipped above (else empty):
    sink_second: dict[str, np.ndarray]  # E[x0 x0^T] [C, C]
    sink_mean: dict[str, np.ndarray]  # E[x0] [C]


def collect_hessians(model_path: str | Path, tensors: Sequence[str], feeds: Feeds, *, budget_bytes: int = 512 << 20,
                     skip_first_position: bool = True) -> dict[str, np.ndarray]:
    """Mean x x^T over all rows of each named tensor, x being its last axis: ``collect_moments(...).second``,
    without the sink's [C, C] sums, which would double the accumulators' memory."""
    return _collect(model_path, tensors, feeds, budget_bytes, skip_first_position, with_sink=False).second


def collect_moments(model_path: str | Path, tensors: Sequence[str], feeds: Feeds, *, budget_bytes: int = 512 << 20,
                    skip_first_position: bool = True) -> Moments:
    """Mean x x^T and mean x over all rows of each named tensor, x being its last axis, and the same of position
    0 alone when it is skipped.

    Args:
        model_path: the ONNX model (or exported folder).
        tensors: graph inputs or node outputs to measure (usually the inputs of linear layers).
        feeds: a callable returning a fresh iterable of feeds for each pass (it is also called once to read the
            first feed's shapes).
        budget_bytes: activation bytes tapped per batch.
        skip_first_position: for [batch, seq, channels] tensors, leave position 0 (the attention sink, whose
            activations are outliers the main statistics exclude too) out of the mean.

    Returns:
        ``Moments``.

    Raises:
        UserError: a name is not a tensor of the model, the feeds are empty, or a tensor's channels change.
    """
    return _collect(model_path, tensors, feeds, budget_bytes, skip_first_position, with_sink=True)


def _collect(model_path: str | Path, tensors: Sequence[str], feeds: Feeds, budget_bytes: int,
             skip_first_position: bool, with_sink: bool) -> Moments:
    """``collect_moments``; without ``with_sink`` position 0 is still left out (when skipped) but not measured."""
    names = list(dict.fromkeys(tensors))
    reader = IntermediateReader(model_path, OPTIMIZATION)
    _check_names(reader, names, model_path)
    first = next(iter(feeds()), None)
    if first is None:
        raise UserError("no calibration feeds: the Hessians need at least one batch")
    sizes = _elements_per_batch(reader.model, names, first, budget_bytes)
    groups = plan_groups(sizes, 1, budget_bytes)
    log.info("collecting Hessians of %d tensors in %d pass(es)", len(names), len(groups))
    kept, sink = _Sums(), _Sums()
    for number, group in enumerate(groups):
        tap = reader.open(group)
        for feed in _progress(feeds(), f"Hessian pass {number + 1}/{len(groups)}"):
            values = tap.run(feed)
            for name in group:
                value = np.asarray(values[name])
                if value.ndim == 0:
                    raise UserError(f"{name} is a scalar: it has no channels to measure")
                if skip_first_position and value.ndim == 3:
                    if with_sink:
                        sink.add(name, value[:, 0, :])
                    value = value[:, 1:, :]
                kept.add(name, value)
    empty = [name for name in names if kept.rows.get(name, 0) == 0]
    if empty:
        raise UserError(f"no rows reached {empty[:3]}: the feeds are too short (position 0 is skipped)")
    sinks = [name for name in names if sink.rows.get(name)]
    return Moments(second={name: kept.mean_of(kept.second, name) for name in names},
                   mean={name: kept.mean_of(kept.first, name) for name in names},
                   sink_second={name: sink.mean_of(sink.second, name) for name in sinks},
                   sink_mean={name: sink.mean_of(sink.first, name) for name in sinks})


def _check_names(reader: IntermediateReader, names: list[str], model_path: str | Path) -> None:
    known = {value.name for value in reader.model.graph.input} | set(reader.tensor_names())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"{model_path} has no tensor named {', '.join(map(repr, unknown[:5]))}"
                        f"{' ...' if len(unknown) > 5 else ''} (graph inputs and node outputs can be measured)")


class _Sums:
    """Running sums of x x^T and of x, and row counts, per tensor."""

    def __init__(self):
        self.second: dict[str, np.ndarray] = {}
        self.first: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        channels = value.shape[-1]
        flat = value.reshape(-1, channels)
        total = self.second.setdefault(name, np.zeros((channels, channels), dtype=np.float64))
        if total.shape[0] != channels:
            raise UserError(f"{name} changed from {total.shape[0]} to {channels} channels between batches")
        first = self.first.setdefault(name, np.zeros(channels, dtype=np.float64))
        for start in range(0, flat.shape[0], CHUNK_ROWS):
            chunk = flat[start:start + CHUNK_ROWS].astype(np.float64)
            total += chunk.T @ chunk
            first += chunk.sum(axis=0)
        self.rows[name] = self.rows.get(name, 0) + flat.shape[0]

    def mean_of(self, sums: dict[str, np.ndarray], name: str) -> np.ndarray:
        """The sum divided by the rows in place and handed over (no second [C, C] copy of every tensor's)."""
        total = sums.pop(name)
        total /= self.rows[name]
        return total


def _elements_per_batch(model: onnx.ModelProto, names: list[str], feed: Mapping[str, np.ndarray],
                        budget_bytes: int) -> dict[str, int]:
    """Elements of each tensor for one feed like ``feed``; unknown sizes count as the whole budget."""
    shapes = _inferred_shapes(model)
    bound = _bind_input_dims(model, feed)
    alone = budget_bytes // 4 + 1  # more than a budget's worth: plan_groups gives it a group of its own
    sizes = {}
    for name in names:
        dims = [dim.dim_value if dim.HasField("dim_value") else bound.get(dim.dim_param, 0)
                for dim in shapes.get(name, [])]
        sizes[name] = int(np.prod(dims)) if dims and all(size > 0 for size in dims) else alone
    unknown = sum(size == alone for size in sizes.values())
    if unknown:
        log.info("%d tensor(s) of unknown size are tapped one per pass", unknown)
    return sizes


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Name -> list of TensorShapeProto dims, for every value ONNX shape inference can type (no weights read)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        # only a sizing hint: without it every tensor gets a pass of its own
        log.debug("shape inference failed (%s); tensor sizes unknown", exc)
        inferred = model
    graph = inferred.graph
    return {value.name: list(value.type.tensor_type.shape.dim) for value in
            [*graph.input, *graph.value_info, *graph.output] if value.type.tensor_type.HasField("shape")}


def _bind_input_dims(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Symbolic dimension name -> its size in ``feed`` (e.g. batch_size -> 1, sequence_length -> 128)."""
    bound: dict[str, int] = {}
    for value in model.graph.input:
        if value.name not in feed:
            continue
        shape = np.shape(feed[value.name])
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            bound.update({dim.dim_param: size for dim, size in zip(dims, shape) if dim.dim_param})
    return bound


def _progress(items, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, disable=not sys.stderr.isatty())
