"""Swap each residual ``Add`` followed by an RMSNorm for ONNX Runtime's contrib
``com.microsoft.SkipSimplifiedLayerNormalization``: an ONNX Runtime (CPU) target pass.

ONNX Runtime fuses the export's RMSNorm (Pow, ReduceMean, Add, Sqrt, Div, Mul) into one
SimplifiedLayerNormalization by itself, but leaves the residual Add before it, because the Add's sum is also
the next residual. The contrib op adds, normalizes and returns the sum as its fourth output, as
onnxruntime-genai's builder writes it: one node instead of two for every residual Add (two per layer).
The file then runs only on ONNX Runtime.

Matched in float32 graphs only (the export's float16 RMSNorm casts to float32 and back, which the contrib op
does not spell the same way); an Add whose norm does not match is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register

DOMAIN = "com.microsoft"
OP_TYPE = "SkipSimplifiedLayerNormalization"


@register("fuse_skip_rms_norm")
def run(graph: gs.Graph, config: None) -> PassResult:
    fused = 0
    returned = {tensor.name for tensor in graph.outputs}  # tensors the fusion must not swallow
    for add in [node for node in graph.nodes if node.op == "Add"]:
        if any(isinstance(tensor, gs.Constant) for tensor in add.inputs):
            continue
        norm = _rms_norm(add.outputs[0], returned)
        if norm is None:
            continue
        multiply, gain, epsilon = norm
        summed, normed = add.outputs[0], multiply.outputs[0]
        inputs = list(add.inputs)
        add.outputs.clear()
        multiply.outputs.clear()
        graph.nodes.append(gs.Node(OP_TYPE, name=f"{multiply.name.rsplit('/', 1)[0]}/SkipSimplifiedLayerNormalization",
                                   domain=DOMAIN, inputs=inputs + [gain],
                                   outputs=[normed, gs.Variable.empty(), gs.Variable.empty(), summed],
                                   attrs={"epsilon": epsilon}))
        fused += 1
    notes = (f"{fused} residual Add + RMSNorm pairs became {OP_TYPE}",) if fused else ()
    return PassResult(graph.cleanup().toposort(), notes)


def _only_reader(tensor, op: str) -> gs.Node | None:
    readers = tensor.outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _scalar(tensor) -> float | None:
    if isinstance(tensor, gs.Constant) and tensor.values.size == 1:
        return float(np.asarray(tensor.values).reshape(()))
    return None


def _rms_norm(x, returned: set[str]) -> tuple[gs.Node, gs.Constant, float] | None:
    """(the final Mul, the gain, epsilon) when ``x`` feeds the export's float32 RMSNorm, else None."""
    powers = [node for node in x.outputs if node.op == "Pow" and node.inputs[0] is x and _scalar(node.inputs[1]) == 2.0]
    divides = [node for node in x.outputs if node.op == "Div" and node.inputs[0] is x]
    if len(powers) != 1 or len(divides) != 1 or x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return None
    mean = _only_reader(powers[0].outputs[0], "ReduceMean")
    if mean is None or int(mean.attrs.get("keepdims", 1)) != 1 or not _last_axis(mean):
        return None
    shift = _only_reader(mean.outputs[0], "Add")
    root = _only_reader(shift.outputs[0], "Sqrt") if shift is not None else None
    epsilon = _scalar(shift.inputs[1]) if shift is not None else None
    if root is None or epsilon is None or _only_reader(root.outputs[0], "Div") is not divides[0]:
        return None
    multiply = _only_reader(divides[0].outputs[0], "Mul")
    inside = (powers[0], mean, shift, root, divides[0])
    if multiply is None or any(node.outputs[0].name in returned for node in inside):
        return None
    gain = [tensor for tensor in multiply.inputs if tensor is not divides[0].outputs[0]]
    if len(gain) != 1 or not isinstance(gain[0], gs.Constant) or gain[0].values.ndim != 1 or \
            gain[0].values.dtype != np.float32:
        return None
    return multiply, gain[0], epsilon


def _last_axis(mean: gs.Node) -> bool:
    axes = mean.inputs[1] if len(mean.inputs) > 1 else None
    values = axes.values.tolist() if isinstance(axes, gs.Constant) else mean.attrs.get("axes")
    return values in ([-1],)  # the export reduces over the last axis only
