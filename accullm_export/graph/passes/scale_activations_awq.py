"""Activation-aware weight scaling (AWQ): scale up the weight rows of salient input channels before INT4
rounding and fold the inverse scale into whatever produces the input.

Per input tensor (shared by, say, q/k/v), ``quant.awq`` searches the exponent alpha of s = mean|x|^alpha on the
profile's per-channel statistics. The rows of every consumer's weight are multiplied by s and x is divided by
s where that costs nothing:

* the producer is a Mul by a constant (RMSNorm's weight): the constant is divided by s;
* the producer is a Mul of two tensors, one of them a MatMul output read only there (SwiGLU's up projection
  feeding the down projection): that MatMul's weight columns are divided by s.

Inputs with another producer (attention's output feeding o_proj), or read by layers outside the plan, are
left unscaled, with a note. Outlier channels (FP16 rows) keep s = 1.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import float_weight, planned_nodes
from accullm_export.quant.awq import search_awq_scales


@register("scale_activations_awq")
def run(graph: gs.Graph, context) -> gs.Graph:
    by_input: dict[str, list] = collections.defaultdict(list)
    for node, plan in planned_nodes(graph, context.plans):
        if plan.precision == "int4":
            by_input[node.inputs[0].name].append((node, plan))
    for tensor_name, members in by_input.items():
        source = members[0][0].inputs[0]
        if {id(consumer) for consumer in source.outputs} != {id(node) for node, _ in members}:
            context.notes.append(f"{tensor_name}: read by layers outside the int4 plan; not scaled")
            continue
        weights = [float_weight(node) for node, _ in members]
        fold = _folding_target(source)
        if fold is None or any(weight is None for weight in weights):
            context.notes.append(f"{tensor_name}: no producer to fold 1/s into; not scaled")
            continue
        plan = members[0][1]
        statistics = context.statistics[tensor_name]
        result = search_awq_scales([weight.values.astype(np.float32) for weight in weights],
                                   statistics["mean_abs"], statistics["second_moment"], 4, plan.block_size,
                                   exclude=plan.outliers)
        if result.alpha == 0:
            continue
        scales = result.scales.astype(np.float64)
        for node, _ in members:
            _replace_input(node, 1, node.inputs[1].values.astype(np.float64) * scales[:, None], "awq_scaled")
        fold(scales)
        context.awq_scales[tensor_name] = result.scales
        context.notes.append(f"{tensor_name}: alpha {result.alpha:.2f}, proxy error "
                             f"{result.baseline_error:.4g} -> {min(e for _, e in result.errors):.4g}")
    return graph.cleanup().toposort()


def _folding_target(tensor: gs.Variable):
    """A function that divides the producer's output by s, or None if there is no cheap place to do it."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Mul":
        return None
    producer = tensor.inputs[0]
    for index, operand in enumerate(producer.inputs):
        if isinstance(operand, gs.Constant) and operand.values.ndim >= 1 and operand.values.shape[-1] > 1:
            return lambda s, node=producer, index=index: _divide_last_axis(node, index, s)
    for operand in producer.inputs:
        if isinstance(operand, gs.Variable) and len(operand.inputs) == 1 and len(operand.outputs) == 1:
            matmul = operand.inputs[0]
            if matmul.op == "MatMul" and isinstance(matmul.inputs[1], gs.Constant):
                return lambda s, node=matmul: _divide_last_axis(node, 1, s)
    return None


def _divide_last_axis(node: gs.Node, index: int, scales: np.ndarray) -> None:
    _replace_input(node, index, node.inputs[index].values.astype(np.float64) / scales, "awq_folded")


def _replace_input(node: gs.Node, index: int, values: np.ndarray, suffix: str) -> None:
    """Give ``node`` a new constant: the old one may be shared (tied embeddings read the lm_head's weight)."""
    old = node.inputs[index]
    node.inputs[index] = constant(f"{node.name}/{suffix}", values.astype(old.values.dtype))
