"""Train the INT4 block scales against the full-precision model (recipe key ``distill.steps``).

The low-bit layers' integers stay as they were rounded; their FP16 block scales (and, on request, the RMSNorm
gains and the FP16 outlier rows) are fitted by gradient descent on the KL divergence between the source model's
and the rewritten model's next-token distributions over the profile's calibration text (``training.distill``).
Runs after the weights are rounded (``quantize_weights``, GPTQ before it) and before the embedding table is
quantized and parallel layers merged, so each layer is still one MatMul named after its module. The layout and
the file size do not change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant_array
from accullm_export.graph.outlier_branch import (constant_value, effective_weight, outlier_branch,
                                                 outlier_weight_constant)
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import producer_of, stored_scales
from accullm_export.graph.rotation import input_rotation
from accullm_export.quant.asymmetric import signed_values
from accullm_export.quant.symmetric import half_representable
from accullm_export.training.distill import BlockScaled, DistillConfig, Teacher, distill_scales, module_of


@dataclasses.dataclass(frozen=True)
class DistillInputs:
    """What the pass needs besides the graph: the export folder, the teacher's outputs on the calibration text,
    that text."""

    config: DistillConfig
    config_dir: Path
    teacher: Teacher
    windows: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The teacher's outputs, the export folder and the calibration windows (None: off)."""

    distillation: DistillInputs | None = None


@register("distill_scales", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    inputs = config.distillation
    if inputs is None or not inputs.config.active:
        return PassResult(graph, tuple(notes))
    layers, stored, stored_values = block_scaled_layers(graph, notes)
    if not layers:
        notes.append("distill_scales: no INT4 block-scaled layer; nothing to train")
        return PassResult(graph, tuple(notes))
    student = graph_weights(graph, skip=set(stored))  # the low-bit layers come from ``layers``
    result = distill_scales(inputs.config_dir, inputs.teacher, student, layers, inputs.windows, inputs.config)
    report = result.report
    if report.get("skipped"):
        notes.append(f"distill_scales: {report['layers']} layers' block scales left as they were (not trained: "
                     f"{report['skipped']})")
        return PassResult(graph, tuple(notes))
    for module, scales in result.scales.items():
        stored[module].values = half_representable(scales).astype(stored[module].values.dtype)
    for module, rows in result.outlier_rows.items():  # the layer's MatMul reads its DequantizeLinear's output
        weight = outlier_weight_constant(stored_values[module].outputs[0].outputs[0])
        weight.values = rows.astype(weight.values.dtype)  # the branch stores FP16 (or the model's type)
    constants = {name: tensor for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    for name, gain in result.gains.items():
        constants[name].values = gain.astype(constants[name].values.dtype)
    outcome = "trained" if report["kept"] else "left as they were (training did not lower the held-out KL)"
    extras = [f"{report['norms']} norm gains"] if report["norms"] else []
    extras += [f"{report['outlier_rows']} FP16 outlier rows"] if report["outlier_rows"] else []
    notes.append(f"distill_scales: {report['layers']} layers' block scales"
                         f"{''.join(' and ' + extra for extra in extras)} {outcome}: "
                         f"{report['steps']} steps{_budgeted(report)} on {report['windows']} calibration windows, "
                         f"KL on "
                         f"{report['held_out_windows']} held-out ones {report['held_out_kl_before']} -> "
                         f"{report['held_out_kl_after']} ({report['seconds']} s, {report['precision']} products"
                         f"{'; the layers recomputed in the backward pass' if report.get('recomputed') else ''})")
    return PassResult(graph, tuple(notes))


def _budgeted(report: dict) -> str:
    """Where distill.weight_steps cut the steps: of how many, and why."""
    return "" if report["steps_asked"] == report["steps"] else \
        f" (of {report['steps_asked']}: distill.weight_steps over {report['trained_weights']:,} trained weights)"


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
                table = np.asarray(table, dtype=np.float32)  # no copy of a float32 table
                weights["model.embed_tokens.weight"] = table.T if axis == 1 else table
    return weights
