"""Train the INT4 block scales against the full-precision model (``quantize --distill-steps N``).

The low-bit layers' integers stay (``--distill-rounding``: each may move one step); their FP16 block scales (and,
on request, the RMSNorm gains) are fitted by
gradient descent on the KL divergence between the source model's and the rewritten model's next-token
distributions over the profile's calibration text (``quant.distill``). Runs after the weights are rounded
(``quantize_weights``, GPTQ before it) and before the embedding table is quantized and parallel layers merged,
so each layer is still one MatMul named after its module. The layout and the file size do not change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Collection, Mapping

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.errors import UserError
from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.passes import register
from accullm_export.graph.passes.rotate_inputs import input_rotation
from accullm_export.graph.rewrite import decoded_scale, producer_of, scale_code, stored_scales
from accullm_export.quant.asymmetric import signed_values
from accullm_export.quant.distill import BlockScaled, DistillConfig, distill_scales, module_of
from accullm_export.quant.symmetric import dequantize, half_representable


@dataclasses.dataclass(frozen=True)
class DistillInputs:
    """What the pass needs besides the graph: the export folder, the teacher's weights, the calibration text."""

    config: DistillConfig
    config_dir: Path
    teacher: Mapping[str, np.ndarray]
    windows: np.ndarray


@register("distill_scales")
def run(graph: gs.Graph, context) -> gs.Graph:
    inputs = context.distillation
    if inputs is None or not inputs.config.active:
        return graph
    layers, stored, stored_values = block_scaled_layers(graph, context.notes)
    if not layers:
        context.notes.append("distill_scales: no INT4 block-scaled layer; nothing to train")
        return graph
    if context.bias_correction:  # train with the bias correct_bias will add from the trained weights
        layers = [_with_correction(layer, stored_values[layer.module].outputs[0].outputs[0], context)
                  for layer in layers]
    student = graph_weights(graph, skip=set(stored))  # the low-bit layers come from ``layers``
    result = distill_scales(inputs.config_dir, inputs.teacher, student, layers, inputs.windows, inputs.config)
    report = result.report
    for module, scales in result.scales.items():
        stored[module].values = half_representable(scales).astype(stored[module].values.dtype)
    for module, values in result.integers.items():
        dequantize_node = stored_values[module]
        dequantize_node.inputs[0] = constant(dequantize_node.inputs[0].name, values.astype(ml_dtypes.int4))
    for module, rows in result.outlier_rows.items():  # the layer's MatMul reads its DequantizeLinear's output
        weight = outlier_weight_constant(stored_values[module].outputs[0].outputs[0])
        weight.values = rows.astype(weight.values.dtype)  # the branch stores FP16 (or the model's type)
    constants = {name: tensor for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    for name, gain in result.gains.items():
        constants[name].values = gain.astype(constants[name].values.dtype)
    outcome = "trained" if report["kept"] else "left as they were (training did not lower the held-out KL)"
    moved = f" and {report['integers_moved']} integers moved by one step" if result.integers else ""
    extras = [f"{report['norms']} norm gains"] if report["norms"] else []
    extras += [f"{report['outlier_rows']} FP16 outlier rows"] if report["outlier_rows"] else []
    context.notes.append(f"distill_scales: {report['layers']} layers' block scales"
                         f"{''.join(' and ' + extra for extra in extras)} {outcome}"
                         f"{moved}: "
                         f"{report['steps']} steps on {report['windows']} calibration windows, KL on "
                         f"{report['held_out_windows']} held-out ones {report['held_out_kl_before']} -> "
                         f"{report['held_out_kl_after']} ({report['seconds']} s)")
    return graph


def _with_correction(layer: BlockScaled, node: gs.Node, context) -> BlockScaled:
    """``layer`` with the mean of its input as the MatMul sees it and E[x] W of the source layer (see
    ``correct_bias``); unchanged when either is unknown (``correct_bias`` then notes it)."""
    from accullm_export.graph.passes.correct_bias import correction_terms  # it reads effective_weight from here

    plan = context.plans.get(node.name)
    terms = correction_terms(node.name, plan.input, context) if plan is not None else None
    if terms is None:
        return layer
    return dataclasses.replace(layer, mean=terms[0].astype(np.float32), target=terms[1].astype(np.float32))


def block_scaled_layers(graph: gs.Graph, notes: list) -> tuple[list[BlockScaled], dict[str, gs.Constant],
                                                                dict[str, gs.Node]]:
    """Every exported linear layer whose weight is INT4 behind a blocked DequantizeLinear, as ``BlockScaled``
    (with its FP16 outlier rows), module path -> the constant holding its stored scales, and module path -> that
    DequantizeLinear (whose first input holds the integers)."""
    layers, stored, stored_values = [], {}, {}
    for node in list(graph.nodes):
        if node.op != "MatMul" or not node.name.endswith("/MatMul") or "/outliers/" in node.name:
            continue
        dequantize_node = producer_of(node.inputs[1], "DequantizeLinear")
        if dequantize_node is None or "block_size" not in dequantize_node.attrs:
            continue
        scales = stored_scales(dequantize_node)
        values = dequantize_node.inputs[0]
        values = constant_array(values) if isinstance(values, gs.Constant) else None
        if values is not None and values.dtype.name not in ("int4", "uint4"):
            continue
        block_size = int(dequantize_node.attrs["block_size"])
        if values is not None and values.dtype.name == "uint4":  # asymmetric: train s on v = q - z
            zero_points = (constant_array(dequantize_node.inputs[2]) if len(dequantize_node.inputs) > 2
                           and isinstance(dequantize_node.inputs[2], gs.Constant) else None)
            values = None if zero_points is None else signed_values(values, zero_points, block_size)
        if scales is None or values is None:
            notes.append(f"{node.name}: its scales or zero points are not stored constants; not distilled")
            continue
        channels, rows = outlier_branch(node)
        module = module_of(node.name)
        rotation = input_rotation(node)
        layers.append(BlockScaled(module, values.astype(np.int8), np.asarray(scales.values, dtype=np.float32),
                                  block_size, channels, rows,
                                  rotation=None if rotation is None else rotation[1].astype(np.float32)))
        stored[module] = scales
        stored_values[module] = dequantize_node
    return layers, stored, stored_values


def branch_matmul(node: gs.Node) -> gs.Node | None:
    """The MatMul of the FP16 outlier branch ``isolate_outliers`` gave ``node`` (added to its output, after the
    bias ``correct_bias`` may have added), or None."""
    output = node.outputs[0]
    if len(output.outputs) == 1 and output.outputs[0].name == f"{node.name}/bias_correction/Add":
        output = output.outputs[0].outputs[0]
    for consumer in output.outputs:
        if consumer.op == "Add" and consumer.name == f"{node.name}/outliers/Add":
            branch = next(t for t in consumer.inputs if t is not output)
            matmul = producer_of(branch, "MatMul")
            if matmul is None:
                raise UserError(f"{node.name}: its outlier branch is not laid out as isolate_outliers writes it")
            return matmul
    return None


def outlier_branch(node: gs.Node) -> tuple[tuple[int, ...], np.ndarray | None]:
    """The FP16 outlier branch ``isolate_outliers`` gave ``node``: (its input channels, its weight rows as
    float32), or ((), None)."""
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
    """The float value of a weight: a constant, a Cast of one, or a DequantizeLinear of stored integers (per
    output channel on axis 1, or blocked on axis 0, its scales stored or decoded from 8-bit codes); None for
    anything else computed."""
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
    """What a linear layer multiplies its input by, float32 [in, out]: its weight dequantized, with the FP16
    outlier rows of its branch put back; None when the weight is computed from anything but constants."""
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    weight = weight.astype(np.float32)
    channels, rows = outlier_branch(node)
    if channels:
        weight = weight.copy()
        weight[list(channels)] = rows
    return weight


def graph_weights(graph: gs.Graph, skip: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The model's parameters by transformers name, read from an exported (and possibly rewritten) graph: each
    linear layer's effective weight ([out, in]; dequantized, with its FP16 outlier rows put back), the norm
    gains and biases, and the token-embedding table. Linear layers whose module path is in ``skip`` are not
    read."""
    weights: dict[str, np.ndarray] = {}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) and name.endswith((".weight", ".bias")) and ".MatMul." not in name \
                and np.dtype(tensor.dtype).kind == "f":
            weights[name] = np.asarray(constant_array(tensor), dtype=np.float32)
    for node in graph.nodes:
        if node.op == "MatMul" and node.name.endswith("/MatMul") and "/outliers/" not in node.name:
            if module_of(node.name) in skip:
                continue
            weight = effective_weight(node)
            if weight is not None:
                weights[f"{module_of(node.name)}.weight"] = weight.T
        elif node.op == "Gather" and node.name == "/model/embed_tokens/Gather":
            table = constant_value(node.inputs[0])
            if table is not None and table.dtype.kind == "f":  # an integer table is scaled after the Gather
                axis = int(node.attrs.get("axis", 0))
                weights["model.embed_tokens.weight"] = table.astype(np.float32).T if axis == 1 else \
                    table.astype(np.float32)
    return weights
