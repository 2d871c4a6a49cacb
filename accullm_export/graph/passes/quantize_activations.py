"""INT8 activations: a QuantizeLinear/DequantizeLinear pair on the input of each planned layer.

* ``static``: one per-tensor scale from the calibration profile (the largest |x| over the non-outlier
  channels, over the calibration data and the attention-sink token, / 127), zero point int8 0: TensorRT's
  explicit-quantization form. The pair sits on the input tensor and is shared by the layers that read it.
* ``dynamic``: one scale per token, computed in the graph from that token's non-outlier channels
  (Mul by a 0/1 mask, Abs, ReduceMax, / 127), then a blocked QuantizeLinear whose block is the whole row. The
  layer becomes an integer GEMM in standard ONNX: ``MatMulInteger`` of the quantized input (stored as uint8
  with zero point 128, which ONNX Runtime's fast u8 x s8 kernel takes; the values are the int8 grid shifted)
  and the int8 weight, then the int32 sum times the token's scale times the channel's weight scale.
* ``dynamic`` with a group size G: one scale per G input channels of each token. The layer becomes ONNX
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
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.layer_plan import activation_scale
from accullm_export.graph.rewrite import onnx_type, planned_nodes

_TINY = 1e-12  # floor of a dynamic scale, so an all-zero row does not divide by zero


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
        if plan.activation_group:
            masked = _inliers(graph, source, plan, float_dtype)
            for node, _ in members:
                if not _matmul_nbits(graph, node, masked, plan.activation_group, float_dtype):
                    notes.append(f"{node.name}: weight is not int8 in blocks of {plan.activation_group}; "
                                 "activations left unquantized")
            continue
        quantized, token_scale = _dynamic(graph, source, plan, float_dtype)
        for node, _ in members:
            if not _integer_gemm(graph, node, quantized, token_scale, float_dtype):
                notes.append(f"{node.name}: weight is not per-channel int8; activations left unquantized")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _static(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> gs.Variable:
    name = source.name
    scale = constant(f"{name}/input_scale", np.asarray(plan.activation_scale, dtype=float_dtype))
    zero_point = constant(f"{name}/input_zero_point", np.asarray(0, dtype=np.int8))
    quantized = _node(graph, "QuantizeLinear", f"{name}/QuantizeLinear", [source, scale, zero_point], np.int8)
    return _node(graph, "DequantizeLinear", f"{name}/DequantizeLinear", [quantized, scale, zero_point], float_dtype)


def _dynamic(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> tuple[gs.Variable, gs.Variable]:
    """The input quantized per token (uint8, zero point 128) and the per-token scales."""
    name = source.name
    magnitude = _node(graph, "Abs", f"{name}/token_scale/Abs", [_inliers(graph, source, plan, float_dtype)],
                      float_dtype)
    largest = _node(graph, "ReduceMax", f"{name}/token_scale/ReduceMax",
                    [magnitude, constant(f"{name}/token_scale/axes", np.asarray([-1], dtype=np.int64))], float_dtype,
                    keepdims=1)
    qmax = constant(f"{name}/qmax", np.asarray(127, float_dtype))
    scale = _node(graph, "Div", f"{name}/token_scale/Div", [largest, qmax], float_dtype)
    scale = _node(graph, "Max", f"{name}/token_scale/Max",
                  [scale, constant(f"{name}/token_scale/floor", np.asarray(_TINY, float_dtype))], float_dtype)
    zero_point = _node(graph, "Expand", f"{name}/token_zero_point/Expand",
                       [constant(f"{name}/uint8_zero_point", np.asarray(128, dtype=np.uint8)),
                        _node(graph, "Shape", f"{name}/token_scale/Shape", [scale], np.int64)], np.uint8)
    quantized = _node(graph, "QuantizeLinear", f"{name}/QuantizeLinear", [source, scale, zero_point], np.uint8,
                      axis=-1, block_size=plan.in_features)
    return quantized, scale


def _inliers(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> gs.Variable:
    """``source`` with its outlier channels zeroed (``source`` itself where there are none): what sets the
    INT8 scales."""
    if not plan.outliers:
        return source
    mask = np.ones(plan.in_features, dtype=float_dtype)
    mask[list(plan.outliers)] = 0
    return _node(graph, "Mul", f"{source.name}/inliers/Mul", [source, constant(f"{source.name}/inlier_mask", mask)],
                 float_dtype)


def _integer_gemm(graph: gs.Graph, node: gs.Node, quantized: gs.Variable, token_scale: gs.Variable,
                  float_dtype: np.dtype) -> bool:
    """Replace MatMul(x, DequantizeLinear(w_int8, w_scale)) by the integer GEMM and two rescales."""
    producer = _int8_weight(node, axis=1)
    if producer is None:
        return False
    name = node.name
    accumulated = _node(graph, "MatMulInteger", f"{name}/MatMulInteger",
                        [quantized, producer.inputs[0], constant(f"{name}/input_zero_point_u8",
                                                                 np.asarray(128, dtype=np.uint8))], np.int32)
    widened = _node(graph, "Cast", f"{name}/Cast", [accumulated], float_dtype, to=onnx_type(float_dtype))
    per_token = _node(graph, "Mul", f"{name}/token_scale/Mul", [widened, token_scale], float_dtype)
    output = node.outputs[0]
    node.outputs.clear()
    graph.nodes.append(gs.Node("Mul", name=f"{name}/weight_scale/Mul", inputs=[per_token, producer.inputs[1]],
                               outputs=[output]))
    return True


def _matmul_nbits(graph: gs.Graph, node: gs.Node, source: gs.Variable, group: int, float_dtype: np.dtype) -> bool:
    """Replace MatMul(x, DequantizeLinear(w_int8 [K, N] in blocks of ``group`` on axis 0, scales)) by
    MatMulNBits(x, w + 128 as uint8 [N, blocks, group], scales [N, blocks]) with 8 bits, no zero-point input (its
    default, 128, is the shift) and accuracy level 4 (INT8 activations in blocks of ``group``)."""
    producer = _int8_weight(node, axis=0, block_size=group)
    if producer is None:
        return False
    values = producer.inputs[0].values
    rows, columns = values.shape
    blocks = -(-rows // group)
    shifted = np.full((blocks * group, columns), 128, dtype=np.uint8)  # a ragged last block is padded with zeros
    shifted[:rows] = (values.astype(np.int16) + 128).astype(np.uint8)
    scales = _constant_values(producer.inputs[1]).astype(float_dtype)  # [blocks, N]
    name = node.name
    output = node.outputs[0]
    node.outputs.clear()
    graph.nodes.append(gs.Node(
        "MatMulNBits", name=f"{name}/MatMulNBits", domain="com.microsoft",
        attrs={"K": int(rows), "N": int(columns), "bits": 8, "block_size": int(group), "accuracy_level": 4},
        inputs=[source, constant(f"{name}/weight_nbits", np.ascontiguousarray(
                    shifted.T.reshape(columns, blocks, group))),
                constant(f"{name}/weight_nbits_scale", np.ascontiguousarray(scales.T))],
        outputs=[output]))
    return True


def _int8_weight(node: gs.Node, *, axis: int, block_size: int | None = None) -> gs.Node | None:
    """The DequantizeLinear that gives ``node`` its int8 weight on ``axis`` (with that block size), or None."""
    weight = node.inputs[1]
    producer = weight.inputs[0] if len(weight.inputs) == 1 else None
    if (producer is None or producer.op != "DequantizeLinear" or producer.attrs.get("axis", 1) != axis
            or producer.attrs.get("block_size", 0) != (block_size or 0)
            or not isinstance(producer.inputs[0], gs.Constant) or producer.inputs[0].values.dtype != np.int8):
        return None
    return producer


def _constant_values(tensor: gs.Tensor) -> np.ndarray:
    """A constant's values, through the Cast that widens FP16-stored scales."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    cast = tensor.inputs[0]
    if cast.op != "Cast" or not isinstance(cast.inputs[0], gs.Constant):
        raise ValueError(f"{tensor.name}: not a constant")
    return cast.inputs[0].values


def _node(graph: gs.Graph, op: str, name: str, inputs: list, dtype, **attrs) -> gs.Variable:
    output = gs.Variable(f"{name}/output_0", dtype=dtype)
    graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[output]))
    return output
