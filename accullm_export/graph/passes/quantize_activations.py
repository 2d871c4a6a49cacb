"""INT8 activations: a QuantizeLinear/DequantizeLinear pair on the input of each planned layer.

* ``static``: one per-tensor scale from the calibration profile (the largest |x| over the non-outlier
  channels, over the calibration data and the attention-sink token, / 127), zero point int8 0: TensorRT's
  explicit-quantization form. The pair sits on the input tensor and is shared by the layers that read it.
* ``dynamic``: one scale per token, computed in the graph from that token's non-outlier channels
  (Mul by a 0/1 mask, Abs, ReduceMax, / 127), then a blocked QuantizeLinear whose block is the whole row. The
  layer becomes an integer GEMM in standard ONNX: ``MatMulInteger`` of the quantized input (stored as uint8
  with zero point 128, which ONNX Runtime's fast u8 x s8 kernel takes; the values are the int8 grid shifted)
  and the int8 weight, then the int32 sum times the token's scale times the channel's weight scale.
  With ``--activation-group G`` each token has one scale per G input channels (as ONNX Runtime's
  MatMulNBits does at accuracy level 4 for onnxruntime-genai's int8 models): the input is reshaped to
  [tokens, K/G, G] and moved group-first, the weight is stored as [K/G, G, N], one batched ``MatMulInteger``
  gives each group's int32 partial sums, which are scaled by their group's scale and summed. ONNX Runtime
  prepacks only 2-D integer weights, so it repacks the 3-D one at every call: slower than one
  scale per token, but far more accurate on activations with outlier channels. A QDQ
  form with a run-time scale would make ONNX Runtime dequantize every weight at every step. TensorRT needs
  static scales, so TensorRT targets use ``static``.

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
        quantized, token_scale = _dynamic(graph, source, plan, float_dtype)
        leading = None  # grouped: the input's shape but its channels, computed once for every reader
        if plan.activation_group:
            leading = _node(graph, "Shape", f"{tensor_name}/groups/Shape", [source], np.int64, end=-1)
        for node, _ in members:
            if not _integer_gemm(graph, node, quantized, token_scale, float_dtype, plan.activation_group, leading):
                notes.append(f"{node.name}: weight is not per-channel int8; activations left unquantized")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _static(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> gs.Variable:
    name = source.name
    scale = constant(f"{name}/input_scale", np.asarray(plan.activation_scale, dtype=float_dtype))
    zero_point = constant(f"{name}/input_zero_point", np.asarray(0, dtype=np.int8))
    quantized = _node(graph, "QuantizeLinear", f"{name}/QuantizeLinear", [source, scale, zero_point], np.int8)
    return _node(graph, "DequantizeLinear", f"{name}/DequantizeLinear", [quantized, scale, zero_point], float_dtype)


def _dynamic(graph: gs.Graph, source: gs.Variable, plan, float_dtype: np.dtype) -> tuple[gs.Variable, gs.Variable]:
    """The input quantized per token (uint8, zero point 128) and the per-token scales; with a group size G, both
    group-first: [K/G, tokens, G] and [K/G, tokens, 1]."""
    name = source.name
    group = plan.activation_group
    mask = np.ones(plan.in_features, dtype=float_dtype)
    mask[list(plan.outliers)] = 0
    if group:  # [..., K] -> [tokens, K/G, G] -> [K/G, tokens, G]: one scale per (group, token)
        flat = _node(graph, "Reshape", f"{name}/groups/Reshape",
                     [source, constant(f"{name}/groups/shape", np.asarray([-1, plan.in_features // group, group],
                                                                         dtype=np.int64))], float_dtype)
        source = _node(graph, "Transpose", f"{name}/groups/Transpose", [flat], float_dtype, perm=[1, 0, 2])
        mask = mask.reshape(plan.in_features // group, 1, group)
    magnitude_of = source
    if plan.outliers:
        magnitude_of = _node(graph, "Mul", f"{name}/token_scale/Mul", [source, constant(f"{name}/inlier_mask", mask)],
                             float_dtype)
    magnitude = _node(graph, "Abs", f"{name}/token_scale/Abs", [magnitude_of], float_dtype)
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
                      axis=-1, block_size=group or plan.in_features)
    return quantized, scale


def _integer_gemm(graph: gs.Graph, node: gs.Node, quantized: gs.Variable, token_scale: gs.Variable,
                  float_dtype: np.dtype, group: int | None = None, leading: gs.Variable | None = None) -> bool:
    """Replace MatMul(x, DequantizeLinear(w_int8, w_scale)) by the integer GEMM and two rescales; with ``group``,
    ``quantized`` is [K/G, tokens, G] and the per-group sums are scaled, added and shaped back to [..., N]
    (``leading``: the input's shape without its last axis)."""
    weight = node.inputs[1]
    producer = weight.inputs[0] if len(weight.inputs) == 1 else None
    if (producer is None or producer.op != "DequantizeLinear" or producer.attrs.get("axis") != 1
            or producer.inputs[0].values.dtype != np.int8):
        return False
    name = node.name
    values = producer.inputs[0]
    if group:
        rows, columns = values.values.shape
        values = constant(f"{name}/weight_grouped", values.values.reshape(rows // group, group, columns))
    accumulated = _node(graph, "MatMulInteger", f"{name}/MatMulInteger",
                        [quantized, values, constant(f"{name}/input_zero_point_u8",
                                                     np.asarray(128, dtype=np.uint8))], np.int32)
    widened = _node(graph, "Cast", f"{name}/Cast", [accumulated], float_dtype, to=onnx_type(float_dtype))
    per_token = _node(graph, "Mul", f"{name}/token_scale/Mul", [widened, token_scale], float_dtype)
    output = node.outputs[0]
    node.outputs.clear()
    if group:  # [K/G, tokens, N] -> [tokens, N] -> [..., N]
        summed = _node(graph, "ReduceSum", f"{name}/groups/ReduceSum",
                       [per_token, constant(f"{name}/groups/axes", np.asarray([0], dtype=np.int64))], float_dtype,
                       keepdims=0)
        scaled = _node(graph, "Mul", f"{name}/weight_scale/Mul", [summed, producer.inputs[1]], float_dtype)
        shape = _node(graph, "Concat", f"{name}/groups/Concat",
                      [leading, constant(f"{name}/groups/width", np.asarray([columns], dtype=np.int64))], np.int64,
                      axis=0)
        graph.nodes.append(gs.Node("Reshape", name=f"{name}/groups/Reshape", inputs=[scaled, shape],
                                   outputs=[output]))
        return True
    graph.nodes.append(gs.Node("Mul", name=f"{name}/weight_scale/Mul", inputs=[per_token, producer.inputs[1]],
                               outputs=[output]))
    return True


def _node(graph: gs.Graph, op: str, name: str, inputs: list, dtype, **attrs) -> gs.Variable:
    output = gs.Variable(f"{name}/output_0", dtype=dtype)
    graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[output]))
    return output
