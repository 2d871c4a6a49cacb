"""GPTQ: round INT4/INT8 weights one input row at a time, pushing each row's rounding error onto the rows not
yet rounded, weighted by the input's second-moment matrix H = E[x x^T] (``quant.gptq``).

H comes from the calibration text named in the profile (``quantize --gptq`` collects it). The scales are fixed
before rounding from the weight itself ("static groups"), so the result is stored exactly like plain
rounding's: blocked DequantizeLinear. Rows are rounded in order of decreasing H[i, i] ("act-order"). Outlier rows (FP16 branch) are excluded from the problem; inputs that
AWQ scaled by s use diag(1/s) H diag(1/s).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.passes import register
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
