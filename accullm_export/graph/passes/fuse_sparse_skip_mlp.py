"""TensorRT targets only: swap each standard-ONNX sparse-skip MLP for one ``accullm::SparseSkipMLP`` node.

Runs on the output of ``skip_sparse_neurons`` before ``merge_parallel_linears`` (TensorRT needs no merging).
The op's inputs and semantics are defined in ``plugins/sparse_skip_mlp/reference.py``. Its ``activation``
attribute names the gate's activation (SiLU or the tanh-approximated GELU), found by structure
(:func:`accullm_export.graph.mlp.gated_product`); the fused node replaces the MLP's own activation nodes. Weights
go in as stored: float constants, or int4 values plus their block scales (``block_size`` > 0). An MLP whose
weights are stored any other way (int8 per channel, a Cast of fp16), or with an FP16 outlier branch on one of
its projections, stays standard, with a note.

The fused op selects every token's neurons by its score alone, with no position input: a standard graph with a
dense first position (``dense_first``) would compute something else at position 0, so TensorRT recipes turn it
off (the presets' ``[tensorrt.sparsity]`` tables) and a TensorRT recipe that turns it on is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.mlp import gated_product
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import PLUGIN_ATTRIBUTES, PLUGIN_DOMAIN, register
from accullm_export.graph.rewrite import producer_of, stored_scales

OP_TYPE, DOMAIN, VERSION = "SparseSkipMLP", PLUGIN_DOMAIN, 1
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # graph.mlp.GATE_ACTIVATIONS kind -> the op's ``activation`` attribute


@register("fuse_sparse_skip_mlp")
def run(graph: gs.Graph, config: None) -> PassResult:
    notes: list[str] = []
    nodes = {node.name: node for node in graph.nodes}
    for union in [node for node in graph.nodes if node.name.endswith("/sparse/union")]:
        prefix = union.name[: -len("/sparse/union")]
        fused = _fused_node(graph, nodes, prefix)
        if isinstance(fused, str):
            notes.append(f"{prefix}: {fused}; left as standard ONNX")
            continue
        graph.nodes.append(fused)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _stored_weight(tensor) -> tuple[gs.Tensor, gs.Tensor | None, int] | str:
    """(values, scales or None, block size) behind a (possibly Compress-ed) MatMul weight."""
    compress = producer_of(tensor, "Compress")
    if compress is not None:
        tensor = compress.inputs[0]
    if isinstance(tensor, gs.Constant):
        return tensor, None, 0
    dequantize = producer_of(tensor, "DequantizeLinear")
    if (dequantize is not None and "block_size" in dequantize.attrs
            and np.dtype(dequantize.inputs[0].dtype).name == "int4"):
        scales = stored_scales(dequantize)
        if scales is not None:
            return dequantize.inputs[0], scales, int(dequantize.attrs["block_size"])
    return "weights stored in a form the plugin does not take (float, or blocked int4 only)"


def _fused_node(graph: gs.Graph, nodes: dict, prefix: str) -> gs.Node | str:
    gate, up, down = (nodes.get(f"{prefix}/{name}/MatMul") for name in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None:
        return "gate/up/down MatMuls not found by name (run this pass before merge_parallel_linears)"
    if any(f"{node.name}/outliers/MatMul" in nodes for node in (gate, up, down)):
        return "an FP16 outlier branch feeds this MLP (the fused op has none)"
    weights = [_stored_weight(node.inputs[1]) for node in (gate, up, down)]
    problem = next((w for w in weights if isinstance(w, str)), None)
    if problem is not None:
        return problem
    blocks = {block for _, _, block in weights}
    if len(blocks) != 1:
        return "gate, up and down weights are stored differently"
    gated = gated_product(producer_of(nodes[f"{prefix}/sparse/masked"].inputs[1], "Mul"))
    if gated is None:
        return "the product the selection masks is not act(gate) * up"
    level = nodes[f"{prefix}/sparse/union"].inputs[1]
    if np.size(level.values) != 1:
        return "a per-channel selection level (AWQ/SmoothQuant-scaled input); the fused op takes one level"
    predictor = f"{prefix}/sparse/guess" in nodes
    inputs = [gate.inputs[0], *(values for values, _, _ in weights), level]
    if predictor:
        rank_in, rank_out = nodes[f"{prefix}/sparse/guess_rank"], nodes[f"{prefix}/sparse/guess"]
        inputs += [rank_in.inputs[1], rank_out.inputs[1], nodes[f"{prefix}/sparse/guess_logits"].inputs[1]]
    block = blocks.pop()
    if block:
        if not predictor:  # the optional guesser inputs stay empty
            inputs += [gs.Variable.empty()] * 3
        inputs += [scales for _, scales, _ in weights]
    output = down.outputs[0]
    down.outputs.clear()
    return gs.Node(OP_TYPE, name=f"{prefix}/SparseSkipMLP", domain=DOMAIN, inputs=inputs, outputs=[output],
                   attrs={"method": "predictor" if predictor else "threshold", "block_size": block,
                          "activation": ACTIVATIONS[gated.kind], **PLUGIN_ATTRIBUTES})
