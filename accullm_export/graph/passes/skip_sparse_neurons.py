"""Sparse-skip MLPs in standard ONNX: each token computes only the neurons its selection keeps.

Per MLP, with I neurons and a per-token score s (``threshold``: |a|, the down projection's input; ``predictor``:
the guesser's logits, computed from the MLP input before the MLP runs):

    keep  = s > level                               [tokens, I]  per-token selection
    union = ReduceMax(s over all tokens) > level    [I]          neurons any token of this call keeps
    W'    = Compress(W, union)                      the selected weight rows/columns only (k of I)
    a'    = Where(Compress(keep, union), a', 0)     each token's own selection, applied exactly

For batch-1 decode (one token) union == keep, so only the k selected rows of the down projection (and, with
the guesser, the k columns of gate and up) are read. For prefill the union of the prompt's selections is
computed (close to dense for long prompts: that is the documented fallback) and each token is still masked to
its own selection, so a full-sequence pass gives exactly the numbers token-by-token decoding gives; validation
with teacher forcing therefore measures the decode behaviour.

The MLP's own activation nodes (SiLU's Sigmoid and Mul, or a tanh-approximated Gelu: see
:mod:`accullm_export.graph.mlp`) stay where they are; they are elementwise, so on the guesser's narrowed gate
they compute exactly the kept neurons' values.

With ``dense_first`` the score of the sequence's first position (``position_ids == 0``, the attention sink) is
raised to the float type's largest value, so that token keeps every neuron (and the union then holds all of
them: that call runs dense). The sink is computed once, in the prompt's prefill; decode steps are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register
from accullm_export.graph.mlp import MLPBlock, find_mlp_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Plans keyed by MLP name, and the per-channel divisors s that AWQ or SmoothQuant folded into an input (x
    becomes x / s), keyed by tensor name: thresholds and guessers were calibrated on x, so they are rescaled to
    the graph's x / s."""

    plans: Mapping[str, Any]
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    dense_first: bool = False  # position 0 keeps all its neurons (needs a position_ids input)


@register("skip_sparse_neurons", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    blocks = {block.name: block for block in find_mlp_blocks(graph)}
    first = _first_position(graph, notes) if config.dense_first else None
    for name, plan in config.plans.items():
        block = blocks.get(name)
        if block is None:
            notes.append(f"{name}: no gated MLP of that name in this graph; left dense")
            continue
        if plan.sparsity <= 0.0:
            continue
        if plan.method == "predictor" and (not block.plain or len(block.product.outputs[0].outputs) != 1):
            notes.append(f"{name}: an outlier branch (or another reader) on the MLP; the guesser narrows every "
                         "projection and needs plain MatMuls; left dense")
            continue
        _Rewriter(graph, block, config.input_scales, first).apply(plan)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _first_position(graph: gs.Graph, notes: list[str]) -> gs.Variable | None:
    """[batch, seq, 1] bool: the token is the sequence's first (position id 0); None without position ids."""
    positions = next((tensor for tensor in graph.inputs if tensor.name == "position_ids"), None)
    if positions is None:
        notes.append("no position_ids input: the first position is sparse like every other")
        return None
    prefix = "/sparse_first_position"
    zero = gs.Constant(f"{prefix}/zero", np.array(0, dtype=np.dtype(positions.dtype or np.int64)))
    equal = gs.Variable(f"{prefix}/is_first", dtype=np.bool_)
    graph.nodes.append(gs.Node("Equal", name=f"{prefix}/Equal", inputs=[positions, zero], outputs=[equal]))
    first = gs.Variable(f"{prefix}/is_first_unsqueezed", dtype=np.bool_)
    graph.nodes.append(gs.Node("Unsqueeze", name=f"{prefix}/Unsqueeze",
                               inputs=[equal, gs.Constant(f"{prefix}/last_axis", np.array([-1], np.int64))],
                               outputs=[first]))
    return first


class _Rewriter:
    def __init__(self, graph: gs.Graph, block: MLPBlock, input_scales: dict, first: gs.Variable | None = None):
        self.graph, self.block, self.prefix = graph, block, f"{block.name}/sparse"
        self.input_scales, self.first = input_scales, first
        self.dtype = np.dtype(block.product.outputs[0].dtype or np.float32)

    def apply(self, plan) -> None:
        block = self.block
        product = block.product.outputs[0]
        readers = list(product.outputs)  # the down projection's main path, and an outlier branch's Gather
        if plan.method == "predictor":
            p = plan.predictor
            x_scales = self.input_scales.get(block.input.name)  # the guesser saw x; the graph has x / s
            down_rank = p.down_rank if x_scales is None else p.down_rank * np.asarray(x_scales)[:, None]
            hidden = self._node("MatMul", [block.input, self._const("down_rank", down_rank)], "guess_rank")
            score = self._node("MatMul", [hidden, self._const("up_rank", p.up_rank)], "guess")
            score = self._node("Add", [score, self._const("guess_bias", p.bias)], "guess_logits")
            level = p.tau
        else:
            a_scales = self.input_scales.get(product.name)  # |a| > t  <=>  |a / s| > t / s
            score = self._node("Abs", [product], "magnitude")
            level = plan.threshold if a_scales is None else plan.threshold / np.asarray(a_scales, np.float64)
        if self.first is not None:  # the sink keeps every neuron
            score = self._node("Where", [self.first, self._const("dense", np.array(np.finfo(self.dtype).max)), score],
                               "score_first_dense")
        level = self._const("level", np.array(level))
        keep = self._node("Greater", [score, level], "keep", dtype=np.bool_)
        rows = gs.Constant(f"{self.prefix}/rows", np.array([-1, block.intermediate_size], np.int64))
        flat = self._node("Reshape", [score, rows], "rows")
        peak = self._node("ReduceMax", [flat, gs.Constant(f"{self.prefix}/axis0", np.array([0], np.int64))], "peak",
                          keepdims=0)
        union = self._node("Greater", [peak, level], "union", dtype=np.bool_)
        if plan.method == "predictor":
            for node in (block.gate, block.up):
                node.inputs[1] = self._compress(node.inputs[1], union, axis=1, name=f"{node.name}/weight_selected")
            for tensor in (block.gate.outputs[0], block.up.outputs[0],
                           *(node.outputs[0] for node in block.activation_nodes), product):
                tensor.shape = None  # the neuron axis is now the selection's size
            keep = self._compress(keep, union, axis=-1, name=f"{self.prefix}/keep_selected")
        masked = self._node("Where", [keep, product, self._const("zero", np.array(0.0))], "masked")
        selected = masked
        if plan.method == "threshold":
            selected = self._compress(masked, union, axis=-1, name=f"{self.prefix}/selected")
            for reader in readers:  # an outlier branch gathers its channels from the full-width masked tensor
                if reader is not block.down_reader:
                    reader.inputs[reader.inputs.index(product)] = masked
        block.down_reader.inputs[0] = selected  # the down MatMul, or its static QuantizeLinear (any width)
        block.down.inputs[1] = self._compress(block.down.inputs[1], union, axis=0,
                                              name=f"{block.down.name}/weight_selected")

    def _const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{name}", np.asarray(values, dtype=self.dtype))

    def _node(self, op: str, inputs: list, name: str, dtype=None, **attrs) -> gs.Variable:
        output = gs.Variable(f"{self.prefix}/{name}_output", dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, name=f"{self.prefix}/{name}", attrs=attrs, inputs=inputs,
                                        outputs=[output]))
        return output

    def _compress(self, tensor, condition, axis: int, name: str) -> gs.Variable:
        output = gs.Variable(f"{name}_output", dtype=tensor.dtype)
        self.graph.nodes.append(gs.Node("Compress", name=name, attrs={"axis": axis}, inputs=[tensor, condition],
                                        outputs=[output]))
        return output
