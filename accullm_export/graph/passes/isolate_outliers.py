"""Outlier channels to an FP16 branch: y = x[..., O] @ W[O, :] (FP16 rows) + x @ W_rest (O rows zeroed).

The low-bit part keeps reading the whole input: its weight rows for the outlier channels are zero, so those
channels contribute nothing there, whatever a later activation quantizer does to them (a static INT8 scale
clips them; it is computed from the other channels only). Zero rows also keep the input dimension, and with
it the int4 block layout, intact. The branch gathers the few outlier channels once per input tensor (layers
that share an input share the Gather) and multiplies them by the layer's FP16 rows, cast to the model's float
type, so its accuracy is the FP16 weights' and never the activations' rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import collections

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import ZeroedRows, constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import float_weight, onnx_type, planned_nodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The layer plans (their outlier channels)."""

    plans: Mapping[str, LayerPlan]


@register("isolate_outliers", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    by_input: dict[str, list] = collections.defaultdict(list)
    for node, plan in planned_nodes(graph, config.plans):
        if plan.outliers and plan.quantized:
            by_input[node.inputs[0].name].append((node, plan))
    for tensor_name, members in by_input.items():
        channels = members[0][1].outliers
        source = members[0][0].inputs[0]
        indices = constant(f"{tensor_name}/outlier_channels", np.asarray(channels, dtype=np.int64))
        gathered = gs.Variable(f"{tensor_name}/outlier_inputs", dtype=source.dtype)
        graph.nodes.append(gs.Node("Gather", name=f"{tensor_name}/outliers/Gather", attrs={"axis": -1},
                                   inputs=[source, indices], outputs=[gathered]))
        for node, plan in members:
            weight = float_weight(node)
            if weight is None:
                notes.append(f"{node.name}: weight is not a float constant; no outlier branch")
                continue
            _split(graph, node, weight.values, channels, gathered)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _split(graph: gs.Graph, node: gs.Node, weight: np.ndarray, channels: tuple[int, ...],
           gathered: gs.Variable) -> None:
    float_dtype = weight.dtype
    rows = constant(f"{node.name}/outlier_weight", weight[list(channels)].astype(np.float16))
    branch_weight = rows
    if float_dtype != np.float16:
        branch_weight = gs.Variable(f"{node.name}/outlier_weight_cast", dtype=float_dtype)
        graph.nodes.append(gs.Node("Cast", name=f"{node.name}/outliers/Cast", attrs={"to": onnx_type(float_dtype)},
                                   inputs=[rows], outputs=[branch_weight]))
    branch = gs.Variable(f"{node.name}/outlier_output", dtype=float_dtype)
    graph.nodes.append(gs.Node("MatMul", name=f"{node.name}/outliers/MatMul", inputs=[gathered, branch_weight],
                               outputs=[branch]))
    node.inputs[1] = gs.Constant(f"{node.name}/weight_rest", ZeroedRows(weight, channels))
    output = node.outputs[0]
    main = gs.Variable(f"{node.name}/main_output", dtype=float_dtype)
    node.outputs[0] = main
    graph.nodes.append(gs.Node("Add", name=f"{node.name}/outliers/Add", inputs=[main, branch], outputs=[output]))
