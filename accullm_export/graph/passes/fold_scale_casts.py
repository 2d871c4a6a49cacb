"""Fold the Casts that widen stored FP16 block scales into plain constants of the model's float type.

``quantize`` stores blocked INT4 scales in half precision behind a Cast (see
``accullm_export.graph.rewrite.replace_weight_dequantized``). ONNX Runtime folds that Cast when it loads the
model; TensorRT's Dequantize layer wants its scale as a build-time constant, so the TensorRT bundle runs this
pass first. The values are exactly the widened FP16 values, so the numerics do not change; only the file grows
by the scales' extra bytes. Block scales stored as 8-bit codes (``weights.scale_bits = 8``) are decoded into
constants the same way.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import decoded_scale, scale_code, widening_cast


@register("fold_scale_casts")
def run(graph: gs.Graph, config: None) -> gs.Graph:
    widened: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or len(node.inputs) < 2:
            continue
        coded = scale_code(node.inputs[1])
        if coded is not None:  # 8-bit block scales (quant.scale_codes): their decoded values
            node.inputs[1] = gs.Constant(f"{coded[0].name}_decoded", decoded_scale(coded))
            continue
        cast = widening_cast(node.inputs[1])
        if cast is None:
            continue
        if cast.name not in widened:  # one constant per Cast, however many Dequantize nodes read it
            dtype = helper.tensor_dtype_to_np_dtype(int(cast.attrs["to"]))
            stored = cast.inputs[0]
            # a new name: the stored constant lives on in the graph until the cleanup below
            widened[cast.name] = gs.Constant(f"{stored.name}_folded", np.asarray(stored.values).astype(dtype))
        node.inputs[1] = widened[cast.name]
    return graph.cleanup().toposort()
