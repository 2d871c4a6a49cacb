"""The token-embedding table: INT8 per token (one scale per vocabulary entry) or FP16.

A Gather on ``input_ids`` whose table is a float constant is an embedding lookup. The table is stored as int8
with one scale per token row; the lookup gathers the int8 rows and their scales and multiplies (Cast, Mul),
so only the looked-up rows are ever widened. Tied embeddings (a Gather on the lm_head's [hidden, vocab]
weight, axis 1) get their own int8 copy, since the lm_head's copy is int4 or blocked. Other Gathers
(rotary caches, channel selections) are not embeddings and are left alone.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import onnx_type

TOKEN_INPUT = "input_ids"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """How the token-embedding table is stored: int8, fp16 or fp32 (left as it is)."""

    embeddings: str = "fp32"


@register("quantize_embeddings", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    if config.embeddings == "fp32":
        return PassResult(graph, tuple(notes))
    for node in list(graph.nodes):
        if not _is_embedding(node):
            continue
        table = node.inputs[0].values
        float_dtype = table.dtype
        axis = int(node.attrs.get("axis", 0)) % table.ndim
        if config.embeddings == "fp16":
            node.inputs[0] = constant(f"{node.name}/table_float16", table.astype(np.float16))
            _widen(graph, node, float_dtype, scale=None)
            continue
        other = 1 - axis
        scales = np.abs(table.astype(np.float32)).max(axis=other) / 127.0
        scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
        shape = [-1, 1] if axis == 0 else [-1]  # gathered scales broadcast over the hidden axis
        values = np.clip(np.round(table / np.expand_dims(scales, other)), -127, 127).astype(np.int8)
        node.inputs[0] = constant(f"{node.name}/table_int8", values)
        _widen(graph, node, float_dtype, scale=constant(f"{node.name}/table_scale",
                                                         scales.astype(float_dtype).reshape(shape)))
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _is_embedding(node: gs.Node) -> bool:
    if node.op != "Gather" or len(node.inputs) != 2:
        return False
    table, indices = node.inputs
    return (isinstance(table, gs.Constant) and table.values.dtype.kind == "f" and table.values.ndim == 2
            and indices.name == TOKEN_INPUT)


def _widen(graph: gs.Graph, node: gs.Node, float_dtype: np.dtype, scale: gs.Constant | None) -> None:
    output = node.outputs[0]
    gathered = gs.Variable(f"{node.name}/gathered", dtype=np.int8 if scale is not None else np.float16)
    node.outputs[0] = gathered
    cast_out = gs.Variable(f"{node.name}/widened", dtype=float_dtype) if scale is not None else output
    graph.nodes.append(gs.Node("Cast", name=f"{node.name}/Cast", attrs={"to": onnx_type(float_dtype)},
                               inputs=[gathered], outputs=[cast_out]))
    if scale is None:
        return
    token_scale = gs.Variable(f"{node.name}/token_scale", dtype=float_dtype)
    graph.nodes.append(gs.Node("Gather", name=f"{node.name}/scale/Gather", attrs={"axis": 0},
                               inputs=[scale, node.inputs[1]], outputs=[token_scale]))
    graph.nodes.append(gs.Node("Mul", name=f"{node.name}/Mul", inputs=[cast_out, token_scale], outputs=[output]))
