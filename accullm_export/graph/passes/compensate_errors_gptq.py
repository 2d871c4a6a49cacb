"""GPTQ: round INT4/INT8 weights one input row at a time, pushing each row's rounding error onto the rows not
yet rounded, weighted by the input's second-moment matrix H = E[x x^T] (``quant.gptq``).

H comes from the calibration text named in the profile. The scales are fixed before rounding from the weight
itself ("static groups"), so the result is stored exactly like plain rounding's: blocked DequantizeLinear. Rows
are rounded in order of decreasing H[i, i] ("act-order"). Outlier rows (the exact branch) are excluded from the
problem. Inputs that AWQ scaled by s use diag(1/s) H diag(1/s). Asymmetric INT4 layers round onto a grid with a
zero point per block (``quant.gptq.gptq_grid``), each row into its block's [-z, 15 - z].

H leaves the attention-sink token (position 0) out. A layer whose input at the sink is over ``SINK_RATIO`` x any
other token's (the down projections that write the sink's massive activations) is therefore left to plain
rounding, with a note, unless those channels are exact outlier rows: GPTQ would otherwise move its weights freely
along exactly the channels the sink needs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.layer_plan import SINK_RATIO, sink_channels
from accullm_export.graph.rewrite import (asymmetric_layer, float_weight, is_dequantized, planned_nodes,
                                          replace_weight_dequantized)
from accullm_export.quant.gptq import gptq_grid, gptq_quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, each input's E[x x^T] and statistics, the AWQ divisors, and the INT4 grid settings."""

    plans: Mapping[str, LayerPlan]
    hessians: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    scale_search: bool = False
    asymmetric: bool = False


@register("compensate_errors_gptq", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    for node, plan in planned_nodes(graph, config.plans):
        if not plan.quantized or is_dequantized(node):
            continue
        weight = float_weight(node)
        hessian = config.hessians.get(node.inputs[0].name)
        if weight is None or hessian is None:
            notes.append(f"{node.name}: no second-moment matrix for its input; plain rounding")
            continue
        statistics = config.statistics.get(node.inputs[0].name)
        sinks = set(sink_channels(statistics)) if statistics else set()
        unprotected = sorted(sinks - set(plan.outliers))
        if unprotected:
            notes.append(f"{node.name}: its input at the attention sink exceeds {SINK_RATIO:g}x every other "
                                 f"token's in channels {unprotected}, which have no FP16 row and which GPTQ's "
                                 "statistics leave out; plain rounding")
            continue
        scales = config.input_scales.get(node.inputs[0].name)
        if scales is not None:
            inverse = 1.0 / scales.astype(np.float64)
            hessian = hessian * np.outer(inverse, inverse)
        search = config.scale_search and plan.bits == 4
        grid, zero_points = None, None
        if asymmetric_layer(config, plan):  # every outlier row is left out of the grid
            grid = gptq_grid(weight.values, hessian, plan.bits, plan.block_size, exclude=plan.excluded_rows,
                             search=search, asymmetric=True)
            zero_points = grid[1]
        values, block_scales = gptq_quantize(np.asarray(weight.values, dtype=np.float32), hessian, plan.bits,
                                             plan.block_size, exclude=plan.excluded_rows, act_order=True,
                                             search=search, grid=grid)
        replace_weight_dequantized(graph, node, values, block_scales, plan.bits, plan.block_size,
                                   weight.values.dtype, zero_points)
    return PassResult(graph.cleanup().toposort(), tuple(notes))
