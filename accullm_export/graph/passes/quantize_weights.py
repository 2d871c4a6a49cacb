"""Round each planned layer's weight: INT8 per output channel, INT4 in blocks along the input, or FP16.

Integer weights are stored quantized (int4 packed two per byte) behind a DequantizeLinear with zero point 0
(TensorRT's explicit-quantization convention): per-channel INT8 on axis 1 of the [in, out] MatMul weight,
blocked INT4 on axis 0 (ONNX Runtime fuses that pattern into MatMulNBits; TensorRT 10 takes it as weight-only
INT4). FP16 weights are stored in half precision and cast back to the model's float type. Layers whose weight
an earlier pass already replaced (GPTQ) are left as they are. With ``scale_search`` INT4 block scales are
searched (``quant.symmetric.searched_scales``), each row's error weighted by its input channel's E[x^2] from the
profile (divided by s^2 where AWQ divided the input by s). With ``asymmetric`` blocked INT4 layers get a zero point
per block and store uint4 (``quant.asymmetric``; for TensorRT, ``lower_zero_points`` rewrites them later).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import (asymmetric_layer, float_weight, is_dequantized, planned_nodes,
                                          replace_weight_cast, replace_weight_dequantized)
from accullm_export.quant.asymmetric import quantize_asymmetric
from accullm_export.quant.symmetric import quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the inputs' statistics, the AWQ divisors and the INT4 grid settings."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    scale_search: bool = False
    asymmetric: bool = False


@register("quantize_weights", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    for node, plan in planned_nodes(graph, config.plans):
        if plan.precision == "fp32" or is_dequantized(node):
            continue
        weight = float_weight(node)
        if weight is None:
            notes.append(f"{node.name}: weight is not a float constant; left as it is")
            continue
        values = weight.values
        if plan.precision == "fp16":
            if values.dtype != np.float16:
                replace_weight_cast(graph, node, values, np.float16, values.dtype)
            continue
        bits = plan.bits
        search = config.scale_search and bits == 4
        importance = _row_importance(config, node, plan) if search else None
        zero_points = None
        if asymmetric_layer(config, plan):
            integers, scales, zero_points = quantize_asymmetric(values, plan.block_size, search=search,
                                                                importance=importance)
        else:
            integers, scales = quantize(values, bits, plan.block_size, search=search, importance=importance)
        replace_weight_dequantized(graph, node, integers, scales, bits, plan.block_size, values.dtype, zero_points)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _row_importance(context, node: gs.Node, plan) -> np.ndarray | None:
    """E[x_c^2] of the layer's input as the graph now computes it (AWQ's x / s included); outlier rows 0."""
    statistics = context.statistics.get(node.inputs[0].name)
    if statistics is None or "second_moment" not in statistics:
        return None
    importance = np.asarray(statistics["second_moment"], dtype=np.float64)
    scales = context.input_scales.get(node.inputs[0].name)
    if scales is not None:
        importance = importance / np.asarray(scales, dtype=np.float64) ** 2
    importance = importance.copy()
    importance[list(plan.excluded_rows)] = 0.0
    return importance
