"""Find the gated MLPs of a graph: down(act(gate(x)) * up(x)), as exported (and as quantized) by this kit.

The match is structural, not by name: a MatMul ("down") whose input is Mul(act(g), u), where act is one of
``GATE_ACTIVATIONS``: SiLU, written Mul(g, Sigmoid(g)) (Llama, Mistral, Qwen, Phi-3), or the tanh-approximated
GELU, written Gelu(g, approximate="tanh") (Gemma 2 and 3; opset 20's op, in both attention forms). An exact GELU
(``approximate="none"``) does not match. A weight may be a float constant or come from a DequantizeLinear or Cast
of a stored constant (a quantized model); the down projection's input may pass through a static
QuantizeLinear/DequantizeLinear pair (w8a8 with one scale per tensor, which holds for any number of kept
channels). g and u are usually MatMuls of the same input; when an FP16 outlier branch is added to them, the block
records no gate/up node (the threshold method does not need them, the guesser refuses such a block). An MLP
whose intermediates have other readers does not match.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.rewrite import producer_of


@dataclasses.dataclass(frozen=True)
class GatedProduct:
    """Mul(act(g), u): the activation's kind, its nodes from g to act(g), and the two tensors it multiplies."""

    kind: str  # a key of GATE_ACTIVATIONS
    gate: gs.Variable  # g
    up: gs.Variable  # u
    nodes: tuple[gs.Node, ...]  # elementwise over the neurons; the last one computes act(g)


def _silu(activated) -> tuple[gs.Variable, tuple[gs.Node, ...]] | None:
    """g and (Sigmoid, Mul) when ``activated`` is Mul(g, Sigmoid(g))."""
    multiply = producer_of(activated, "Mul")
    if multiply is None:
        return None
    for gate, sigmoid_output in (multiply.inputs, multiply.inputs[::-1]):
        sigmoid = producer_of(sigmoid_output, "Sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is gate:
            return gate, (sigmoid, multiply)
    return None


def _gelu_tanh(activated) -> tuple[gs.Variable, tuple[gs.Node, ...]] | None:
    """g and (Gelu,) when ``activated`` is Gelu(g, approximate="tanh")."""
    gelu = producer_of(activated, "Gelu")
    if gelu is None or gelu.attrs.get("approximate", "none") != "tanh":
        return None
    return gelu.inputs[0], (gelu,)


# activation kind -> its matcher: (g, the nodes from g to act(g)) when a tensor is act(g)
GATE_ACTIVATIONS: dict[str, Callable[[gs.Tensor], tuple[gs.Variable, tuple[gs.Node, ...]] | None]] = {
    "silu": _silu, "gelu_tanh": _gelu_tanh}


def gated_product(product: gs.Node | None) -> GatedProduct | None:
    """What ``product`` multiplies, when it is Mul(act(g), u) with act one of GATE_ACTIVATIONS."""
    if product is None or product.op != "Mul":
        return None
    for activated, up in (product.inputs, product.inputs[::-1]):
        for kind, match in GATE_ACTIVATIONS.items():
            found = match(activated)
            if found is not None:
                return GatedProduct(kind=kind, gate=found[0], up=up, nodes=found[1])
    return None


@dataclasses.dataclass(frozen=True)
class MLPBlock:
    """One gated MLP: its nodes and the tensors a sparse rewrite needs.

    ``gate`` and ``up`` are the projections' MatMuls when they feed the activation directly; with an FP16 outlier
    branch added to them (``isolate_outliers``) they are None: the threshold method does not touch them, the
    guesser method needs them plain.
    """

    name: str  # the node-name prefix, e.g. /model/layers.3/mlp
    gate: gs.Node | None
    up: gs.Node | None
    down: gs.Node  # the down projection's (main) MatMul
    product: gs.Node  # Mul(act(g), u): the down projection's input
    down_reader: gs.Node  # the node of the main path reading the product: the down MatMul, or its QuantizeLinear
    activation_kind: str  # a key of GATE_ACTIVATIONS: "silu" | "gelu_tanh"
    activation_nodes: tuple[gs.Node, ...]  # g -> act(g): (Sigmoid, Mul) for silu, (Gelu,) for gelu_tanh

    @property
    def activation(self) -> gs.Node:
        """The node computing act(g)."""
        return self.activation_nodes[-1]

    @property
    def input(self) -> gs.Variable:
        return self.gate.inputs[0]

    @property
    def plain(self) -> bool:
        """Gate and up are plain MatMuls of one input (what the guesser method narrows)."""
        return self.gate is not None and self.up is not None and self.gate.inputs[0] is self.up.inputs[0]

    @property
    def hidden_size(self) -> int:
        return int(_weight_shape(self.down)[1])

    @property
    def intermediate_size(self) -> int:
        return int(_weight_shape(self.down)[0])


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
    """Every gated MLP (SiLU or tanh-approximated GELU) in graph order."""
    blocks = []
    for down in graph.nodes:
        block = _match(down)
        if block is not None:
            blocks.append(block)
    return blocks


def _through_static_qdq(tensor) -> tuple[gs.Variable, gs.Node | None]:
    """The tensor before a per-tensor QuantizeLinear -> DequantizeLinear pair, and that QuantizeLinear."""
    dequantize = producer_of(tensor, "DequantizeLinear")
    quantize = producer_of(dequantize.inputs[0], "QuantizeLinear") if dequantize is not None else None
    if quantize is None or len(quantize.inputs) < 2 or np.size(getattr(quantize.inputs[1], "values", [0, 0])) != 1:
        return tensor, None
    return quantize.inputs[0], quantize


def _projection(tensor) -> gs.Node | None:
    """The plain MatMul (constant or stored weight) producing ``tensor``, if that is what produces it."""
    node = producer_of(tensor, "MatMul")
    return node if node is not None and weight_source(node) is not None and len(tensor.outputs) <= 2 else None


def _match(down: gs.Node) -> MLPBlock | None:
    if down.op != "MatMul" or weight_source(down) is None or down.name.endswith("/outliers/MatMul"):
        return None
    down_input, quantize = _through_static_qdq(down.inputs[0])
    product = producer_of(down_input, "Mul")
    gated = gated_product(product)
    if gated is None:
        return None
    gate_readers = sum(node.inputs.count(gated.gate) for node in gated.nodes)  # SiLU reads g twice, GELU once
    if len(gated.gate.outputs) != gate_readers or len(gated.up.outputs) != 1:
        return None  # something else reads an intermediate: the MLP cannot be narrowed safely
    name = down.name.rsplit("/", 2)[0] if down.name.count("/") >= 2 else down.name
    return MLPBlock(name=name, gate=_projection(gated.gate), up=_projection(gated.up), down=down, product=product,
                    down_reader=quantize or down, activation_kind=gated.kind, activation_nodes=gated.nodes)
