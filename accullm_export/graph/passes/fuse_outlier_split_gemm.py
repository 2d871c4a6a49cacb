"""TensorRT targets only: swap each low-bit layer with an FP16 outlier branch for one ``accullm::OutlierSplitGemm``.

Matches what ``isolate_outliers`` + ``quantize_weights`` write (before ``merge_parallel_linears``, which
TensorRT targets skip):

    y = MatMul(x, DequantizeLinear(W_int)) + MatMul(Gather(x, channels), [Cast](W_outlier_fp16))

and replaces it with ``OutlierSplitGemm(x, W_int, scales, channels (int32), W_outlier_fp16)``, attributes
``bits`` and ``block_size`` (0: INT8 per output channel); the plugin takes FP16 scales. The op is defined in
``plugins/outlier_split_gemm/reference.py``. Layers with quantized activations (w8a8's Q/DQ on x) or any other
form stay standard, with a note.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import PLUGIN_ATTRIBUTES, PLUGIN_DOMAIN, register
from accullm_export.graph.rewrite import producer_of, stored_scales

OP_TYPE, DOMAIN, VERSION = "OutlierSplitGemm", PLUGIN_DOMAIN, 1


@register("fuse_outlier_split_gemm")
def run(graph: gs.Graph, config: None) -> PassResult:
    notes: list[str] = []
    for add in [node for node in graph.nodes if node.op == "Add" and node.name.endswith("/outliers/Add")]:
        fused = _fused(add)
        if isinstance(fused, str):
            notes.append(f"{add.name}: {fused}; left as standard ONNX")
            continue
        graph.nodes.append(fused)
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _fused(add: gs.Node) -> gs.Node | str:
    main, branch = producer_of(add.inputs[0], "MatMul"), producer_of(add.inputs[1], "MatMul")
    if main is None or branch is None:
        return "not a MatMul plus outlier-branch MatMul"
    dequantize = producer_of(main.inputs[1], "DequantizeLinear")
    gather = producer_of(branch.inputs[0], "Gather")
    if dequantize is None or gather is None or gather.inputs[0] is not main.inputs[0]:
        return "the low-bit part is not a weight DequantizeLinear on the branch's input"
    values, scales = dequantize.inputs[0], stored_scales(dequantize)
    kind = np.dtype(values.dtype).name
    if kind not in ("int4", "int8") or not isinstance(values, gs.Constant):
        return f"weights stored as {kind}, not int4/int8 constants"
    rows = branch.inputs[1]
    cast = producer_of(rows, "Cast")
    rows = cast.inputs[0] if cast is not None else rows
    if not isinstance(rows, gs.Constant) or rows.values.dtype != np.float16:
        return "outlier rows are not an FP16 constant"
    channels = gs.Constant(f"{main.name}/outlier_channels_int32",
                           np.asarray(gather.inputs[1].values, dtype=np.int32))
    if scales is None:
        return "scales are not a constant"
    scales = gs.Constant(f"{main.name}/weight_scale_fp16", np.asarray(scales.values, dtype=np.float16))
    output = add.outputs[0]
    add.outputs.clear()
    return gs.Node(OP_TYPE, name=f"{main.name}/OutlierSplitGemm", domain=DOMAIN,
                   inputs=[main.inputs[0], values, scales, channels, rows], outputs=[output],
                   attrs={"bits": 4 if kind == "int4" else 8,
                          "block_size": int(dequantize.attrs.get("block_size", 0)), **PLUGIN_ATTRIBUTES})
