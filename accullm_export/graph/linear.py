"""Linear layers of an ONNX graph: MatMul / Gemm nodes whose weight is an initializer."""

from __future__ import annotations

import dataclasses
import re

import onnx
from onnx import helper

_MLP_DOWN = re.compile(r".*/mlp/down_proj/MatMul$")
GATE_ACTIVATIONS = ("Gelu", "FastGelu")  # besides SiLU, spelled x * Sigmoid(x)


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """A linear layer: ``node`` computes input @ weight (weight stored [in, out], or [out, in] for transB Gemm)."""

    node: str
    op_type: str
    input: str  # the activation tensor feeding the layer
    weight: str  # the initializer name
    in_features: int
    out_features: int
    dtype: str
    reads_gated_product: bool = False  # its input is act(gate) * up, found by structure

    @property
    def is_mlp_down_projection(self) -> bool:
        """A gated MLP's down projection: by structure (SwiGLU or GeGLU on any architecture), or by name."""
        return self.reads_gated_product or bool(_MLP_DOWN.match(self.node))


def find_linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every MatMul/Gemm with a 2-D initializer weight, in graph order."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    gated = _gated_products(model)
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        tensor = initializers[node.input[1]]
        if len(tensor.dims) != 2:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        in_features, out_features = (tensor.dims[1], tensor.dims[0]) if transposed else tuple(tensor.dims)
        layers.append(LinearLayer(node=node.name, op_type=node.op_type, input=node.input[0], weight=tensor.name,
                                  in_features=int(in_features), out_features=int(out_features),
                                  dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type).name,
                                  reads_gated_product=node.input[0] in gated))
    return layers


def _gated_products(model: onnx.ModelProto) -> set[str]:
    """Outputs of Mul(act(gate), up) nodes, act a GELU or SiLU (x * Sigmoid(x))."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def activated(tensor: str) -> bool:
        node = producers.get(tensor)
        if node is None:
            return False
        if node.op_type in GATE_ACTIVATIONS:
            return True
        if node.op_type != "Mul" or len(node.input) != 2:
            return False
        return any((sigmoid := producers.get(b)) is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == a
                   for a, b in (node.input, node.input[::-1]))

    return {node.output[0] for node in model.graph.node
            if node.op_type == "Mul" and len(node.input) == 2 and any(activated(t) for t in node.input)}
