"""GPTQ: round INT4/INT8 weights one input row at a time, pushing each row's rounding error onto the rows not
yet rounded, weighted by the input's second-moment matrix H = E[x x^T] (``quant.gptq``).

H comes from the calibration text named in the profile (``quantize --gptq`` collects it). The scales are fixed
before rounding from the weight itself ("static groups"), so the result is stored exactly like plain
rounding's: blocked DequantizeLinear. Rows are rounded in order of decreasing H[i, i] ("act-order"). Outlier rows (FP16 branch) are excluded from the problem; inputs that
AWQ scaled by s use diag(1/s) H diag(1/s).

H leaves the attention-sink token (position 0) out. A layer whose input at the sink is over ``SINK_RATIO`` x any
other token's (the down projections that write the sink's massive activations) is therefore left to plain
rounding, with a note, unless those channels are FP16 outlier rows: GPTQ would move its weights freely along
exactly the channels the sink needs (measured on the sample: with 64 windows and no FP16 rows, Δppl +659%).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.passes import register
from accullm_export.graph.recipes import SINK_RATIO, sink_channels
from accullm_export.graph.rewrite import float_weight, is_dequantized, planned_nodes, replace_weight_dequantized
from accullm_export.quant.gptq import gptq_quantize


@register("compensate_errors_gptq")
def run(graph: gs.Graph, context) -> gs.Graph:
    for node, plan in planned_nodes(graph, context.plans):
        if not plan.quantized or is_dequantized(node):
            continue
        weight = float_weight(node)
        hessian = context.hessians.get(node.inputs[0].name)
        if weight is None or hessian is None:
            context.notes.append(f"{node.name}: no second-moment matrix for its input; plain rounding")
            continue
        statistics = context.statistics.get(node.inputs[0].name)
        unprotected = sorted(set(sink_channels(statistics)) - set(plan.outliers)) if statistics else []
        if unprotected:
            context.notes.append(f"{node.name}: its input at the attention sink exceeds {SINK_RATIO:g}x every other "
                                 f"token's in channels {unprotected}, which have no FP16 row and which GPTQ's "
                                 "statistics leave out; plain rounding")
            continue
        scales = context.input_scales.get(node.inputs[0].name)
        if scales is not None:
            inverse = 1.0 / scales.astype(np.float64)
            hessian = hessian * np.outer(inverse, inverse)
        values, block_scales = gptq_quantize(weight.values.astype(np.float32), hessian, plan.bits, plan.block_size,
                                             exclude=plan.outliers, act_order=True,
                                             search=context.scale_search and plan.bits == 4)
        replace_weight_dequantized(graph, node, values, block_scales, plan.bits, plan.block_size,
                                   weight.values.dtype)
    return graph.cleanup().toposort()
