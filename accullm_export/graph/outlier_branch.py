"""Reading a linear layer's weight back from a rewritten graph: its FP16 outlier branch and its constants.

``isolate_outliers`` gives a layer an FP16 branch: Gather(x, outlier channels) -> MatMul(outlier rows) -> Add to
the layer's output (``<layer>/outliers/Add``). Later passes (distillation, INT8 rows, outlier planes) find that
branch, read its rows and the low-bit part's stored values here, so each pass reads the layout the same way and
no pass imports another.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.errors import UserError
from accullm_export.graph.ir import constant_array
from accullm_export.graph.rewrite import decoded_scale, producer_of, scale_code
from accullm_export.quant.asymmetric import signed_values
from accullm_export.quant.symmetric import dequantize


def branch_add(node: gs.Node) -> gs.Node | None:
    """The Add that puts ``node``'s FP16 outlier branch onto its output (``<layer>/outliers/Add``), or None."""
    return next((consumer for consumer in node.outputs[0].outputs
                 if consumer.op == "Add" and consumer.name == f"{node.name}/outliers/Add"), None)


def branch_matmul(node: gs.Node) -> gs.Node | None:
    """The MatMul of the FP16 outlier branch ``isolate_outliers`` gave ``node``, or None.

    The branch is added to the layer's output.

    Raises:
        UserError: The layer has an outlier Add whose branch is not a MatMul.
    """
    add = branch_add(node)
    if add is None:
        return None
    output = node.outputs[0]
    matmul = producer_of(next(t for t in add.inputs if t is not output), "MatMul")
    if matmul is None:
        raise UserError(f"{node.name}: its outlier branch is not laid out as isolate_outliers writes it")
    return matmul


def outlier_branch(node: gs.Node) -> tuple[tuple[int, ...], np.ndarray | None]:
    """The FP16 outlier branch ``isolate_outliers`` gave ``node``.

    Returns:
        (its input channels, its weight rows as float32), or ((), None) when the layer has no branch.

    Raises:
        UserError: The branch is not laid out as ``isolate_outliers`` writes it.
    """
    matmul = branch_matmul(node)
    if matmul is None:
        return (), None
    gather = producer_of(matmul.inputs[0], "Gather")
    rows = constant_value(matmul.inputs[1])
    if gather is None or rows is None or not isinstance(gather.inputs[1], gs.Constant):
        raise UserError(f"{node.name}: its outlier branch is not laid out as isolate_outliers writes it")
    return tuple(int(c) for c in constant_array(gather.inputs[1])), rows.astype(np.float32)


def outlier_weight_constant(node: gs.Node) -> gs.Constant:
    """The constant holding the FP16 outlier branch's weight rows of ``node`` (behind its Cast, if any)."""
    matmul = branch_matmul(node)
    cast = producer_of(matmul.inputs[1], "Cast")
    return cast.inputs[0] if cast is not None else matmul.inputs[1]


def constant_value(tensor) -> np.ndarray | None:
    """The float value of a weight, or None for anything computed from more than constants.

    A weight is a constant, a Cast of one, or a DequantizeLinear of stored integers (per output channel on axis
    1, or blocked on axis 0, its scales stored or decoded from 8-bit codes).
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(constant_array(tensor))
    coded = scale_code(tensor)
    if coded is not None:  # 8-bit block scales (quant.scale_codes)
        return decoded_scale(coded).astype(np.float32)
    cast = producer_of(tensor, "Cast")
    if cast is not None:
        inner = constant_value(cast.inputs[0])
        return None if inner is None else inner.astype(np.float32)
    node = producer_of(tensor, "DequantizeLinear")
    if node is None:
        return None
    values, scales = constant_value(node.inputs[0]), constant_value(node.inputs[1])
    zero_points = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if values is None or scales is None or (len(node.inputs) > 2 and zero_points is None):
        return None
    values, scales = values.astype(np.float32), scales.astype(np.float32)
    if "block_size" in node.attrs:
        block_size = int(node.attrs["block_size"])
        if zero_points is not None:
            values = signed_values(values, zero_points, block_size).astype(np.float32)
        return dequantize(values, scales, block_size)
    if zero_points is not None:
        values = values - zero_points.astype(np.float32).reshape(1, -1)
    return values * scales.reshape(1, -1)


def effective_weight(node: gs.Node) -> np.ndarray | None:
    """What a linear layer multiplies its input by, float32 [in, out].

    Its weight dequantized, with the FP16 outlier rows of its branch put back; None when the weight is computed
    from anything but constants. A float32 constant without a branch is returned as it is, not copied: read it,
    never write it.
    """
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    weight = np.asarray(weight, dtype=np.float32)
    channels, rows = outlier_branch(node)
    if channels:
        weight = weight.copy()
        weight[list(channels)] = rows
    return weight
