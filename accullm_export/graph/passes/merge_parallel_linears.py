"""Merge linear layers that read the same input into one MatMul and a Split (q/k/v, gate/up, and their
outlier branches), as onnxruntime-genai's builder does for its packed QKV and gate/up weights.

At batch-1 decode every MatMul is a kernel launch over a small matrix; three launches over [576, 576], [576, 192]
and [576, 192] cost more than one over [576, 960] (and an 8-bit MatMulNBits quantizes its input once per node).
Weights of the same kind are concatenated along the output axis: float constants, FP16 constants behind a Cast,
quantized constants behind the same DequantizeLinear form (per-channel scales and blocked scales both concatenate
along the output axis, since blocks run along the input; FP16 block scales behind a Cast stay so, and 8-bit block
scales concatenate their codes when the members share a grid, as ``code_block_scales`` makes those reading one
input do), and ONNX Runtime's MatMulNBits nodes of the same K, bits, block size and accuracy level. The Split's
outputs are the original layers' output tensors, so every name downstream (bisection, the KV cache wiring) is
unchanged. When a merged main path and a
merged outlier branch are added output by output, the Adds merge too: Add before Split; so do the constant biases
a model adds after each member (concatenated, stored as they were). Each column is computed as before, so
the numerics do not change.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import coded_scale, scale_code, widening_cast


@register("merge_parallel_linears")
def run(graph: gs.Graph, config: None) -> gs.Graph:
    groups: dict[tuple, list[gs.Node]] = collections.defaultdict(list)
    for node in graph.nodes:
        kind = _weight_kind(node) if node.op == "MatMul" else _nbits_kind(node) if node.op == "MatMulNBits" else None
        if kind is not None:
            groups[(node.inputs[0].name, kind)].append(node)
    splits = []
    for (_, kind), members in groups.items():
        if len(members) > 1 and kind[0] == "nbits":
            splits.append(_merge_nbits(graph, members))
        elif len(members) > 1 and len({_weight_constants(node)[0].shape[0] for node in members}) == 1:
            splits.append(_merge(graph, members, kind))
    splits = [_merge_biases(graph, split) or split for split in splits]
    _merge_adds(graph, splits)
    return graph.cleanup().toposort()


def _weight_kind(node: gs.Node) -> tuple | None:
    """A hashable description of how the weight is stored, or None if it cannot be merged."""
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        return ("constant", weight.values.dtype.str) if weight.values.ndim == 2 else None
    if len(weight.inputs) != 1 or len(weight.outputs) != 1:
        return None
    producer = weight.inputs[0]
    if producer.op == "DequantizeLinear":
        stored = tuple(_stored_form(value) for value in producer.inputs)
        if any(form == "computed" for form in stored):
            return None
        attrs = tuple(sorted((key, int(value)) for key, value in producer.attrs.items()))
        return ("dequantize", attrs, len(producer.inputs), str(producer.inputs[0].dtype), stored)
    if not all(isinstance(value, gs.Constant) for value in producer.inputs):
        return None
    if producer.op == "Cast":
        return ("cast", int(producer.attrs["to"]), str(producer.inputs[0].dtype))
    return None


def _nbits_kind(node: gs.Node) -> tuple | None:
    """A MatMulNBits with constant weights and scales and no zero points: its attributes but N (the members'
    K, bits, block size and accuracy level must agree), or None."""
    if len(node.inputs) != 3 or not all(isinstance(value, gs.Constant) for value in node.inputs[1:]):
        return None
    return ("nbits", node.domain, tuple(sorted((key, int(value)) for key, value in node.attrs.items() if key != "N")))


def _merge_nbits(graph: gs.Graph, members: list[gs.Node]) -> gs.Node:
    """MatMulNBits weights [N, blocks, blob] and scales [N, blocks] concatenate along N."""
    name = f"{members[0].name}/merged_with_{len(members) - 1}"
    widths = [int(node.attrs["N"]) for node in members]
    weight, scales = (constant(f"{name}/{what}", np.concatenate([node.inputs[index].values for node in members]))
                      for index, what in ((1, "weight_nbits"), (2, "weight_nbits_scale")))
    output = gs.Variable(f"{name}/output_0", dtype=members[0].outputs[0].dtype)
    graph.nodes.append(gs.Node("MatMulNBits", name=name, domain=members[0].domain,
                               attrs=dict(members[0].attrs) | {"N": sum(widths)},
                               inputs=[members[0].inputs[0], weight, scales], outputs=[output]))
    return _split(graph, f"{name}/Split", output, widths, [node.outputs[0] for node in members], members)


def _weight_constants(node: gs.Node) -> list[np.ndarray]:
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        return [weight.values]
    stored = []
    for value in weight.inputs[0].inputs:
        cast, coded = widening_cast(value), scale_code(value)
        stored.append(cast.inputs[0].values if cast is not None else
                      constant_array(coded[0]) if coded is not None else value.values)
    return stored


def _stored_form(value) -> tuple | int | str | None:
    """How a DequantizeLinear input is stored: None (a constant), the Cast's target type (a constant widened by
    a Cast), ("code", log_min, log_step, final cast) for 8-bit block scales (only the same grid merges), or
    "computed"."""
    cast, coded = widening_cast(value), scale_code(value)
    if cast is not None:
        return int(cast.attrs["to"])
    if coded is not None:
        return ("code", float(coded[1]), float(coded[2]), None if coded[3] is None else int(coded[3]["to"]))
    return None if isinstance(value, gs.Constant) else "computed"


def _merge(graph: gs.Graph, members: list[gs.Node], kind: tuple) -> gs.Node:
    name = f"{members[0].name}/merged_with_{len(members) - 1}"
    arrays = [_weight_constants(node) for node in members]
    widths = [int(a[0].shape[1]) for a in arrays]
    if kind[0] == "constant":
        weight = constant(f"{name}/weight", np.concatenate([a[0] for a in arrays], axis=1))
    else:
        producer = members[0].inputs[1].inputs[0]
        merged_inputs = []
        for index in range(len(arrays[0])):
            parts = [a[index] for a in arrays]
            along = 1 if parts[0].ndim == 2 else 0  # [in, out] values, [blocks, out] scales; 1-D per-channel: axis 0
            coded = scale_code(producer.inputs[index])
            if coded is not None:  # 8-bit block scales: the codes concatenate, the members share the grid
                merged_inputs.append(coded_scale(graph, f"{name}/weight_{index}", np.concatenate(parts, axis=along),
                                                 coded[1], coded[2], producer.inputs[index].dtype))
                continue
            merged = constant(f"{name}/weight_{index}", np.concatenate(parts, axis=along))
            cast = widening_cast(producer.inputs[index])
            if cast is not None:  # stored narrow, widened at load time as in the members
                widened = gs.Variable(f"{name}/weight_{index}_widened", dtype=producer.inputs[index].dtype)
                graph.nodes.append(gs.Node("Cast", name=f"{name}/weight_{index}/Cast", attrs=dict(cast.attrs),
                                           inputs=[merged], outputs=[widened]))
                merged = widened
            merged_inputs.append(merged)
        weight = gs.Variable(f"{name}/weight", dtype=members[0].inputs[1].dtype)
        graph.nodes.append(gs.Node(producer.op, name=f"{name}/{producer.op}", attrs=dict(producer.attrs),
                                   inputs=merged_inputs, outputs=[weight]))
    output = gs.Variable(f"{name}/output_0", dtype=members[0].outputs[0].dtype)
    graph.nodes.append(gs.Node("MatMul", name=name, inputs=[members[0].inputs[0], weight], outputs=[output]))
    return _split(graph, f"{name}/Split", output, widths, [node.outputs[0] for node in members], members)


def _split(graph: gs.Graph, name: str, source: gs.Variable, widths: list[int], outputs: list[gs.Variable],
           replaced: list[gs.Node]) -> gs.Node:
    for node in replaced:
        node.outputs.clear()
    sizes = constant(f"{name}/sizes", np.asarray(widths, dtype=np.int64))
    split = gs.Node("Split", name=name, attrs={"axis": -1}, inputs=[source, sizes], outputs=list(outputs))
    graph.nodes.append(split)
    return split


def _merge_adds(graph: gs.Graph, splits: list[gs.Node]) -> None:
    """Split(a)[i] + Split(b)[i] for every i, each output read only by its Add: Split(a + b)."""
    by_sizes: dict[tuple, list[gs.Node]] = collections.defaultdict(list)
    used: set[int] = set()
    for split in splits:
        by_sizes[tuple(split.inputs[1].values.tolist())].append(split)
    for candidates in by_sizes.values():
        for first in candidates:
            for second in candidates:
                if first is second or id(first) in used or id(second) in used:
                    continue
                adds = _paired_adds(first, second)
                if adds is None:
                    continue
                used.update((id(first), id(second)))
                name = f"{first.name}/Add"
                total = gs.Variable(f"{name}/output_0", dtype=first.inputs[0].dtype)
                graph.nodes.append(gs.Node("Add", name=name, inputs=[first.inputs[0], second.inputs[0]],
                                           outputs=[total]))
                results = [add.outputs[0] for add in adds]
                for add in adds:
                    add.outputs.clear()
                first.outputs.clear()
                second.outputs.clear()
                _split(graph, f"{name}/Split", total, first.inputs[1].values.tolist(), results, [])


def _paired_adds(first: gs.Node, second: gs.Node) -> list[gs.Node] | None:
    adds = []
    for left, right in zip(first.outputs, second.outputs):
        if len(left.outputs) != 1 or len(right.outputs) != 1 or left.outputs[0] is not right.outputs[0]:
            return None
        if left.outputs[0].op != "Add":
            return None
        adds.append(left.outputs[0])
    return adds


def _merge_biases(graph: gs.Graph, split: gs.Node) -> gs.Node | None:
    """Split(a)[i] + b_i for every i, each output read only by its Add of a constant bias (a model's own,
    stored alike): Split(a + concat(b)), returned (None: nothing merged)."""
    adds, stored, casts = [], [], []
    for output in split.outputs:
        if len(output.outputs) != 1 or output.outputs[0].op != "Add":
            return None
        add = output.outputs[0]
        addend = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        cast = widening_cast(addend)
        value = cast.inputs[0] if cast is not None else addend
        if not isinstance(value, gs.Constant) or value.values.ndim != 1:
            return None
        adds.append(add)
        stored.append(value.values)
        casts.append(cast)
    if len({array.dtype for array in stored}) != 1 or \
            len({None if cast is None else int(cast.attrs["to"]) for cast in casts}) != 1:
        return None
    cast = casts[0]
    name = f"{split.name}/bias"
    bias = constant(f"{name}/value", np.concatenate(stored))
    if cast is not None:
        widened = gs.Variable(f"{name}/widened", dtype=split.inputs[0].dtype, shape=[int(bias.values.size)])
        graph.nodes.append(gs.Node("Cast", name=f"{name}/Cast", attrs=dict(cast.attrs), inputs=[bias],
                                   outputs=[widened]))
        bias = widened
    total = gs.Variable(f"{name}/output_0", dtype=split.inputs[0].dtype)
    graph.nodes.append(gs.Node("Add", name=f"{name}/Add", inputs=[split.inputs[0], bias], outputs=[total]))
    results = [add.outputs[0] for add in adds]
    for add in adds:
        add.outputs.clear()
    split.outputs.clear()
    return _split(graph, f"{name}/Split", total, split.inputs[1].values.tolist(), results, [])
