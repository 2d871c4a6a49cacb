"""``lower_zero_points``: asymmetric INT4 layers as signed INT4 plus a block offset term, the form TensorRT builds,
checked against an independent NumPy emulation of (q - z) s, and against what the TensorRT passes after it need."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.pass_data import PassData
from accullm_export.graph.pipeline import run_passes
from accullm_export.targets.tensorrt_support import check_model
from tests.helpers.graphs import one_layer_graph, plan_for, run_graph

RNG = np.random.default_rng(5)


def _stored(graph: gs.Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint4 values, zero points, float32 scales) of the asymmetric layer, read before the lowering."""
    tensors = graph.tensors()
    values = np.asarray(constant_array(tensors["/layer/MatMul/weight_quantized"]), dtype=np.int32)
    zero = np.asarray(constant_array(tensors["/layer/MatMul/weight_zero_point"]), dtype=np.int32)
    scales = np.asarray(tensors["/layer/MatMul/weight_scale"].values, dtype=np.float32)
    return values, zero, scales


def _emulated(x, values, zero, scales, block, branch_rows=None, channels=()):
    """x ((q - z) s) + x[channels] rows, written out block by block."""
    weight = np.zeros(values.shape, dtype=np.float64)
    for row in range(values.shape[0]):
        weight[row] = (values[row] - zero[row // block]) * scales[row // block].astype(np.float64)
    out = x.astype(np.float64) @ weight
    if branch_rows is not None:
        out += x[..., list(channels)].astype(np.float64) @ branch_rows.astype(np.float64)
    return out


@pytest.mark.parametrize("rows, block, outliers", [(64, 16, (3, 17)), (40, 16, ()), (40, 16, (38,))])
def test_lowered_layer_equals_the_emulation(rows, block, outliers):
    """40 rows: a short last block (padded); outlier rows: left out of the block sums and stored as 0."""
    weight = (RNG.standard_normal((rows, 24)) * 0.1 + 0.03).astype(np.float32)
    weight[:, 5] = np.abs(weight[:, 5])  # a column with no negative weight: zero point 0
    x = RNG.standard_normal((2, 7, rows)).astype(np.float32)
    x[..., list(outliers)] *= 3000.0  # the large activations an FP16 branch takes
    plan = plan_for(weight, "int4", block=block, outliers=outliers)
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), asymmetric=True)
    graph, _, _ = run_passes(one_layer_graph(weight), ["isolate_outliers", "quantize_weights"], data)
    values, zero, scales = _stored(graph)
    before = run_graph(graph.copy(), x)
    branch = graph.tensors().get("/layer/MatMul/outlier_weight")
    rows_fp16 = None if branch is None else np.asarray(branch.values, dtype=np.float32)
    graph, reports, _ = run_passes(graph, ["lower_zero_points"])
    after = run_graph(graph, x)
    expected = _emulated(x, values, zero, scales, block, rows_fp16, outliers)
    size = np.abs(expected).max()
    np.testing.assert_allclose(before, expected, atol=2e-5 * size)
    # the offsets are stored in FP16: each moves by at most 2^-11 of itself, times its block's sum of x
    kept = x * np.isin(np.arange(rows), outliers, invert=True)
    padded = np.concatenate([kept, np.zeros(x.shape[:-1] + (-rows % block,))], axis=-1)
    block_sums = padded.reshape(x.shape[:-1] + (-1, block)).sum(axis=-1)
    bound = np.abs(block_sums) @ np.abs(scales * (8 - zero)) * 2.0 ** -11
    assert (np.abs(after - expected) <= bound + 2e-5 * size).all()
    dequantizers = [node for node in graph.nodes if node.op == "DequantizeLinear"]
    assert len(dequantizers) == 1 and len(dequantizers[0].inputs) == 2  # no zero point left
    signed = np.asarray(constant_array(dequantizers[0].inputs[0]), dtype=np.int32)
    assert dequantizers[0].inputs[0].dtype == ml_dtypes.int4 and signed.min() >= -8 and signed.max() <= 7
    assert not signed[list(outliers)].any()
    assert any("1 asymmetric INT4 layers" in note for note in reports[0].notes)


def test_offset_follows_the_outlier_branch_and_the_plugin_swap_still_fuses():
    weight = (RNG.standard_normal((64, 16)) * 0.1).astype(np.float32)
    plan = plan_for(weight, "int4", block=32, outliers=(7,))
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), asymmetric=True)
    graph, _, _ = run_passes(one_layer_graph(weight), ["isolate_outliers", "quantize_weights",
                                                       "lower_zero_points"], data)
    add = next(node for node in graph.nodes if node.name == "/layer/MatMul/outliers/Add")
    offset = add.outputs[0].outputs[0]
    assert offset.op == "Add" and offset.outputs[0] is graph.outputs[0]
    graph, reports, _ = run_passes(graph, [("fold_scale_casts", None), ("fuse_outlier_split_gemm", None)])
    assert [node.op for node in graph.nodes].count("OutlierSplitGemm") == 1, reports[-1].notes


def test_layers_reading_one_input_share_its_block_sums_and_tensorrt_parses_the_result():
    """Two layers on x with the same unused rows: one ReduceSum; the graph passes the TensorRT 10.3 check."""
    first = (RNG.standard_normal((64, 16)) * 0.1).astype(np.float32)
    second = (RNG.standard_normal((64, 8)) * 0.1).astype(np.float32)
    x = gs.Variable("x", np.float32, [1, "S", 64])
    outputs = [gs.Variable(name, np.float32, [1, "S", w.shape[1]]) for name, w in (("y", first), ("z", second))]
    nodes = [gs.Node("MatMul", name=f"/{name}/MatMul", inputs=[x, constant(f"W{name}", w)], outputs=[out])
             for (name, w), out in zip((("a", first), ("b", second)), outputs)]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=21)
    plans = {f"/{name}/MatMul": plan_for(w, "int4", block=32, outliers=(2,)) for name, w in (("a", first),
                                                                                             ("b", second))}
    plans = {node: type(plan)(**(plan.to_dict() | {"node": node, "weight": f"W{node[1]}", "outliers": (2,)}))
             for node, plan in plans.items()}
    data = PassData(plans=plans, float_dtype=np.dtype(np.float32), asymmetric=True)
    graph, _, _ = run_passes(graph, ["isolate_outliers", "quantize_weights", "lower_zero_points",
                                     ("fold_scale_casts", None)], data)
    assert [node.op for node in graph.nodes].count("ReduceSum") == 1
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    assert check_model(model, "10.3") == []


def test_graphs_without_zero_points_are_left_alone():
    weight = (RNG.standard_normal((32, 8)) * 0.1).astype(np.float32)
    plan = plan_for(weight, "int4", block=16)
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32))
    graph, _, _ = run_passes(one_layer_graph(weight), ["isolate_outliers", "quantize_weights"], data)
    ops = [node.op for node in graph.nodes]
    graph, reports, _ = run_passes(graph, ["lower_zero_points"])
    assert [node.op for node in graph.nodes] == ops and not reports[0].notes
