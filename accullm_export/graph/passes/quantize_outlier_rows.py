"""INT8 outlier rows (``quantize --outlier-bits 8``): the FP16 branch's weight rows stored as INT8, one FP16 scale
per output column and block of ``ROW_BLOCK`` rows, behind a blocked DequantizeLinear.

The branch multiplies the few outlier channels of its input by these rows. At 8 bits a row keeps 1/254 of its
block's range as its rounding step, a sixteenth of INT4's, so the outlier channels stay far more exact than in
the INT4 part: on the sample the block-16-head build measured Δppl +3.33% / KL 0.0807 on 8 held-out windows and
+4.94% / 0.0973 on 32 with INT8 rows, against +3.35% / 0.0800 and +4.83% / 0.0969 with FP16 ones. A row entry
costs 8 bits plus its share of the scale instead of 16 (counted in the manifest: 0.064 bits per weight on the
sample). ONNX Runtime fuses the DequantizeLinear and the branch's MatMul into an 8-bit MatMulNBits; that did not
make decoding measurably faster (a branch's cost is its nodes, not its bytes). TensorRT's ``OutlierSplitGemm``
plugin takes FP16 rows, so TensorRT targets do not get this (``build`` never asks for it).

Runs after every pass that changes the rows (GPTQ's absorption, distillation) and after ``fold_outlier_planes``,
on the branches it left. The constants keep the layer's name as prefix, so the manifest counts them with the
layer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.passes import register
from accullm_export.graph.passes.distill_scales import branch_matmul, outlier_weight_constant
from accullm_export.graph.rewrite import half_constant, planned_nodes
from accullm_export.quant.symmetric import quantize

ROW_BLOCK = 16  # rows per scale: the smallest block ONNX Runtime's MatMulNBits takes


@register("quantize_outlier_rows")
def run(graph: gs.Graph, context) -> gs.Graph:
    stored = 0
    for node, plan in planned_nodes(graph, context.plans):
        if not plan.outliers:
            continue
        matmul = branch_matmul(node)
        if matmul is None:  # no branch: folded into the INT4 weight (--outlier-planes), or never made
            continue
        rows = outlier_weight_constant(node)
        if not isinstance(rows, gs.Constant):
            context.notes.append(f"{node.name}: its outlier branch is not an FP16 constant times the gathered "
                                 "channels; its rows stay as they are")
            continue
        values, scales = quantize(np.asarray(constant_array(rows), dtype=np.float32), 8, ROW_BLOCK)
        matmul.inputs[1] = _dequantized(graph, node.name, values, scales, context.float_dtype)
        stored += 1
    context.notes.append(f"{stored} layers' FP16 outlier rows stored as INT8 (blocks of {ROW_BLOCK} rows)")
    return graph.cleanup().toposort()


def _dequantized(graph: gs.Graph, layer: str, values: np.ndarray, scales: np.ndarray,
                 float_dtype: np.dtype) -> gs.Variable:
    """DequantizeLinear(int8 ``values``, FP16 ``scales`` widened to ``float_dtype``), blocked along the rows."""
    scale = half_constant(graph, f"{layer}/outlier_weight_scale", scales, float_dtype)
    weight = gs.Variable(f"{layer}/outlier_weight_dequantized", dtype=float_dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{layer}/outlier_weight/DequantizeLinear",
                               attrs={"axis": 0, "block_size": ROW_BLOCK},
                               inputs=[constant(f"{layer}/outlier_weight_int8", values), scale], outputs=[weight]))
    return weight
