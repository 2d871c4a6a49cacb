"""Tiny graph builders and ONNX Runtime runners: a one-MatMul graph and its plans, a two-node MLP, and the
feeds, logits and emulated-weight substitutes that whole-model quantization tests compare builds against."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from accullm_export.graph.ir import constant
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.runtime.session import create_session


# ------------------------------------------------------------------------------------------- one layer
def one_layer_graph(weight: np.ndarray) -> gs.Graph:
    x = gs.Variable("x", np.float32, [2, "S", weight.shape[0]])
    y = gs.Variable("y", np.float32, [2, "S", weight.shape[1]])
    node = gs.Node("MatMul", name="/layer/MatMul", inputs=[x, constant("W", weight)], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=23)


def run_graph(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return create_session(model.SerializeToString(), device="cpu", optimization="basic").run(None, {"x": x})[0]


def plan_for(weight, precision, *, outliers=(), block=None, activations=None, scale=None, group=None) -> LayerPlan:
    return LayerPlan(node="/layer/MatMul", input="x", weight="W", in_features=weight.shape[0],
                     out_features=weight.shape[1], precision=precision, block_size=block, outliers=tuple(outliers),
                     activations=activations, activation_scale=scale, activation_group=group)


def make_mlp(path, input_name="x", scale=1.0):
    """A MatMul + Tanh model [N, 8] -> [N, 4] with a fixed-seed weight, saved at ``path``."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((8, 4)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["h"], name="/mm/MatMul"),
         helper.make_node("Tanh", ["h"], ["y"], name="/act/Tanh")], "mlp",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------------------ whole model
def read_initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def token_ids(seq=12, seed=0):
    return np.random.default_rng(seed).integers(3, 250, size=(1, seq))


def llm_feed(folder, seq=12, seed=0):
    from accullm_export.calibration.feeds import llm_feeds

    ids = np.random.default_rng(seed).integers(3, 250, size=(1, seq))
    return llm_feeds(ids, folder / "model.onnx")[0]


def ort_logits(path, feed):
    return create_session(path, device="cpu", optimization="basic").run(["logits"], feed)[0]


def ort_logits_for_ids(folder, ids):
    from accullm_export.calibration.feeds import llm_feeds

    return ort_logits(folder / "model.onnx", llm_feeds(ids, folder / "model.onnx")[0])


def builds_equal_emulation(folder, manifest, tmp_path, emulate, builds=("q", "u")) -> tuple[dict, np.ndarray]:
    """Assert that each build folder under ``tmp_path`` gives the logits of the fp32 model with ``emulate``'s
    weights (within 1e-5, ONNX Runtime basic) and that the first passes onnx.checker; returns (feed, logits)."""
    feed = llm_feed(folder)
    expected = ort_logits(substituted_model(folder, manifest, tmp_path, emulate), feed)
    for build in builds:
        np.testing.assert_allclose(ort_logits(tmp_path / build / "model.onnx", feed), expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(onnx.load(str(tmp_path / builds[0] / "model.onnx")), full_check=True)
    return feed, expected


def fused_at_level_1(path, tmp_path) -> tuple[ort.InferenceSession, list[onnx.NodeProto]]:
    """An ORT_ENABLE_ALL session with MatMulNBits at accuracy level 1 (float inputs, so it computes what the
    unfused graph does) and the nodes of its optimized graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, list(onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)


def substituted_model(source, quantized_manifest, tmp_path, emulate):
    """The fp32 model with every planned weight replaced by its NumPy emulation (a weight-only check)."""
    model = onnx.load(str(source / "model.onnx"))
    by_name = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # untie: the embedding lookup keeps the original table
        if node.op_type == "Gather" and node.input[0] in by_name and node.input[1] == "input_ids":
            table = onnx.TensorProto()
            table.CopyFrom(by_name[node.input[0]])
            table.name = "untied_embedding_table"
            model.graph.initializer.append(table)
            node.input[0] = table.name
    for layer in quantized_manifest["layers"]:
        tensor = by_name[layer["weight"]]
        plan = LayerPlan(**{k: (tuple(v) if k == "outliers" else v) for k, v in layer.items()
                            if k in LayerPlan.__dataclass_fields__})
        tensor.CopyFrom(numpy_helper.from_array(emulate(numpy_helper.to_array(tensor), plan), tensor.name))
    path = tmp_path / "emulated.onnx"
    onnx.save(model, str(path))
    return path
