"""INT8 outlier rows (recipe key ``outliers.bits = 8``): the FP16 branch's weight rows stored as INT8, one FP16 scale
per output column and block of ``ROW_BLOCK`` rows, behind a blocked DequantizeLinear.

The branch multiplies the few outlier channels of its input by these rows. At 8 bits a row keeps 1/254 of its
block's range as its rounding step, a sixteenth of INT4's, so the outlier channels stay far more exact than in
the INT4 part and the model about as accurate as with FP16 rows. A row entry costs 8 bits plus its share of the
scale instead of 16 (counted in the manifest). ONNX Runtime fuses the DequantizeLinear and the branch's MatMul
into an 8-bit MatMulNBits; this saves bits, not decode time (a branch's cost is its nodes, not its bytes).
TensorRT's ``OutlierSplitGemm`` plugin takes FP16 rows, so TensorRT targets do not get this (``build`` never
asks for it).

Runs after every pass that changes the rows (GPTQ's absorption, distillation) and after ``fold_outlier_planes``,
on the branches it left. The constants keep the layer's name as prefix, so the manifest counts them with the
layer.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.outlier_branch import branch_matmul, outlier_weight_constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import half_constant, planned_nodes
from accullm_export.quant.symmetric import quantize

ROW_BLOCK = 16  # rows per scale: the smallest block ONNX Runtime's MatMulNBits takes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The layer plans and the model's float type."""

    plans: Mapping[str, LayerPlan]
    float_dtype: np.dtype = np.dtype(np.float32)


@register("quantize_outlier_rows", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    stored = 0
    for node, plan in planned_nodes(graph, config.plans):
        if not plan.outliers:
            continue
        matmul = branch_matmul(node)
        if matmul is None:  # no branch: folded into the INT4 weight (outliers.planes), or never made
            continue
        rows = outlier_weight_constant(node)
        if not isinstance(rows, gs.Constant):
            notes.append(f"{node.name}: its outlier branch is not an FP16 constant times the gathered "
                                 "channels; its rows stay as they are")
            continue
        values, scales = quantize(np.asarray(constant_array(rows), dtype=np.float32), 8, ROW_BLOCK)
        matmul.inputs[1] = _dequantized(graph, node.name, values, scales, config.float_dtype)
        stored += 1
    notes.append(f"{stored} layers' FP16 outlier rows stored as INT8 (blocks of {ROW_BLOCK} rows)")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _dequantized(graph: gs.Graph, layer: str, values: np.ndarray, scales: np.ndarray,
                 float_dtype: np.dtype) -> gs.Variable:
    """DequantizeLinear(int8 ``values``, FP16 ``scales`` widened to ``float_dtype``), blocked along the rows."""
    scale = half_constant(graph, f"{layer}/outlier_weight_scale", scales, float_dtype)
    weight = gs.Variable(f"{layer}/outlier_weight_dequantized", dtype=float_dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{layer}/outlier_weight/DequantizeLinear",
                               attrs={"axis": 0, "block_size": ROW_BLOCK},
                               inputs=[constant(f"{layer}/outlier_weight_int8", values), scale], outputs=[weight]))
    return weight
