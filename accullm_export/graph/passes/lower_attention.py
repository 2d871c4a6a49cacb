"""Lower opset 23's ``RotaryEmbedding`` and ``Attention`` into MatMul/Softmax/Where/Gather, opset 21.

TensorRT's ONNX parser learned these two ops late; the TensorRT on most Jetson devices in the field parses
neither. This pass rewrites them into ops every TensorRT 10 parses: scaled queries (the scale before the first
matmul, as TensorRT's attention fusion asks), scores, soft-cap, mask, softmax, values. Grouped-query attention
computes each KV head's queries as one [batch, kv_heads, group, seq, dim] block, so the KV cache is never
repeated. The model's inputs, outputs and
KV-cache tensors keep their names and shapes.

Forms it does not lower (interleaved or partial rotary, causal attention, a mask of unknown type) are left as
they are with a note; ``check-trt`` then names them. When nothing newer than opset 21 remains, the model's
default opset drops to 21.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register

LOWERED_OPSET = 21
# ops of the default domain that opset 21 lacks: while one remains, the opset stays
NEWER_OPS = {"Attention", "RotaryEmbedding", "RMSNormalization", "TensorScatter", "Swish"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Which of the two ops to lower (a parser may take one and not the other); None runs with both."""

    ops: tuple[str, ...] = ("RotaryEmbedding", "Attention")


@register("lower_attention", Config)
def run(graph: gs.Graph, config: Config | None) -> PassResult:
    config = config or Config()
    notes: list[str] = []
    writer = _Writer(graph)
    standard = [node for node in graph.nodes if node.domain in (None, "", "ai.onnx")]
    lowered = 0
    lowerings = {"RotaryEmbedding": (_rotary_unsupported, _lower_rotary),
                 "Attention": (_attention_unsupported, _lower_attention)}
    for op, (unsupported, lower) in lowerings.items():
        for node in [n for n in standard if n.op == op and op in config.ops]:
            reason = unsupported(node)
            if reason:
                notes.append(f"{node.name}: {op} left as it is ({reason})")
                continue
            lower(writer, node)
            lowered += 1
    graph.cleanup().toposort()
    remaining = sorted({n.op for n in graph.nodes if n.domain in (None, "", "ai.onnx") and n.op in NEWER_OPS})
    if lowered and not remaining and (graph.opset or 0) > LOWERED_OPSET:
        graph.opset = LOWERED_OPSET
    elif remaining and lowered:
        notes.append(f"the opset stays at {graph.opset}: {', '.join(remaining)} remain")
    return PassResult(graph, tuple(notes))


class _Writer:
    """Adds nodes and constants with names derived from the node being lowered."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.count = 0

    def constant(self, prefix: str, value, dtype=np.int64) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"{prefix}/const_{self.count}", np.asarray(value, dtype=dtype))

    def node(self, prefix: str, op: str, inputs: list, outputs: list | None = None, dtype=None,
             **attrs) -> gs.Variable:
        self.count += 1
        name = f"{prefix}/{op}_{self.count}"
        if outputs is None:
            outputs = [gs.Variable(f"{name}/output_0", dtype=dtype)]
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=outputs))
        return outputs[0]


def _float_dtype(tensor: gs.Tensor):
    return tensor.dtype if tensor.dtype is not None else np.float32


def _static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = tensor.shape
    if shape is None or len(shape) <= abs(axis) - (axis < 0) or not isinstance(shape[axis], (int, np.integer)):
        return None
    return int(shape[axis])


# --------------------------------------------------------------------------------------------- RotaryEmbedding
def _rotary_unsupported(node: gs.Node) -> str | None:
    if int(node.attrs.get("interleaved", 0)):
        return "interleaved rotation"
    if int(node.attrs.get("rotary_embedding_dim", 0)):
        return "a partial rotary dimension"
    if len(node.inputs) < 4 or node.inputs[3] is None or not node.inputs[3].name:
        return "no position_ids input"
    if _rank(node.inputs[0], "num_heads" in node.attrs) not in (3, 4):
        return "an input that is neither [batch, seq, heads * dim] nor [batch, heads, seq, dim]"
    if _rank(node.inputs[0], "num_heads" in node.attrs) == 3 and not int(node.attrs.get("num_heads", 0)):
        return "a 3-D input without num_heads"
    if _half_dim(node) is None:
        return "the cos cache's width is unknown"
    return None


def _rank(tensor: gs.Tensor, has_head_counts: bool) -> int | None:
    """The tensor's rank; where shapes were not stored, the op's head-count attributes mean 3-D input (the
    ONNX specification requires them for 3-D input only), their absence 4-D."""
    if tensor.shape is not None:
        return len(tensor.shape)
    return 3 if has_head_counts else 4


_BOOL_PRODUCERS = {"And", "Or", "Not", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                   "IsNaN", "IsInf"}


def _is_bool(tensor: gs.Tensor) -> bool | None:
    """Whether the tensor is boolean, from its dtype or, where that was not stored, its producer (None: unknown)."""
    if tensor.dtype is not None:
        return np.dtype(tensor.dtype) == np.bool_
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return None
    if producer.op in _BOOL_PRODUCERS:
        return True
    if producer.op == "Cast":
        return int(producer.attrs["to"]) == TensorProto.BOOL
    if producer.op in ("Unsqueeze", "Reshape", "Expand", "Squeeze", "Identity", "Transpose"):
        return _is_bool(producer.inputs[0])
    return None


def _half_dim(node: gs.Node) -> int | None:
    cos = node.inputs[1]
    if isinstance(cos, gs.Constant):
        return int(cos.values.shape[-1])
    return _static_dim(cos, -1)


def _lower_rotary(w: _Writer, node: gs.Node) -> None:
    """x1, x2 the halves of each head: [x1 cos - x2 sin, x2 cos + x1 sin] (the op's non-interleaved form)."""
    p = node.name or "RotaryEmbedding"
    x, cos_cache, sin_cache, positions = node.inputs[:4]
    out = node.outputs[0]
    dtype = _float_dtype(cos_cache)
    half = _half_dim(node)
    three_d = _rank(x, "num_heads" in node.attrs) == 3
    if three_d:  # [B, S, H*D] -> [B, S, H, D]
        heads = int(node.attrs["num_heads"])
        x = w.node(p, "Reshape", [x, w.constant(p, [0, 0, heads, 2 * half])], dtype=dtype)
        axis = 2  # cos [B, S, D/2] -> [B, S, 1, D/2]
    else:  # [B, H, S, D]
        axis = 1  # cos [B, S, D/2] -> [B, 1, S, D/2]
    cos = w.node(p, "Gather", [cos_cache, positions], dtype=dtype, axis=0)
    sin = w.node(p, "Gather", [sin_cache, positions], dtype=dtype, axis=0)
    cos = w.node(p, "Unsqueeze", [cos, w.constant(p, [axis])], dtype=dtype)
    sin = w.node(p, "Unsqueeze", [sin, w.constant(p, [axis])], dtype=dtype)
    x1 = w.node(p, "Slice", [x, w.constant(p, [0]), w.constant(p, [half]), w.constant(p, [-1])], dtype=dtype)
    x2 = w.node(p, "Slice", [x, w.constant(p, [half]), w.constant(p, [2 * half]), w.constant(p, [-1])],
                dtype=dtype)
    real = w.node(p, "Sub", [w.node(p, "Mul", [x1, cos], dtype=dtype), w.node(p, "Mul", [x2, sin], dtype=dtype)],
                  dtype=dtype)
    imag = w.node(p, "Add", [w.node(p, "Mul", [x2, cos], dtype=dtype), w.node(p, "Mul", [x1, sin], dtype=dtype)],
                  dtype=dtype)
    node.outputs.clear()
    node.inputs.clear()
    if three_d:
        rotated = w.node(p, "Concat", [real, imag], dtype=dtype, axis=-1)
        w.node(p, "Reshape", [rotated, w.constant(p, [0, 0, -1])], outputs=[out])
    else:
        w.node(p, "Concat", [real, imag], outputs=[out], axis=-1)


# ---------------------------------------------------------------------------------------------------- Attention
def _attention_unsupported(node: gs.Node) -> str | None:
    if int(node.attrs.get("is_causal", 0)):
        return "is_causal (the kit's exports pass the causal mask as an input)"
    if int(node.attrs.get("qk_matmul_output_mode", 0)) or len([o for o in node.outputs if o.name]) > 3:
        return "its QK output is read"
    if not node.attrs.get("q_num_heads") or not node.attrs.get("kv_num_heads"):
        return "4-D queries (no head counts)"
    if _rank(node.inputs[0], True) != 3:
        return "queries that are not [batch, seq, heads * dim]"
    if int(node.attrs["q_num_heads"]) % int(node.attrs["kv_num_heads"]):
        return "query heads that are no multiple of the KV heads"
    if len(node.inputs) < 6 or not all(t is not None and t.name for t in node.inputs[4:6]):
        return "no KV cache inputs"
    if _static_dim(node.inputs[4], 3) is None:
        return "the KV cache's head size is unknown"
    if len(node.outputs) < 3:
        return "no KV cache outputs"
    if node.inputs[4].dtype is None:
        return "the KV cache's type is unknown"
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.name and _is_bool(mask) is None:
        return "the mask's type is unknown"
    return None


def _lower_attention(w: _Writer, node: gs.Node) -> None:
    """Scaled dot-product attention, grouped by KV head, with the cache concatenated in front."""
    p = node.name or "Attention"
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name else None
    past_key, past_value = node.inputs[4], node.inputs[5]
    output, present_key, present_value = node.outputs[:3]
    dtype = past_key.dtype
    heads, kv_heads = int(node.attrs["q_num_heads"]), int(node.attrs["kv_num_heads"])
    group = heads // kv_heads
    dim = _static_dim(past_key, 3)
    value_dim = _static_dim(past_value, 3) or dim
    scale = float(node.attrs.get("scale", 1.0 / np.sqrt(dim)))
    wide = node.attrs.get("softmax_precision") == TensorProto.FLOAT and np.dtype(dtype) != np.float32

    def heads_first(tensor, count, size):  # [B, S, count * size] -> [B, count, S, size]
        split = w.node(p, "Reshape", [tensor, w.constant(p, [0, 0, count, size])], dtype=dtype)
        return w.node(p, "Transpose", [split], dtype=dtype, perm=[0, 2, 1, 3])

    queries = w.node(p, "Reshape", [q, w.constant(p, [0, 0, kv_heads, group, dim])], dtype=dtype)
    queries = w.node(p, "Transpose", [queries], dtype=dtype, perm=[0, 2, 3, 1, 4])  # [B, KV, G, S, D]
    # the scale on the queries, before the first matmul: the form TensorRT's attention fusion documents
    queries = w.node(p, "Mul", [queries, w.constant(p, scale, dtype=dtype)], dtype=dtype)
    node.outputs.clear()
    w.node(p, "Concat", [past_key, heads_first(k, kv_heads, dim)], outputs=[present_key], axis=2)
    w.node(p, "Concat", [past_value, heads_first(v, kv_heads, value_dim)], outputs=[present_value], axis=2)
    keys = w.node(p, "Unsqueeze", [present_key, w.constant(p, [2])], dtype=dtype)  # [B, KV, 1, T, D]
    keys = w.node(p, "Transpose", [keys], dtype=dtype, perm=[0, 1, 2, 4, 3])
    scores = w.node(p, "MatMul", [queries, keys], dtype=dtype)  # [B, KV, G, S, T]
    if wide:
        scores = w.node(p, "Cast", [scores], dtype=np.float32, to=TensorProto.FLOAT)
    score_dtype = np.float32 if wide else dtype
    softcap = float(node.attrs.get("softcap", 0.0))
    if softcap > 0:  # softcap * tanh(scores / softcap), after the scale and before the mask (the op's order)
        scores = w.node(p, "Div", [scores, w.constant(p, softcap, dtype=score_dtype)], dtype=score_dtype)
        scores = w.node(p, "Tanh", [scores], dtype=score_dtype)
        scores = w.node(p, "Mul", [scores, w.constant(p, softcap, dtype=score_dtype)], dtype=score_dtype)
    if mask is not None:  # masks broadcast against [B, H, S, T]: the groups merged back into the heads meanwhile
        total = w.node(p, "Shape", [present_key], dtype=np.int64, start=2, end=3)
        heads_shape = w.node(p, "Concat", [w.constant(p, [0, heads, -1]), total], dtype=np.int64, axis=0)
        scores = w.node(p, "Reshape", [scores, heads_shape], dtype=score_dtype)  # [B, H, S, T]
        if _is_bool(mask):
            lowest = w.constant(p, np.finfo(score_dtype).min, dtype=score_dtype)
            scores = w.node(p, "Where", [mask, scores, lowest], dtype=score_dtype)
        else:
            if mask.dtype is not None and np.dtype(mask.dtype) != np.dtype(score_dtype):
                mask = w.node(p, "Cast", [mask], dtype=score_dtype,
                              to=TensorProto.FLOAT if score_dtype == np.float32 else TensorProto.FLOAT16)
            scores = w.node(p, "Add", [scores, mask], dtype=score_dtype)
        groups_shape = w.node(p, "Concat", [w.constant(p, [0, kv_heads, group, -1]), total], dtype=np.int64,
                              axis=0)
        scores = w.node(p, "Reshape", [scores, groups_shape], dtype=score_dtype)  # [B, KV, G, S, T]
    probs = w.node(p, "Softmax", [scores], dtype=score_dtype, axis=-1)
    if wide:
        probs = w.node(p, "Cast", [probs], dtype=dtype, to=TensorProto.FLOAT16)
    values = w.node(p, "Unsqueeze", [present_value, w.constant(p, [2])], dtype=dtype)  # [B, KV, 1, T, Dv]
    context = w.node(p, "MatMul", [probs, values], dtype=dtype)  # [B, KV, G, S, Dv]
    context = w.node(p, "Transpose", [context], dtype=dtype, perm=[0, 3, 1, 2, 4])  # [B, S, KV, G, Dv]
    node.inputs.clear()
    w.node(p, "Reshape", [context, w.constant(p, [0, 0, heads * value_dim])], outputs=[output])
