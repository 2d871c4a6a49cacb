"""What rewrite passes read and what they hand on, both immutable.

Each pass declares a frozen ``Config`` of exactly the fields it reads; ``PassData`` holds everything any pass may
read, and ``config_for`` picks a pass's fields from it. A pass returns a ``PassResult``: the graph, the notes
(what it left alone and why) and the data it produced for the passes after it (the input scales AWQ and
SmoothQuant fold, the statistics of a rotated input); ``PassData.updated`` makes the data the next pass reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

# the PassData fields a pass may produce: mappings whose entries it adds or replaces
PRODUCIBLE = ("plans", "statistics", "hessians", "input_scales")


@dataclasses.dataclass(frozen=True)
class PassResult:
    """A pass's graph, its notes, and ``produced``: PassData field -> entries added or replaced."""

    graph: gs.Graph
    notes: tuple[str, ...] = ()
    produced: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.produced) - set(PRODUCIBLE)
        if unknown:
            raise ValueError(f"a pass may produce {', '.join(PRODUCIBLE)}, not {', '.join(sorted(unknown))}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassData:
    """Everything the recipe's passes may read: the per-layer plans, calibration data and recipe settings.

    Attributes:
        plans: linear layer name -> ``LayerPlan``.
        float_dtype: the model's float type.
        statistics: input tensor -> per-channel calibration statistics.
        hessians: input tensor -> E[x x^T] over calibration windows (GPTQ).
        input_scales: input tensor -> the per-channel s its readers' weight rows were multiplied by (AWQ,
            SmoothQuant), x being divided by it.
        embeddings: the token-embedding table's storage: int8, fp16 or fp32.
        smoothing: SmoothQuant's alpha (None: off).
        scale_search: INT4 block scales searched for the least rounding error.
        asymmetric: blocked INT4 layers get zero points.
        distillation: ``passes.distill_scales.DistillInputs`` (None: off).
        vocab_rows: ``passes.refine_vocab_rows.VocabRows`` (None: off).
    """

    plans: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    float_dtype: np.dtype = np.dtype(np.float32)
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    hessians: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embeddings: str = "fp32"
    smoothing: float | None = None
    scale_search: bool = False
    asymmetric: bool = False
    distillation: Any = None
    vocab_rows: Any = None

    def config_for(self, config_class):
        """The pass config ``config_class`` filled from these fields (its fields must all be PassData's)."""
        return config_class(**{field.name: getattr(self, field.name) for field in dataclasses.fields(config_class)})

    def updated(self, produced: Mapping[str, Mapping[str, Any]]) -> "PassData":
        """A copy with ``produced``'s entries added to (or replacing those of) each named mapping."""
        return dataclasses.replace(self, **{name: _merged(getattr(self, name), entries)
                                            for name, entries in produced.items()})


def _merged(mapping: Mapping[str, Any], entries: Mapping[str, Any]) -> Mapping[str, Any]:
    """``mapping`` with ``entries`` added; a mapping that computes its values on demand (the streamed second
    moments) merges on its own, without reading every value."""
    merged = getattr(mapping, "merged", None)
    return merged(entries) if merged is not None else {**mapping, **entries}
