"""INT8 activations on the input of each planned layer.

* ``static``: one per-tensor scale from the calibration profile (the largest |x| over the non-outlier
  channels, over the calibration data and the attention-sink token, / 127), zero point int8 0: TensorRT's
  explicit-quantization form. The pair sits on the input tensor and is shared by the layers that read it.
* ``dynamic``: one scale per G input channels of each token (the recipe's group). The layer becomes ONNX
  Runtime's ``MatMulNBits`` with 8-bit weights in blocks of G and ``accuracy_level`` 4, which quantizes each
  block of G input channels of a token to int8 (its largest |x| / 127) and multiplies in integers: the INT8
  activations are stated by the node itself, so every optimization level computes them. The input's outlier
  channels are zeroed first (a Mul by a 0/1 mask, shared by the layers that read it), so that they do not set
  their block's scale; the branch reads them unquantized. TensorRT needs static scales, so TensorRT targets use
  ``static``.

The outlier branch keeps reading the unquantized input: its Gather was attached before this pass runs.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.layer_plan import activation_scale
from accullm_export.graph.rewrite import onnx_type, planned_nodes, stored_scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the inputs' statistics, the SmoothQuant divisors and the model's float type."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    float_dtype: np.dtype = np.dtype(np.float32)


@register("quantize_activations", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    by_input: dict[str, list] = collections.defaultdict(list)
    for node, plan in planned_nodes(graph, config.plans):
        if plan.activations is not None:
            by_input[node.inputs[0].name].append((node, plan))
    for tensor_name, members in by_input.items():
        source, plan = members[0][0].inputs[0], members[0][1]
        if plan.activations == "static" and tensor_name in config.input_scales:  # smoothed: x / s has new ranges
            plan = dataclasses.replace(plan, activation_scale=activation_scale(
                config.statistics[tensor_name], plan.outliers, config.input_scales[tensor_name]))
        float_dtype = np.dtype(config.float_dtype)
        if plan.activations == "static":
            quantized = _static(graph, source, plan, float_dtype)
            for node, _ in members:
                node.inputs[0] = quantized
            continue
        masked = _inliers(graph, source, plan, float_dtype)
        if float_dtype != np.float32:  # see _matmul_nbits: the kernel runs on a float32 copy
            masked = _node(graph, "Cast", f"{masked.name}/Cast", [masked], np.float32, to=onnx.TensorProto.FLOAT)
        for node, _ in members:
            if not _matmul_nbits(graph, node, masked, plan.activation_group, float_dtype):
                notes.append(f"{node.name}: weight is not int8 in blocks of {plan.activation_group}; "
                             "activations left unquantized")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _static(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> gs.Variable:
    name = source.name
    scale = constant(f"{name}/input_scale", np.asarray(plan.activation_scale, dtype=float_dtype))
    zero_point = constant(f"{name}/input_zero_point", np.asarray(0, dtype=np.int8))
    quantized = _node(graph, "QuantizeLinear", f"{name}/QuantizeLinear", [source, scale, zero_point], np.int8)
    return _node(graph, "DequantizeLinear", f"{name}/DequantizeLinear", [quantized, scale, zero_point], float_dtype)


def _inliers(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> gs.Variable:
    """``source`` with its outlier channels zeroed (``source`` itself where there are none): what sets the
    INT8 scales."""
    if not plan.outliers:
        return source
    mask = np.ones(plan.in_features, dtype=float_dtype)
    mask[list(plan.outliers)] = 0
    return _node(graph, "Mul", f"{source.name}/inliers/Mul", [source, constant(f"{source.name}/inlier_mask", mask)],
                 float_dtype)


def _matmul_nbits(graph: gs.Graph, node: gs.Node, source: gs.Variable, group: int, float_dtype: np.dtype) -> bool:
    """Replace MatMul(x, DequantizeLinear(w_int8 [K, N] in blocks of ``group`` on axis 0, scales)) by
    MatMulNBits(x, w + 128 as uint8 [N, blocks, group], scales [N, blocks]) with 8 bits, no zero-point input (its
    default, 128, is the shift) and accuracy level 4 (INT8 activations in blocks of ``group``).

    ``source`` is float32 whatever ``float_dtype`` is: ONNX Runtime's CPU kernel for float16 inputs returned wrong
    sums once its output fed an Add beside other nodes, so a float16 model's layer runs in float32 and its output
    is cast back."""
    producer = _int8_weight(node, group)
    scales = None if producer is None else stored_scales(producer)
    if scales is None:
        return False
    values = producer.inputs[0].values
    rows, columns = values.shape
    blocks = -(-rows // group)
    shifted = np.full((blocks * group, columns), 128, dtype=np.uint8)  # a ragged last block is padded with zeros
    shifted[:rows] = (values.astype(np.int16) + 128).astype(np.uint8)
    scales = scales.values.astype(np.float32)  # [blocks, N]
    name = node.name
    output = node.outputs[0]
    node.outputs.clear()
    if float_dtype != np.float32:
        widened = gs.Variable(f"{name}/MatMulNBits/output_0", dtype=np.float32)
        graph.nodes.append(gs.Node("Cast", name=f"{name}/Cast", attrs={"to": onnx_type(float_dtype)},
                                   inputs=[widened], outputs=[output]))
        output = widened
    graph.nodes.append(gs.Node(
        "MatMulNBits", name=f"{name}/MatMulNBits", domain="com.microsoft",
        attrs={"K": int(rows), "N": int(columns), "bits": 8, "block_size": int(group), "accuracy_level": 4},
        inputs=[source, constant(f"{name}/weight_nbits", np.ascontiguousarray(
                    shifted.T.reshape(columns, blocks, group))),
                constant(f"{name}/weight_nbits_scale", np.ascontiguousarray(scales.T))],
        outputs=[output]))
    return True


def _int8_weight(node: gs.Node, block_size: int) -> gs.Node | None:
    """The DequantizeLinear that gives ``node`` its int8 weight in blocks of ``block_size`` rows, or None."""
    weight = node.inputs[1]
    producer = weight.inputs[0] if len(weight.inputs) == 1 else None
    if (producer is None or producer.op != "DequantizeLinear" or producer.attrs.get("axis", 1) != 0
            or producer.attrs.get("block_size", 0) != block_size
            or not isinstance(producer.inputs[0], gs.Constant) or producer.inputs[0].values.dtype != np.int8):
        return None
    return producer


def _node(graph: gs.Graph, op: str, name: str, inputs: list, dtype, **attrs) -> gs.Variable:
    output = gs.Variable(f"{name}/output_0", dtype=dtype)
    graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[output]))
    return output
