"""The per-layer plan every rewrite pass reads (``LayerPlan``), and the layer-name and activation-range helpers
the plan and the passes share."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Mapping, Sequence

import numpy as np

from accullm_export.errors import UserError

ACTIVATION_GROUPS = (16, 32, 64, 128, 256)  # dynamic INT8: input channels per scale within a token
# A layer writes the attention sink's massive activations when its input at the sink token exceeds every other
# token's by this factor; those channels join the exact rows, since GPTQ's statistics leave the sink out.
SINK_RATIO = 10.0


def sink_channels(statistics: Mapping[str, np.ndarray], ratio: float = SINK_RATIO) -> list[int]:
    """Channels whose |x| at the attention-sink token exceeds ``ratio`` x the largest |x| of any other token."""
    sink = statistics.get("sink_absmax")
    if sink is None or not np.asarray(statistics["absmax"]).size:
        return []
    limit = ratio * float(np.max(statistics["absmax"]))
    return sorted(int(c) for c in np.flatnonzero(np.asarray(sink) > limit))


def split_precision(value: str) -> tuple[str, int | None]:
    """An override's precision and INT4 block size: ``int4:64`` -> ("int4", 64), ``int8`` -> ("int8", None)."""
    precision, sep, block = value.partition(":")
    if not sep:
        return precision, None
    if not block.isdigit():
        raise UserError(f"override precision {value!r}: expected int4:B with B a block size such as 64")
    return precision, int(block)


def parse_override(text: str) -> tuple[str, str]:
    """``PATTERN=PRECISION`` from the command line, e.g. ``lm_head=int8``, ``layers.0=fp16`` or
    ``lm_head=int4:64`` (INT4 with its own block size)."""
    pattern, sep, precision = text.rpartition("=")
    if not sep or not pattern:
        raise UserError(f"--override {text!r}: expected PATTERN=PRECISION, e.g. lm_head=int8")
    return pattern, precision


def override_matches(pattern: str, node: str) -> bool:
    """A glob with ``*`` matches the whole node name; a plain word matches whole '/'-separated parts of it.

    ``lm_head`` matches ``/lm_head/MatMul``; ``layers.1`` matches ``/model/layers.1/mlp/up_proj/MatMul`` but not
    ``layers.10``; ``*down_proj*`` matches every down projection.
    """
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(node, pattern)
    return re.search(rf"(^|/){re.escape(pattern.strip('/'))}(/|$)", node) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What the passes do to one linear layer."""

    node: str
    input: str
    weight: str
    in_features: int
    out_features: int
    precision: str  # one of PRECISIONS
    block_size: int | None  # int4, and int8 with grouped activations: rows per scale block; None: per channel
    outliers: tuple[int, ...]  # input channels computed from FP16 weight rows, excluded from the low-bit part
    activations: str | None  # "static", "dynamic" or None (not quantized)
    activation_scale: float | None  # static: the input's scale (absmax of the non-outlier channels / 127)
    activation_group: int | None = None  # dynamic: channels per scale within a token (None: the whole row)
    rotation: int | None = None  # rotation.layers: the low-bit part reads x R, R block-Hadamard in blocks this size
    symmetric: bool = False  # INT4 without zero points even under weights.asymmetric (a plugin reads it so)

    @property
    def quantized(self) -> bool:
        return self.precision in ("int8", "int4")

    @property
    def excluded_rows(self) -> tuple[int, ...]:
        """The low-bit weight's rows that are not rounded (zero): the outlier channels, unless the low-bit part
        reads a rotated input, whose every row is rounded (the branch still reads the outlier channels)."""
        return () if self.rotation else self.outliers

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8, "fp16": 16}.get(self.precision, 32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"outliers": list(self.outliers)}


def activation_groups(layers: Sequence) -> list[int]:
    """The ``activations.group`` sizes that divide every layer's input width, smallest first."""
    return [g for g in ACTIVATION_GROUPS if all(layer.in_features % g == 0 for layer in layers)]


def activation_range(statistics: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-channel largest |x| seen in calibration, the attention-sink token included; float64."""
    return np.maximum(statistics["absmax"], statistics.get("sink_absmax", 0.0)).astype(np.float64)


def activation_scale(statistics: Mapping[str, np.ndarray], outliers: Sequence[int],
                     divisor: np.ndarray | None = None) -> float:
    """Static per-tensor INT8 scale: the largest |x| of the non-outlier channels / 127, the attention-sink token
    included (clipping the sink's huge activations is far worse than a coarse scale); with ``divisor``, of
    x / divisor (an input smoothed by SmoothQuant)."""
    magnitude = activation_range(statistics)
    if divisor is not None:
        magnitude = magnitude / np.asarray(divisor, dtype=np.float64)
    if len(outliers):
        magnitude = np.delete(magnitude, list(outliers))
    largest = float(magnitude.max()) if magnitude.size else 0.0
    return largest / 127.0 if largest > 0 else 1.0
