"""Linear layers of an ONNX graph: MatMul / Gemm nodes whose weight is an initializer."""

from __future__ import annotations

import dataclasses
import re

import onnx
from onnx import helper

_MLP_DOWN = re.compile(r".*/mlp/down_proj/MatMul$")


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

    @property
    def is_mlp_down_projection(self) -> bool:
        return bool(_MLP_DOWN.match(self.node))


def find_linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every MatMul/Gemm with a 2-D initializer weight, in graph order."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
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
                                  dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type).name))
    return layers
