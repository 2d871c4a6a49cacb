"""Bias correction (``quantize --bias-correction``): each low-bit layer gets the bias b = E[x] (W - W_q), so that
its output error x (W - W_q) - b has zero mean over the calibration text (Nagel et al., 2019, "Data-free
quantization", here with measured means).

E[x] is the layer input's mean over the calibration windows (position 0, the attention sink, left out like GPTQ's
statistics), measured on the source model; W is the source weight and W_q what the rewritten layer multiplies by:
its integers dequantized (after GPTQ, distillation, INT8 rows and 8-bit scale codes) with its outlier rows put
back.
Inputs divided by AWQ's or SmoothQuant's s have the mean E[x] / s, so b = E[x] W - (E[x] / s) W_q.

What it was for, and what it measured on the sample model: after the RMSNorms, the residual stream's massive
channels are large and nearly constant (on SmolLM2-135M the largest one's |x| has a coefficient of variation of
0.12-0.3), so their rows' rounding error mostly shifts the output by a constant, which the bias takes back, and
GPTQ (on the covariance of x once bias correction is on) spends its compensation on what varies. Those channels
might then leave the FP16 branch (about 3 us of ONNX Runtime node work per layer) for one FP16 vector per layer
(16 / in_features bits per weight; ONNX Runtime folds the Add into MatMulNBits, 0.6 us). They cannot: without the
rows the attention sink's q/k/v inputs, unlike any other token's, break, and the other tokens' error stays 10-25%
above the branch's (``benchmarks/layer_error_probe.py``); with the rows the bias changes the layer error by 2% or
less. So it is off by default, an option for models whose outliers are steadier.

The bias is stored in FP16 (widened by a Cast in a float32 graph) as ``<layer>/bias_correction`` and added to the
MatMul's output (before an outlier branch's Add, so that ONNX Runtime can fuse it into MatMulNBits);
``merge_parallel_linears`` concatenates the biases of merged layers. Runs
after every pass that changes a weight.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.passes import register
from accullm_export.graph.passes.distill_scales import effective_weight
from accullm_export.graph.rewrite import half_constant, planned_nodes

SUFFIX = "bias_correction"


@register("correct_bias")
def run(graph: gs.Graph, context) -> gs.Graph:
    if not context.bias_correction:
        return graph
    corrected, largest = 0, 0.0
    for node, plan in planned_nodes(graph, context.plans):
        if not plan.quantized:
            continue
        bias = layer_bias(node, plan.input, context)
        if bias is None:
            context.notes.append(f"{node.name}: no calibration mean, source weight or constant quantized weight; "
                                 "no bias correction")
            continue
        add_bias(graph, node, bias, context.float_dtype)
        corrected += 1
        largest = max(largest, float(np.abs(bias).max()))
    context.notes.append(f"{corrected} layers got a bias correction (largest |b| {largest:.3g})")
    return graph.cleanup().toposort()


def layer_bias(node: gs.Node, input_name: str, context) -> np.ndarray | None:
    """E[x] W - E[x'] W_q for ``node``, whose planned input is ``input_name`` (float64 [out]); None when a piece
    is missing."""
    terms = correction_terms(node.name, input_name, context)
    quantized = effective_weight(node)
    if terms is None or quantized is None:
        return None
    seen, target = terms
    return target - seen @ quantized.astype(np.float64)


def correction_terms(layer: str, input_name: str, context) -> tuple[np.ndarray, np.ndarray] | None:
    """(E[x'], the mean of the input as the layer reads it, x' = x / s after AWQ or SmoothQuant; E[x] W of the
    source layer), float64, for the layer named ``layer`` whose planned input is ``input_name`` (by that name,
    since w8a8's activation Q/DQ comes between); None without a calibration mean or source weight."""
    mean = context.means.get(input_name)
    reference = context.reference_weights.get(layer)
    if mean is None or reference is None:
        return None
    mean = np.asarray(mean, dtype=np.float64)
    scales = context.input_scales.get(input_name)
    seen = mean if scales is None else mean / np.asarray(scales, dtype=np.float64)
    return seen, mean @ reference.astype(np.float64)


def add_bias(graph: gs.Graph, node: gs.Node, bias: np.ndarray, float_dtype: np.dtype) -> None:
    """MatMul + bias in place of ``node``'s output (its readers, an outlier branch's Add included, keep their
    tensor; ONNX Runtime fuses the Add into MatMulNBits); the bias stored in FP16."""
    result = node.outputs[0]
    addend = half_constant(graph, f"{node.name}/{SUFFIX}", bias, float_dtype)
    before = gs.Variable(f"{node.name}/uncorrected_output", dtype=result.dtype, shape=result.shape)
    node.outputs[0] = before
    graph.nodes.append(gs.Node("Add", name=f"{node.name}/{SUFFIX}/Add", inputs=[before, addend], outputs=[result]))
