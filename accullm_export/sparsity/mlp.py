"""Find the SwiGLU MLPs of a graph: down(silu(gate(x)) * up(x)), as exported (and as quantized) by this kit.

The match is structural, not by name: a MatMul ("down") whose input is Mul(Mul(g, Sigmoid(g)), u) where g and
u are MatMuls of the same input x. A weight may be a float constant or come from a DequantizeLinear or Cast of
a stored constant (a quantized model). An MLP whose gate or up output passes through anything else first (a
bias Add, an outlier-branch Add) does not match and is reported as unrecognised.
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs


@dataclasses.dataclass(frozen=True)
class MLPBlock:
    """One SwiGLU MLP: its nodes and the tensors a sparse rewrite needs."""

    name: str  # the node-name prefix, e.g. /model/layers.3/mlp
    gate: gs.Node
    up: gs.Node
    down: gs.Node
    activation: gs.Node  # Mul(g, Sigmoid(g))
    product: gs.Node  # Mul(activation, up): the down projection's input
    sigmoid: gs.Node

    @property
    def input(self) -> gs.Variable:
        return self.gate.inputs[0]

    @property
    def hidden_size(self) -> int:
        return int(_weight_shape(self.gate)[0])

    @property
    def intermediate_size(self) -> int:
        return int(_weight_shape(self.gate)[1])


def _weight_shape(node: gs.Node) -> list[int]:
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        return list(weight.shape)
    return list(weight.inputs[0].inputs[0].shape)


def weight_source(node: gs.Node) -> gs.Constant | None:
    """The stored constant behind a MatMul's weight: itself, or the input of a DequantizeLinear / Cast."""
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        return weight
    producer = weight.inputs[0] if weight.inputs else None
    if producer is not None and producer.op in ("DequantizeLinear", "Cast") and isinstance(producer.inputs[0],
                                                                                           gs.Constant):
        return producer.inputs[0]
    return None


def find_mlp_blocks(graph: gs.Graph) -> list[MLPBlock]:
    """Every SwiGLU MLP in graph order."""
    blocks = []
    for down in graph.nodes:
        block = _match(down)
        if block is not None:
            blocks.append(block)
    return blocks


def _producer(tensor, op: str) -> gs.Node | None:
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or tensor.inputs[0].op != op:
        return None
    return tensor.inputs[0]


def _match(down: gs.Node) -> MLPBlock | None:
    if down.op != "MatMul" or weight_source(down) is None:
        return None
    product = _producer(down.inputs[0], "Mul")
    if product is None:
        return None
    for activated, up_tensor in (product.inputs, product.inputs[::-1]):
        activation, up = _producer(activated, "Mul"), _producer(up_tensor, "MatMul")
        if activation is None or up is None or weight_source(up) is None:
            continue
        for gate_tensor, sigmoid_tensor in (activation.inputs, activation.inputs[::-1]):
            sigmoid, gate = _producer(sigmoid_tensor, "Sigmoid"), _producer(gate_tensor, "MatMul")
            if (sigmoid is None or gate is None or sigmoid.inputs[0] is not gate_tensor
                    or gate.inputs[0] is not up.inputs[0] or weight_source(gate) is None):
                continue
            if len(gate_tensor.outputs) != 2 or len(up_tensor.outputs) != 1 or len(product.outputs[0].outputs) != 1:
                continue  # something else reads an intermediate: the MLP cannot be narrowed safely
            name = down.name.rsplit("/", 2)[0] if down.name.count("/") >= 2 else down.name
            return MLPBlock(name=name, gate=gate, up=up, down=down, activation=activation, product=product,
                            sigmoid=sigmoid)
    return None
