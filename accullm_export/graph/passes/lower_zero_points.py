"""TensorRT targets: asymmetric INT4 layers (``weights.asymmetric``) in a form TensorRT builds.

TensorRT's DequantizeLinear takes zero points of 0 only. A layer stored as uint4 q with zero points z per block,
w = (q - z) s, becomes signed int4 q - 8 with the same scales plus an offset per block and output column:

    x W = x DQ(q - 8, s) + blocksum(x) M,        M[b, n] = s[b, n] (8 - z[b, n])

where blocksum(x)[b] sums x over the rows of block b: a Reshape to [..., blocks, block_size] and a ReduceSum,
shared by the layers reading the same input, then a [blocks, out] MatMul with M stored in FP16, 1/block_size of
the layer's multiply-adds. Rows whose every value is 0 (the outlier channels an FP16 branch computes) are stored
as 0 and left out of the block sums, so the large activations of those channels never enter two terms that
cancel. The offset is added after the layer's outlier branch, so ``fuse_outlier_split_gemm`` still finds the
branch Add on the MatMul's output. A short last block is padded with zero inputs.

Runs last, after every pass that sets integers or scales (GPTQ and distillation work on v = q - z).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.outlier_branch import branch_add, constant_value
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import half_constant, producer_of
from accullm_export.quant.asymmetric import LEVELS, signed_values

MIDDLE = (LEVELS + 1) // 2  # uint4 q - 8 is int4


@register("lower_zero_points")
def run(graph: gs.Graph, config: None) -> PassResult:
    notes: list[str] = []
    sums: dict[tuple, gs.Variable] = {}  # (input, block size, unused rows) -> its block sums
    lowered = 0
    for node in list(graph.nodes):
        dequantize = producer_of(node.inputs[1], "DequantizeLinear") if node.op == "MatMul" else None
        if dequantize is None or not _has_zero_points(dequantize):
            continue
        failure = _lower(graph, node, dequantize, sums)
        if failure:
            notes.append(f"{node.name}: {failure}; its zero points stay, which TensorRT does not build")
        else:
            lowered += 1
    graph.cleanup().toposort()
    left = [node.name for node in graph.nodes if node.op == "DequantizeLinear" and _has_zero_points(node)]
    if left:
        notes.append(f"{len(left)} DequantizeLinear with zero points stay (TensorRT does not build them), "
                     f"e.g. {left[0]}")
    if lowered:
        notes.append(f"{lowered} asymmetric INT4 layers as signed INT4 plus a block offset term "
                     f"({len(sums)} block sums)")
    return PassResult(graph, tuple(notes))


def _has_zero_points(dequantize: gs.Node) -> bool:
    return (len(dequantize.inputs) > 2 and isinstance(dequantize.inputs[2], gs.Constant)
            and np.dtype(dequantize.inputs[2].dtype) == np.dtype(ml_dtypes.uint4) and "block_size" in dequantize.attrs)


def _lower(graph: gs.Graph, node: gs.Node, dequantize: gs.Node, sums: dict) -> str | None:
    values, zero_points = dequantize.inputs[0], dequantize.inputs[2]
    block_size = int(dequantize.attrs["block_size"])
    if int(dequantize.attrs.get("axis", 0)) != 0 or not isinstance(values, gs.Constant):
        return "not INT4 constants blocked along the input"
    scales = constant_value(dequantize.inputs[1])  # stored, widened or decoded from 8-bit codes
    if scales is None:
        return "its scales are computed, not stored"
    scales = scales.astype(np.float32)
    stored = np.asarray(constant_array(values), dtype=np.int16)
    zero = np.asarray(constant_array(zero_points), dtype=np.int16)
    rows = stored.shape[0]
    unused = ~signed_values(stored, zero, block_size).any(axis=1)  # rows the low-bit part does not read
    signed = stored - MIDDLE
    signed[unused] = 0
    offset = scales * (MIDDLE - zero).astype(np.float32)  # [blocks, out]
    float_dtype = np.dtype(node.outputs[0].dtype or np.float32)
    prefix = f"{node.name}/weight"
    node.inputs[1] = _dequantized(graph, prefix, signed.astype(ml_dtypes.int4), dequantize, block_size, float_dtype)
    x = node.inputs[0]
    key = (x.name, block_size, tuple(np.flatnonzero(unused)))
    if key not in sums:
        sums[key] = _block_sums(graph, x, rows, block_size, unused, float_dtype, len(sums))
    product = gs.Variable(f"{prefix}_offset_output", dtype=float_dtype)
    matrix = half_constant(graph, f"{prefix}_offset", offset, float_dtype)
    graph.nodes.append(gs.Node("MatMul", name=f"{prefix}_offset/MatMul", inputs=[sums[key], matrix],
                               outputs=[product]))
    branch = branch_add(node)  # the offset goes after it, where fuse_outlier_split_gemm expects the branch Add
    _add_after(graph, (branch or node).outputs[0], product, f"{prefix}_offset/Add")
    return None


def _dequantized(graph: gs.Graph, prefix: str, signed: np.ndarray, old: gs.Node, block_size: int,
                 float_dtype: np.dtype) -> gs.Variable:
    """DequantizeLinear(int4 ``signed``, the old node's scale input): no zero point."""
    weight = gs.Variable(f"{prefix}_signed_dequantized", dtype=float_dtype, shape=list(signed.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{prefix}_signed/DequantizeLinear",
                               attrs={"axis": 0, "block_size": block_size},
                               inputs=[constant(f"{prefix}_signed", signed), old.inputs[1]], outputs=[weight]))
    return weight


def _block_sums(graph: gs.Graph, x: gs.Tensor, rows: int, block_size: int, unused: np.ndarray,
                float_dtype: np.dtype, index: int) -> gs.Variable:
    """x summed over each block of ``block_size`` channels, [..., blocks]; ``unused`` channels left out. The
    leading axes are read from x's shape at run time (Shape, Slice, Concat), whatever x's rank."""
    stem = f"{x.name}/block_sums_{index}"

    def add(op: str, inputs: list, attrs: dict | None = None, dtype=float_dtype, suffix: str = "") -> gs.Variable:
        output = gs.Variable(f"{stem}_{op.lower()}{suffix}", dtype=dtype)
        graph.nodes.append(gs.Node(op, name=f"{stem}/{op}{suffix}", attrs=attrs or {}, inputs=inputs,
                                   outputs=[output]))
        return output

    blocks = -(-rows // block_size)  # DequantizeLinear's blocks: the last may be short
    tensor = x
    if unused.any():
        tensor = add("Mul", [tensor, constant(f"{stem}_keep", (~unused).astype(float_dtype))])
    if blocks * block_size > rows:
        pads = constant(f"{stem}_pads", np.asarray([0, blocks * block_size - rows], dtype=np.int64))
        tensor = add("Pad", [tensor, pads, gs.Variable.empty(), constant(f"{stem}_pad_axes",
                                                                         np.asarray([-1], dtype=np.int64))])
    leading = add("Slice", [add("Shape", [x], dtype=np.int64), constant(f"{stem}_start", np.asarray([0])),
                            constant(f"{stem}_end", np.asarray([-1]))], dtype=np.int64)
    shape = add("Concat", [leading, constant(f"{stem}_grouping", np.asarray([blocks, block_size]))], {"axis": 0},
                dtype=np.int64)
    grouped = add("Reshape", [tensor, shape])
    return add("ReduceSum", [grouped, constant(f"{stem}_axes", np.asarray([-1], dtype=np.int64))],
               {"keepdims": 0})


def _add_after(graph: gs.Graph, tensor: gs.Variable, offset: gs.Variable, name: str) -> None:
    """Make ``tensor`` = (what its producer computed) + ``offset``; its readers and graph outputs stay."""
    producer = tensor.inputs[0]
    before = gs.Variable(f"{tensor.name}_before_offset", dtype=tensor.dtype, shape=tensor.shape)
    producer.outputs[producer.outputs.index(tensor)] = before
    graph.nodes.append(gs.Node("Add", name=name, inputs=[before, offset], outputs=[tensor]))
