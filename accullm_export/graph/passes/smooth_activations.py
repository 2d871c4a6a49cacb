"""SmoothQuant: move the difficulty of INT8 activations into the weights, s_c = max|x_c|^a / max|W_c|^(1-a).

For each input tensor read only by w8a8 layers, the per-channel ranges from the profile (calibration data
and the attention-sink token) and the largest weight of each input row over all readers give s; the readers'
weight rows are multiplied by s and 1/s is folded into the producer (RMSNorm's weight, or the up projection
before the down projection), so the float function is unchanged while x / s is flatter and rounds better to
INT8. Inputs without such a producer (attention output) are left as they are, with a note. Outlier channels
(FP16 branch) keep s = 1. ``quantize_activations`` then takes static scales from the smoothed ranges.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.layer_plan import activation_range
from accullm_export.graph.rewrite import apply_input_scales, scalable_inputs

_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the inputs' statistics and SmoothQuant's alpha."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    smoothing: float | None = None


@register("smooth_activations", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    alpha = config.smoothing
    produced: dict[str, np.ndarray] = {}
    for tensor_name, members, fold in scalable_inputs(graph, config.plans, ("int8",), notes):
        if any(plan.activations is None for _, plan in members):
            continue
        statistics = config.statistics[tensor_name]
        weight_range = np.max([np.abs(node.inputs[1].values).max(axis=1) for node, _ in members], axis=0)
        scales = smoothing_scales(activation_range(statistics), weight_range.astype(np.float64), alpha,
                                  members[0][1].outliers)
        apply_input_scales(members, fold, scales, "smoothquant")
        produced[tensor_name] = scales.astype(np.float32)
    return PassResult(graph.cleanup().toposort(), tuple(notes), produced={"input_scales": produced})


def smoothing_scales(input_range: np.ndarray, weight_range: np.ndarray, alpha: float,
                     outliers=()) -> np.ndarray:
    """s = act^alpha / weight^(1 - alpha) per input channel; 1 where either range is 0 and for outliers."""
    active = (input_range > 0) & (weight_range > 0)
    scales = np.ones_like(input_range, dtype=np.float64)
    scales[active] = (input_range[active] ** alpha) / (weight_range[active] ** (1.0 - alpha))
    scales = np.maximum(scales, _FLOOR)
    scales[list(outliers)] = 1.0
    return scales
