"""Swap each standard ``RotaryEmbedding`` x 2 + ``Attention`` (opset 23) for ONNX Runtime's contrib
``com.microsoft.GroupQueryAttention`` with the rotary inside: an ONNX Runtime (CPU) target pass.

At batch-1 decode on a CPU every node costs its dispatch whatever it computes. The export
spells attention in standard ops (so TensorRT and Polygraphy read it): a Split of the packed q/k/v projection,
two RotaryEmbedding and an Attention per layer. onnxruntime-genai's builder emits one GroupQueryAttention that
reads the packed projection and rotates q and k itself; this pass gives our graphs the same node, so that the
ONNX Runtime folder decodes with as few nodes as genai's. The file then runs only on ONNX Runtime (the TensorRT
bundle refuses it).

What stays exact:

* The mask. GroupQueryAttention knows only causality and each row's length, assuming the valid tokens of a row
  start at slot 0; our runtime left-pads a batch. So every row is given the full length (``seqlens_k`` =
  total - 1) and the export's boolean mask (causal, padding, sliding window) becomes the additive
  ``attention_bias`` (0 where allowed, a large negative number elsewhere, finite so that a padding query with
  nothing to attend to stays finite as it does in the standard op).
* The positions. Without ``position_ids`` the op rotates the token in slot s by the angle of position s. In a
  batch-1 call (and any unpadded batch) that is the token's position id; in a left-padded row every token's
  angle is shifted by the row's padding. Rotary scores depend only on the difference of two positions, so the
  attention is the same up to float rounding (tested), and the shift is the same at prefill and decode.

An Attention is left as it is, with a note, unless: q and k come from RotaryEmbedding nodes on the graph's
``position_ids`` with the same caches, full rotary width and layout, read by nothing else; q, k and v are 3-D
([batch, seq, heads * head_dim]); the KV cache is given and returned; no causal flag, softcap or QK output that
the contrib op spells differently. When q, k and v are the three outputs of one Split of a packed projection,
the op reads the packed tensor (one node fewer).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register

DOMAIN = "com.microsoft"
OP_TYPE = "GroupQueryAttention"
PREFIX = "/model/gqa"


@register("fuse_group_query_attention")
def run(graph: gs.Graph, config: None) -> PassResult:
    notes: list[str] = []
    shared: dict[str, gs.Variable] = {}
    returned = {tensor.name for tensor in graph.outputs}  # tensors the fusion must not swallow
    for node in [node for node in graph.nodes if node.op == "Attention" and node.domain in (None, "", "ai.onnx")]:
        reason = _unsupported(node, returned)
        if reason is not None:
            notes.append(f"{node.name}: left as standard Attention ({reason})")
            continue
        _fuse(graph, node, shared, returned)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _rotary(tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The RotaryEmbedding producing ``tensor`` when nothing but the Attention reads it."""
    producers = tensor.inputs
    if len(producers) == 1 and producers[0].op == "RotaryEmbedding" and len(tensor.outputs) == 1 and \
            tensor.name not in graph_outputs:
        return producers[0]
    return None


def _unsupported(node: gs.Node, graph_outputs: set[str]) -> str | None:
    """Why ``node`` cannot become GroupQueryAttention, or None."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, mask, past_key, past_value = inputs[:6]
    if len(node.inputs) > 6:
        return "it has inputs beyond the KV cache"
    if len(node.outputs) != 3 or not all(tensor is not None and tensor.name for tensor in (past_key, past_value)):
        return "no KV cache in and out"
    if any(int(node.attrs.get(name, 0)) for name in ("is_causal", "qk_matmul_output_mode")) or \
            float(node.attrs.get("softcap", 0.0)):
        return "causal flag, softcap or QK output"
    if "q_num_heads" not in node.attrs or "kv_num_heads" not in node.attrs:
        return "4-D inputs (no head counts)"
    rotaries = (_rotary(q, graph_outputs), _rotary(k, graph_outputs))
    if any(rotary is None for rotary in rotaries):
        return "q or k is not the output of a RotaryEmbedding read only by it"
    caches = {tuple(tensor.name for tensor in rotary.inputs[1:3]) for rotary in rotaries}
    positions = {rotary.inputs[3].name if len(rotary.inputs) > 3 else "" for rotary in rotaries}
    layouts = {(int(rotary.attrs.get("interleaved", 0)), int(rotary.attrs.get("rotary_embedding_dim", 0)))
               for rotary in rotaries}
    if len(caches) != 1 or positions != {"position_ids"} or len(layouts) != 1:
        return "its two RotaryEmbedding differ or do not read the graph's position_ids"
    if next(iter(layouts))[1] != 0:
        return "partial rotary width"
    if mask is not None and mask.name and mask.dtype is not None and np.dtype(mask.dtype) != np.bool_:
        return "a float attention mask"
    if not isinstance(q.inputs[0].inputs[1], gs.Constant):
        return "rotary caches that are not constants"
    return None


def _fuse(graph: gs.Graph, node: gs.Node, shared: dict[str, gs.Variable], returned: set[str]) -> None:
    q_rotary, k_rotary = node.inputs[0].inputs[0], node.inputs[1].inputs[0]
    query, key, value = q_rotary.inputs[0], k_rotary.inputs[0], node.inputs[2]
    packed = _packed_input(query, key, value, q_rotary, k_rotary, node, returned)
    past_key, past_value = node.inputs[4], node.inputs[5]
    seqlens, total = _lengths(graph, shared, packed if packed is not None else query, past_key)
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    float_type = q_rotary.inputs[1].values.dtype  # the cos cache's: the model's float type
    bias = _bias(graph, shared, mask, float_type) if mask is not None else gs.Variable.empty()
    empty = gs.Variable.empty
    inputs = ([packed, empty(), empty()] if packed is not None else [query, key, value]) + [
        past_key, past_value, seqlens, total, q_rotary.inputs[1], q_rotary.inputs[2], empty(), bias]
    attrs = {"num_heads": int(node.attrs["q_num_heads"]), "kv_num_heads": int(node.attrs["kv_num_heads"]),
             "do_rotary": 1, "rotary_interleaved": int(q_rotary.attrs.get("interleaved", 0))}
    if "scale" in node.attrs:
        attrs["scale"] = float(node.attrs["scale"])
    outputs = list(node.outputs)
    node.outputs.clear()
    for rotary in (q_rotary, k_rotary):
        rotary.outputs.clear()
    graph.nodes.append(gs.Node(OP_TYPE, name=node.name.rsplit("/", 1)[0] + "/GroupQueryAttention", domain=DOMAIN,
                               inputs=inputs, outputs=outputs, attrs=attrs))


def _packed_input(query, key, value, q_rotary, k_rotary, node, returned: set[str]) -> gs.Variable | None:
    """The packed projection when q, k and v are the outputs, in order, of one last-axis Split read by nothing
    else; the Split is then left without consumers (cleanup removes it)."""
    if len(query.inputs) != 1:
        return None
    split = query.inputs[0]
    if split.op != "Split" or list(split.outputs) != [query, key, value]:
        return None
    # the Attention's head-count attributes make q/k/v, hence the Split's input, 3-D
    if int(split.attrs.get("axis", 0)) not in (-1, 2):
        return None
    readers = [(query, q_rotary), (key, k_rotary), (value, node)]
    if any(len(tensor.outputs) != 1 or tensor.outputs[0] is not reader or tensor.name in returned
           for tensor, reader in readers):
        return None
    split.outputs.clear()
    return split.inputs[0]


def _lengths(graph: gs.Graph, shared: dict, query, past_key) -> tuple[gs.Variable, gs.Variable]:
    """``seqlens_k`` (every row: total - 1, int32 [batch]) and ``total_sequence_length`` (int32 scalar), made
    once from the first layer's query and cache shapes."""
    if "seqlens" not in shared:
        zero, one, two, three = (_constant(name, [value]) for value, name in enumerate(("zero", "one", "two", "three")))
        query_shape = _node(graph, "Shape", [query], f"{PREFIX}/Shape_query", np.int64)
        past_shape = _node(graph, "Shape", [past_key], f"{PREFIX}/Shape_past", np.int64)
        batch = _node(graph, "Slice", [query_shape, zero, one], f"{PREFIX}/Slice_batch", np.int64)
        seq = _node(graph, "Slice", [query_shape, one, two], f"{PREFIX}/Slice_seq", np.int64)
        past = _node(graph, "Slice", [past_shape, two, three], f"{PREFIX}/Slice_past", np.int64)
        total = _node(graph, "Add", [past, seq], f"{PREFIX}/Add_total", np.int64)  # [1]
        last = _node(graph, "Sub", [total, one], f"{PREFIX}/Sub_last", np.int64)
        rows = _node(graph, "Expand", [last, batch], f"{PREFIX}/Expand_rows", np.int64)
        shared["seqlens"] = _node(graph, "Cast", [rows], f"{PREFIX}/seqlens_k", np.int32, to=6)
        scalar = _node(graph, "Squeeze", [total, zero], f"{PREFIX}/Squeeze_total", np.int64)
        shared["total"] = _node(graph, "Cast", [scalar], f"{PREFIX}/total_sequence_length", np.int32, to=6)
    return shared["seqlens"], shared["total"]


def _bias(graph: gs.Graph, shared: dict, mask, dtype) -> gs.Variable:
    """The boolean mask as an additive bias of the attention's float type, made once per mask."""
    key = f"bias:{mask.name}"
    if key not in shared:
        suffix = "" if not any(name.startswith("bias:") for name in shared) else f"_{len(shared)}"  # unique names
        dtype = np.dtype(dtype)
        blocked = np.array(np.finfo(dtype).min / 2, dtype=dtype)  # finite: a row with nothing allowed stays finite
        shared[key] = _node(graph, "Where", [mask, gs.Constant(f"{PREFIX}/allowed{suffix}", np.array(0, dtype=dtype)),
                                             gs.Constant(f"{PREFIX}/blocked{suffix}", blocked)],
                            f"{PREFIX}/attention_bias{suffix}", dtype)
    return shared[key]


def _constant(name: str, values) -> gs.Constant:
    return gs.Constant(f"{PREFIX}/{name}", np.asarray(values, dtype=np.int64))


def _node(graph: gs.Graph, op: str, inputs: list, name: str, dtype, **attrs) -> gs.Variable:
    output = gs.Variable(f"{name}/output_0", dtype=np.dtype(dtype))
    graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[output], attrs=attrs))
    return output
