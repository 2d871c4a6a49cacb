"""quantize: every pass equals an independent NumPy emulation; packing, overrides, refusals, CLI."""

from __future__ import annotations

import json
import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from accullm_export.build.quantize import QuantizeOptions, quantize_model
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.graph.ir import constant
from accullm_export.graph.pipeline import run_passes
from accullm_export.graph.pass_data import PassData
from accullm_export.graph.layer_plan import LayerPlan, override_matches
from accullm_export.recipes.config import Recipe
from tests.helpers.recipes import make_recipe, write_config
from accullm_export.runtime.session import create_session
from tests.helpers.emulation import emulate_weight, np_round_symmetric
from tests.helpers.graphs import (llm_feed, one_layer_graph, ort_logits, plan_for, read_initializers, run_graph,
                                  substituted_model)
from tests.helpers.models import PLANTED, TEXT, make_tiny_checkpoint

RNG = np.random.default_rng(7)


# ------------------------------------------------------------------------------------------- emulation
def np_layer(x: np.ndarray, weight: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """The rewritten layer in NumPy: FP16 outlier rows on the raw input, the rest low-bit."""
    outliers = list(plan.outliers)
    rest = weight.copy()
    rest[outliers] = 0
    low = np_round_symmetric(rest, plan.bits, plan.block_size) if plan.quantized else rest.astype(np.float16)
    x_low = x
    if plan.activations == "static":
        scale = np.float32(plan.activation_scale)
        x_low = np.clip(np.rint(x / scale), -128, 127) * scale  # QuantizeLinear saturates to the int8 range
    elif plan.activations == "dynamic":
        group = plan.activation_group
        inlier = np.abs(x)
        inlier[..., outliers] = 0
        x_low = np.empty_like(x)
        for start in range(0, x.shape[-1], group):
            part = slice(start, start + group)
            scale = np.maximum(inlier[..., part].max(axis=-1, keepdims=True) / np.float32(127), np.float32(1e-12))
            x_low[..., part] = np.clip(np.rint(x[..., part] / scale), -128, 127) * scale
    out = x_low @ low.astype(np.float32)
    if outliers:
        out = out + x[..., outliers] @ weight[outliers].astype(np.float16).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------- one layer
CASES = {
    "int8 per channel, outliers": dict(precision="int8", outliers=(3, 17)),
    "int4 block 16 ragged, outliers": dict(precision="int4", block=16, outliers=(0, 39)),
    "int4 block 16, no branch": dict(precision="int4", block=16),
    "w8a8 static": dict(precision="int8", outliers=(3, 17), activations="static", scale=2.0 ** -6),
    "w8a8 dynamic, groups of 16, outliers": dict(precision="int8", block=16, outliers=(3, 17), activations="dynamic",
                                                 group=16),
    "w8a8 dynamic, groups of 32, ragged": dict(precision="int8", block=32, activations="dynamic", group=32),
    "w8a8 dynamic, groups of 16, no branch": dict(precision="int8", block=16, activations="dynamic", group=16),
    "fp16": dict(precision="fp16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_passes_equal_numpy_emulation(case):
    weight = (RNG.standard_normal((40, 24)) * 0.1).astype(np.float32)
    x = RNG.standard_normal((2, 5, 40)).astype(np.float32)
    x[..., [3, 17]] *= 50.0  # outlier channels
    plan = plan_for(weight, **CASES[case])
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32))
    graph, reports, _ = run_passes(one_layer_graph(weight), ["isolate_outliers", "quantize_weights",
                                                             "quantize_activations"], data)
    got = run_graph(graph, x)
    np.testing.assert_allclose(got, np_layer(x, weight, plan), rtol=1e-5, atol=1e-5)
    assert reports[1].bytes_saved > 0  # weights really stored smaller
    assert not reports[2].notes  # every planned input quantized
    if plan.activation_group:  # INT8 activations in blocks, stated by the node itself
        [gemm] = [node for node in graph.nodes if node.op == "MatMulNBits"]
        assert gemm.attrs["bits"] == 8 and gemm.attrs["accuracy_level"] == 4
        assert gemm.attrs["block_size"] == plan.activation_group
    if plan.outliers:
        assert reports[0].nodes_added == {"Gather": 1, "MatMul": 1, "Cast": 1, "Add": 1}


@pytest.mark.parametrize("sink,outliers,plain", [(50.0, (), True), (50.0, (31,), False), (5.0, (), False)])
def test_gptq_leaves_unprotected_sink_writers_to_plain_rounding(sink, outliers, plain):
    """GPTQ's H leaves the sink token out: a layer whose input at the sink exceeds 10x every other token's (channel
    31 here) is rounded plainly, with a note, unless that channel is an FP16 outlier row."""
    from accullm_export.quant.symmetric import quantize

    rng = np.random.default_rng(11)
    weight = rng.standard_normal((32, 8)).astype(np.float32)
    inputs = rng.standard_normal((256, 32)) @ (np.eye(32) + 0.5 * rng.standard_normal((32, 32)))
    hessian = inputs.T @ inputs / len(inputs)  # correlated: GPTQ moves rows away from plain rounding
    statistics = {"absmax": np.ones(32), "sink_absmax": np.r_[np.full(31, 0.5), sink]}
    plan = plan_for(weight, "int4", block=16, outliers=outliers)
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), statistics={"x": statistics},
                    hessians={"x": hessian})
    passes = ["isolate_outliers", "compensate_errors_gptq", "quantize_weights"]
    graph, reports, _ = run_passes(one_layer_graph(weight), passes, data)
    values = graph.tensors()["/layer/MatMul/weight_quantized"].values.astype(np.int8)
    rest = weight.copy()
    rest[list(outliers)] = 0.0
    assert np.array_equal(values, quantize(rest, 4, 16)[0]) == plain
    assert any("attention sink" in note for report in reports for note in report.notes) == plain


def test_outlier_rows_are_excluded_from_the_low_bit_part():
    weight = (RNG.standard_normal((40, 24)) * 0.1).astype(np.float32)
    weight[3] *= 30.0  # a huge row would dominate its block's scale
    plan = plan_for(weight, "int4", outliers=(3,), block=16)
    data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32))
    graph, _, _ = run_passes(one_layer_graph(weight), ["isolate_outliers", "quantize_weights"], data)
    tensors = graph.tensors()
    values = tensors["/layer/MatMul/weight_quantized"].values.astype(np.int8)
    scales = tensors["/layer/MatMul/weight_scale"].values
    assert not values[3].any()
    assert scales.dtype == np.float16  # blocked scales are stored in half precision
    expected_scale = np.abs(np.delete(weight[:16], 3, axis=0)).max(axis=0) / 7
    np.testing.assert_allclose(scales[0], expected_scale, rtol=2 ** -11)
    np.testing.assert_array_equal(tensors["/layer/MatMul/outlier_weight"].values, weight[[3]].astype(np.float16))


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX's int4 layout, written independently: two's complement nibbles, element 2i in the low nibble."""
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


@pytest.mark.parametrize("shape", [(7, 3), (40, 24)])
def test_packed_int4_round_trips(tmp_path, shape):
    values = RNG.integers(-7, 8, size=shape).astype(np.int8)
    tensor = constant("q", values.astype(ml_dtypes.int4))
    graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[tensor], outputs=[gs.Variable("y", ml_dtypes.int4)])],
                     outputs=[], opset=23)
    graph.outputs = [graph.nodes[0].outputs[0]]
    model = gs.export_onnx(graph)
    proto = next(t for t in model.graph.initializer if t.name == "q")
    assert proto.data_type == onnx.TensorProto.INT4
    assert proto.raw_data == pack_int4(values)
    assert len(proto.raw_data) == -(-values.size // 2)
    onnx.save(model, str(tmp_path / "m.onnx"))
    back = numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0])
    np.testing.assert_array_equal(back.astype(np.int8), values)


# ------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("recipe", [make_recipe(name="w4a16", block_size=32, embeddings="fp32"),
                                    make_recipe(name="w4a16", block_size=16, outliers=0, embeddings="fp32"),
                                    make_recipe(name="fp16", embeddings="fp32"),
                                    make_recipe(name="w4a16", block_size=32, embeddings="fp32",
                                           overrides=(("lm_head", "fp32"), ("layers.0", "int8")))],
                         ids=["w4a16-b32", "w4a16-no-outliers", "fp16", "overrides"])
def test_weight_only_model_equals_numpy_emulation(planted_model, profile, tmp_path, recipe):
    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile)
    onnx.checker.check_model(str(tmp_path / "q" / "model.onnx"), full_check=True)
    emulated = substituted_model(folder, manifest, tmp_path, emulate_weight)
    feed = llm_feed(folder)
    np.testing.assert_allclose(ort_logits(tmp_path / "q" / "model.onnx", feed), ort_logits(emulated, feed),
                               rtol=1e-5, atol=1e-5)
    branch = [layer for layer in manifest["layers"] if layer["outliers"]]
    if recipe.outliers.channels == 0 or recipe.name == "fp16":
        assert not branch
    else:  # the planted channels are found and split off wherever the layer reads a normed input
        assert branch and all(set(PLANTED) <= set(layer["outliers"]) for layer in branch
                              if "proj" in layer["node"] and "down" not in layer["node"] and "o_proj" not in layer["node"])


def test_block_scales_stored_in_half_precision(planted_model, profile, tmp_path):
    """Blocked INT4 scales are FP16 constants behind a Cast: the bit count is 4 + 16 / block exactly, ONNX Runtime
    still fuses DequantizeLinear + MatMul into MatMulNBits, and folding the Casts (the TensorRT bundle does)
    leaves the logits unchanged."""

    from accullm_export.graph.ir import load_graph, save_graph

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=16, outliers=0), profile)
    for layer in manifest["layers"]:  # no outlier rows: int4 values plus one FP16 scale per 16 rows and column
        blocks = -(-layer["in_features"] // 16)
        expected = (layer["in_features"] * 4 + blocks * 16) / layer["in_features"]
        assert layer["bits_per_weight"] == pytest.approx(expected, abs=1e-4), layer["node"]
    path = tmp_path / "q" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    producers = {output: node for node in model.graph.node for output in node.output}
    stored = {t.name: t for t in model.graph.initializer}
    blocked = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in node.attribute)]
    assert blocked
    for node in blocked:
        cast = producers[node.input[1]]
        assert cast.op_type == "Cast" and stored[cast.input[0]].data_type == onnx.TensorProto.FLOAT16

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(node.op_type == "MatMulNBits" for node in optimized.graph.node) >= len(blocked)
    assert not any(node.op_type == "DequantizeLinear" for node in optimized.graph.node)

    graph, source = load_graph(path)
    graph, _, _ = run_passes(graph, [("fold_scale_casts", None)])
    save_graph(graph, source, tmp_path / "folded.onnx", {})
    folded = onnx.load(str(tmp_path / "folded.onnx"), load_external_data=False)
    folded_initializers = {t.name for t in folded.graph.initializer}
    for node in folded.graph.node:
        if node.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in node.attribute):
            assert node.input[1] in folded_initializers  # a plain constant scale, as TensorRT's parser wants
    feed = llm_feed(folder)
    np.testing.assert_array_equal(ort_logits(tmp_path / "folded.onnx", feed), ort_logits(path, feed))


def test_scale_search_model_equals_emulation(planted_model, profile, tmp_path):
    """weights.scale_search: each INT4 layer equals rounding with the searched scales, the rows weighted by the
    profile's E[x^2] of that input (outlier rows left out), on the full grid; stored values reach -8."""
    from accullm_export.calibration.profile import load_profile
    from accullm_export.quant.symmetric import dequantize, quantize

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=16, scale_search=True,
                                                             embeddings="fp32"), profile)
    assert manifest["recipe"]["weights"]["scale_search"] is True
    moments = {layer["node"]: layer for layer in load_profile(profile).manifest["layers"]}
    arrays = load_profile(profile).arrays

    def emulate(weight, plan):
        importance = arrays[f"{moments[plan.node]['input_index']}.second_moment"].astype(np.float64).copy()
        importance[list(plan.outliers)] = 0.0
        rest = weight.copy()
        rest[list(plan.outliers)] = 0
        values, scales = quantize(rest, 4, 16, search=True, importance=importance)
        out = dequantize(values, scales, 16)
        out[list(plan.outliers)] = weight[list(plan.outliers)].astype(np.float16).astype(np.float32)
        return out

    emulated = substituted_model(folder, manifest, tmp_path, emulate)
    feed = llm_feed(folder)
    np.testing.assert_allclose(ort_logits(tmp_path / "q" / "model.onnx", feed), ort_logits(emulated, feed),
                               rtol=1e-5, atol=1e-5)
    stored = read_initializers(tmp_path / "q" / "model.onnx")
    assert any(v.dtype == ml_dtypes.int4 and (v.astype(np.int8) == -8).any() for v in stored.values())
    # -8 survives ONNX Runtime's MatMulNBits fusion (ORT all; its int8 activations at accuracy level 4 differ a
    # little): a mishandled -8 would move whole weights by 8 steps
    fused = create_session(tmp_path / "q" / "model.onnx", device="cpu", optimization="all").run(["logits"], feed)[0]
    basic = ort_logits(tmp_path / "q" / "model.onnx", feed)
    assert np.abs(fused - basic).max() < 0.05 * np.abs(basic).max()
    with pytest.raises(UserError, match="weights.scale_search: applies to blocked INT4"):
        make_recipe(name="fp16", scale_search=True)


def test_overrides_are_honoured(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, overrides=(("lm_head", "fp32"), ("layers.0", "int8"),
                                                            ("*down_proj*", "fp16")))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile)
    precision = {layer["node"]: layer["precision"] for layer in manifest["layers"]}
    assert precision["/lm_head/MatMul"] == "fp32"
    assert precision["/model/layers.0/self_attn/q_proj/MatMul"] == "int8"
    assert precision["/model/layers.0/mlp/down_proj/MatMul"] == "fp16"  # the last matching override wins
    assert precision["/model/layers.1/self_attn/q_proj/MatMul"] == "int4"
    initializers = read_initializers(tmp_path / "q" / "model.onnx")  # q/k/v are merged into one MatMul per layer
    dtypes = lambda prefix: {a.dtype for name, a in initializers.items() if name.startswith(prefix)}  # noqa: E731
    assert np.dtype(np.int8) in dtypes("/model/layers.0/self_attn/q_proj/MatMul")
    assert np.dtype(ml_dtypes.int4) in dtypes("/model/layers.1/self_attn/q_proj/MatMul")
    assert initializers["lm_head.MatMul.weight"].dtype == np.float32
    with pytest.raises(UserError, match="matches no linear layer"):
        quantize_model(folder, tmp_path / "x", make_recipe(name="w4a16", overrides=(("layers.9", "int8"),)), profile)


def test_merging_parallel_linears_keeps_the_numerics(planted_model, tmp_path):
    """q/k/v and gate/up become one MatMul + Split each; outputs keep their names and values."""
    from accullm_export.graph.ir import load_graph, save_graph

    folder, _ = planted_model
    graph, model = load_graph(folder / "model.onnx")
    graph, reports, _ = run_passes(graph, [("merge_parallel_linears", None)])
    assert reports[0].nodes_removed == {"MatMul": 2 * 3}  # 2 layers: (3 - 1) + (2 - 1) MatMuls fewer each
    assert reports[0].nodes_added == {"Split": 4}
    save_graph(graph, model, tmp_path / "merged.onnx", {})
    names = {output for node in onnx.load(str(tmp_path / "merged.onnx")).graph.node for output in node.output}
    assert "/model/layers.1/self_attn/k_proj/MatMul/output_0" in names
    feed = llm_feed(folder)
    np.testing.assert_allclose(ort_logits(tmp_path / "merged.onnx", feed), ort_logits(folder / "model.onnx", feed),
                               rtol=1e-6, atol=1e-6)


def test_outlier_layers_limit_the_branch(planted_model, profile, tmp_path):
    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=32, policy="topk",
                                                             outlier_layers=("*down_proj*", "lm_head")), profile)
    with_branch = {layer["node"] for layer in manifest["layers"] if layer["outliers"]}
    assert with_branch and all("down_proj" in node or "lm_head" in node for node in with_branch)
    with pytest.raises(UserError, match="outliers.layers 'nothing' matches no linear layer"):
        quantize_model(folder, tmp_path / "x", make_recipe(name="w4a16", outlier_layers=("nothing",)), profile)
    manifest = quantize_model(folder, tmp_path / "r", make_recipe(name="w4a16", block_size=32, policy="topk",
                                                             outlier_layers=("residual",)), profile)
    with_branch = {layer["node"] for layer in manifest["layers"] if layer["outliers"]}
    readers = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
    assert {node for node in with_branch if "lm_head" in node} and {node for node in with_branch if "up_proj" in node}
    assert all(any(name in node for name in readers) for node in with_branch)
    assert all(layer["outliers"] for layer in manifest["layers"] if any(name in layer["node"] for name in readers))
    # '!PATTERN' takes layers out of the branch: the same without gate/up
    manifest = quantize_model(folder, tmp_path / "e", make_recipe(name="w4a16", block_size=32, policy="topk", outlier_layers=(
        "residual", "!*gate_proj*", "!*up_proj*")), profile)
    without = {layer["node"] for layer in manifest["layers"] if layer["outliers"]}
    assert without == {node for node in with_branch if "gate_proj" not in node and "up_proj" not in node}
    with pytest.raises(UserError, match="matches no linear layer"):
        quantize_model(folder, tmp_path / "y", make_recipe(name="w4a16", outlier_layers=("residual", "!nothing")), profile)


def test_min_outliers_tops_up_the_branch(planted_model, profile, tmp_path):
    """outliers.min_channels [PATTERN, N]: the policy's channels plus the next by calibration E[x^2], N in all; the
    other layers keep the policy's."""
    from accullm_export.calibration.profile import load_profile

    folder, _ = planted_model
    base = dict(name="w4a16", block_size=32, policy="topk", outlier_layers=("lm_head", "*down_proj*"))
    plain = quantize_model(folder, tmp_path / "p", make_recipe(**base), profile)
    head = next(layer for layer in plain["layers"] if layer["node"] == "/lm_head/MatMul")
    statistics = load_profile(profile, folder / "model.onnx")

    def by_second_moment(tensor: str, taken: list[int]) -> list[int]:
        """The channels not in ``taken``, largest calibration E[x^2] first (NumPy, apart from the pass)."""
        second = np.asarray(statistics.input_statistics(tensor)["second_moment"], dtype=np.float64)
        return [int(c) for c in np.argsort(-second, kind="stable") if int(c) not in taken]

    count = len(head["outliers"]) + 3
    topped = quantize_model(folder, tmp_path / "t", make_recipe(**base, min_outliers=(("lm_head", count),)), profile)
    extra = by_second_moment(head["input"], head["outliers"])[:3]
    layers = {layer["node"]: layer for layer in topped["layers"]}
    assert layers["/lm_head/MatMul"]["outliers"] == sorted(head["outliers"] + extra)
    assert all(layers[layer["node"]]["outliers"] == layer["outliers"] for layer in plain["layers"]
               if layer["node"] != "/lm_head/MatMul")
    assert Recipe.from_dict(make_recipe(**base, min_outliers=(("lm_head", 5),)).to_dict()).outliers.min_channels == \
        (("lm_head", 5),)
    # readers of one input (q/k/v): the count applies to the union of their channels, whichever reader it names
    shared = dict(name="w4a16", block_size=32, policy="topk", outlier_layers=("residual",))
    plain = quantize_model(folder, tmp_path / "sp", make_recipe(**shared), profile)
    query = next(layer for layer in plain["layers"] if "q_proj" in layer["node"])
    union = query["outliers"]
    topped = quantize_model(folder, tmp_path / "st", make_recipe(**shared, min_outliers=(("*q_proj*", len(union) + 2),)),
                            profile)
    extra = by_second_moment(query["input"], union)
    readers = [layer for layer in topped["layers"] if layer["input"] == query["input"]]
    assert len(readers) == 3 and all(layer["outliers"] == sorted(union + extra[:2]) for layer in readers)
    assert Recipe.from_dict({"outliers": {"min_channels": [["lm_head", 32]]}}).outliers.min_channels == \
        (("lm_head", 32),)
    for entry in (["lm_head"], ["lm_head", "x"], ["", 3], ["lm_head", -2]):
        with pytest.raises(UserError, match="outliers.min_channels"):
            Recipe.from_dict({"outliers": {"min_channels": [entry]}})
    with pytest.raises(UserError, match="an integer from 1 to"):
        make_recipe(**base, min_outliers=(("lm_head", 0),))
    with pytest.raises(UserError, match="no outlier branch"):
        make_recipe(name="w4a16", outliers=0, min_outliers=(("lm_head", 4),))
    with pytest.raises(UserError, match="no row would stay low-bit"):
        quantize_model(folder, tmp_path / "w", make_recipe(**base, min_outliers=(("lm_head", 10 ** 6),)), profile)
    with pytest.raises(UserError, match="no layer it matches gets an outlier branch"):
        quantize_model(folder, tmp_path / "x", make_recipe(**base, min_outliers=(("*up_proj*", 4),)), profile)
    config = write_config(tmp_path / "min.toml", make_recipe(**base, min_outliers=(("lm_head", count),)))
    assert main(["quantize", str(folder), "--config", config, "--profile", str(profile),
                 "-o", str(tmp_path / "c")]) == 0
    written = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert next(layer for layer in written["layers"] if layer["node"] == "/lm_head/MatMul")["outliers"] == \
        layers["/lm_head/MatMul"]["outliers"]


def test_residual_outlier_layers_take_the_sink_writers():
    """A layer whose input at the attention sink dwarfs every other token's gets the branch, sink channels included."""
    from accullm_export.graph.linear import LinearLayer
    from accullm_export.graph.layer_plan import sink_channels
    from accullm_export.recipes.plan import plan_layers

    absmax = np.ones(8)
    assert sink_channels({"absmax": absmax, "sink_absmax": np.array([1, 50, 2, 11, 0, 0, 0, 0.0])}) == [1, 3]
    assert sink_channels({"absmax": absmax}) == []

    class Profile:
        manifest = {"layers": []}
        stats = {"q_in": {"absmax": absmax, "sink_absmax": absmax},
                 "down_in": {"absmax": absmax, "sink_absmax": np.array([0, 0, 500.0, 0, 0, 0, 0, 0])},
                 "o_in": {"absmax": absmax, "sink_absmax": absmax * 2}}

        def input_statistics(self, name):
            return self.stats[name]

        def outliers(self, node, policy=None):
            return [0]

    layers = [LinearLayer(node=f"/model/layers.0/{name}/MatMul", op_type="MatMul", input=tensor, weight=f"w{i}",
                          in_features=8, out_features=8, dtype="float32")
              for i, (name, tensor) in enumerate((("self_attn/q_proj", "q_in"), ("self_attn/o_proj", "o_in"),
                                                  ("mlp/down_proj", "down_in")))]
    plans = plan_layers(make_recipe(name="w4a16", block_size=16, outlier_layers=("residual",)), layers, Profile())
    assert [plans[layer.node].outliers for layer in layers] == [(0,), (), (0, 2)]


def test_residual_outlier_layers_need_named_readers():
    from accullm_export.graph.linear import LinearLayer
    from accullm_export.recipes.plan import plan_layers

    layers = [LinearLayer(node="/fc1/MatMul", op_type="MatMul", input="x", weight="w", in_features=8, out_features=8, dtype="float32")]
    with pytest.raises(UserError, match="no q/k/v, gate/up or lm_head layer"):
        plan_layers(make_recipe(name="w4a16", outlier_layers=("residual",)), layers, profile=None)


def test_override_sets_an_int4_block_size(planted_model, profile, tmp_path):
    """``int4:B`` gives matching layers their own INT4 block size; the others keep --block-size."""
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, overrides=(("*down_proj*", "int4:16"), ("layers.1", "int4")))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile)
    blocks = {layer["node"]: (layer["precision"], layer["block_size"]) for layer in manifest["layers"]}
    assert blocks["/model/layers.0/mlp/down_proj/MatMul"] == ("int4", 16)
    assert blocks["/model/layers.1/mlp/down_proj/MatMul"] == ("int4", 32)  # the last match, plain int4, wins
    assert blocks["/model/layers.0/mlp/up_proj/MatMul"] == ("int4", 32)
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"))
    dq_blocks = {node.output[0]: next(a.i for a in node.attribute if a.name == "block_size")
                 for node in graph.graph.node if node.op_type == "DequantizeLinear"
                 and any(a.name == "block_size" for a in node.attribute)}
    down = [b for name, b in dq_blocks.items() if "layers.0/mlp/down_proj" in name or "layers.0.mlp.down_proj" in name]
    assert down == [16], dq_blocks
    for bad in ("int8:64", "int4:48", "int4:x"):
        with pytest.raises(UserError, match="override"):
            make_recipe(name="w4a16", overrides=(("lm_head", bad),))


def test_override_patterns():
    assert override_matches("layers.1", "/model/layers.1/mlp/up_proj/MatMul")
    assert not override_matches("layers.1", "/model/layers.10/mlp/up_proj/MatMul")
    assert override_matches("lm_head", "/lm_head/MatMul")
    assert override_matches("*down_proj*", "/model/layers.3/mlp/down_proj/MatMul")


def test_embedding_table_int8_per_token(planted_model, profile, tmp_path):
    from accullm_export.runtime.intermediates import IntermediateReader

    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=32), profile)
    table = read_initializers(folder / "model.onnx")["lm_head.MatMul.weight"]  # tied: [hidden, vocab]
    scale = np.abs(table).max(axis=0) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale)  # the padding token's all-zero column
    expected_table = np.clip(np.rint(table / scale), -127, 127) * scale
    feed = llm_feed(folder)
    name = "/model/embed_tokens/Gather/output_0"
    got = IntermediateReader(tmp_path / "q" / "model.onnx").run(feed, [name])[name]
    np.testing.assert_allclose(got, expected_table[:, feed["input_ids"]], rtol=1e-6, atol=1e-7)


def test_w8a8_model_runs_and_the_branch_pays(planted_model, profile, tmp_path):
    """Both activation modes run (basic and full optimization); the FP16 branch cuts the error."""
    from accullm_export.calibration.feeds import llm_feeds, text_windows

    folder, text = planted_model
    windows, _ = text_windows(folder, str(text), 2, 32, seed=5)  # text like the calibration's, not random bytes
    feed = llm_feeds(windows[1:], folder / "model.onnx")[0]
    reference = ort_logits(folder / "model.onnx", feed)
    for activations in ("static", "dynamic"):
        errors = {}
        for outliers in ("auto", 0):
            out = tmp_path / f"{activations}-{outliers}"
            manifest = quantize_model(folder, out, make_recipe(name="w8a8", activations=activations, outliers=outliers),
                                      profile)
            onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
            ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
            expected = {"QuantizeLinear", "DequantizeLinear"} if activations == "static" else {
                "MatMulNBits"}  # dynamic: ONNX Runtime's 8-bit GEMM, INT8 activations in blocks
            assert expected <= ops
            # dynamic blocks of 32 confine an outlier to its block: the branch cuts the typical error, the worst less
            error = np.abs(ort_logits(out / "model.onnx", feed) - reference)
            errors[outliers] = error.max() if activations == "static" else error.mean()
            create_session(out / "model.onnx", device="cpu", optimization="all").run(["logits"], feed)
            assert manifest["size"]["linear_bits_per_weight"] < 10
        assert errors["auto"] < 0.75 * errors[0], errors


def test_w8a8_activation_groups(planted_model, profile, tmp_path):
    """activations.group: each layer a MatMulNBits with 8-bit weights in blocks of G and INT8 activations
    (accuracy level 4), one float32 weight scale per block; q/k/v and gate/up merged without changing a logit;
    group sizes that do not divide a layer's width are refused."""
    from accullm_export.calibration.feeds import llm_feeds, text_windows

    folder, text = planted_model
    windows, _ = text_windows(folder, str(text), 2, 32, seed=5)
    feed = llm_feeds(windows[1:], folder / "model.onnx")[0]
    reference = ort_logits(folder / "model.onnx", feed)
    for group in (16, 32):
        out = tmp_path / f"group{group}"
        manifest = quantize_model(folder, out, make_recipe(name="w8a8", activations="dynamic", activation_group=group,
                                                      outliers=0), profile)
        model = onnx.load(str(out / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        initializers = {t.name: t for t in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        quantized = sum(1 for p in manifest["layers"] if p["activations"])
        # q/k/v and gate/up merged: 3 MatMulNBits fewer per decoder layer
        assert len(nodes) == quantized - 3 * sum(1 for p in manifest["layers"] if "q_proj" in p["node"])
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8, group, 4)
            assert initializers[node.input[1]].dims == [attrs["N"], attrs["K"] // group, group]
        assert {p["activation_group"] for p in manifest["layers"] if p["activations"]} == {group}
        assert manifest["size"]["linear_bits_per_weight"] == pytest.approx(8 + 32 / group, abs=1e-3)
        unmerged = tmp_path / f"unmerged{group}"
        quantize_model(folder, unmerged, make_recipe(name="w8a8", activations="dynamic", activation_group=group,
                                                     outliers=0), profile, finishing=())
        assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(unmerged / "model.onnx")).graph.node) == quantized
        logits = ort_logits(out / "model.onnx", feed)
        np.testing.assert_allclose(logits, ort_logits(unmerged / "model.onnx", feed), rtol=1e-5, atol=1e-5)
        assert np.abs(logits - reference).mean() < 0.1 * np.abs(reference).mean()  # a wrong zero point: ~1x
        create_session(out / "model.onnx", device="cpu", optimization="all").run(["logits"], feed)
    with pytest.raises(UserError, match="not a multiple of 128; this model takes 16, 32, 64"):
        quantize_model(folder, tmp_path / "bad", make_recipe(name="w8a8", activations="dynamic", activation_group=128),
                       profile)
    assert not (tmp_path / "bad").exists()


def test_quantizing_twice_or_with_a_foreign_profile_is_refused(planted_model, profile, tiny_exports, tmp_path):
    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=32), profile)
    with pytest.raises(UserError, match="already quantized"):
        quantize_model(tmp_path / "q", tmp_path / "q2", make_recipe(name="w4a16"), profile)
    with pytest.raises(UserError, match="another model"):
        quantize_model(tiny_exports["llama"][1], tmp_path / "q3", make_recipe(name="w4a16"), profile)
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists()


def test_unsupported_ops_are_left_untouched_with_a_note(tmp_path, caplog):
    """A Gemm layer is noted and kept; the MatMul is quantized; the model runs."""
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    weight = (RNG.standard_normal((8, 8)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="/a/MatMul"),
         helper.make_node("Gemm", ["h", "W2"], ["y"], name="/b/Gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(weight, "W1"), numpy_helper.from_array(weight.T.copy(), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    script = tmp_path / "data.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    rng = np.random.default_rng(0)\n"
                      "    return [{'x': rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(3)]\n")
    calibrate(tmp_path / "m.onnx", tmp_path / "p", CalibrationConfig(source=str(script)))
    with caplog.at_level(logging.INFO, logger="accullm_export"):
        manifest = quantize_model(tmp_path / "m.onnx", tmp_path / "q", make_recipe(name="w8a8", outliers=0), tmp_path / "p")
    assert any("/b/Gemm: Gemm is not rewritten" in note for note in manifest["notes"])
    assert "Gemm is not rewritten" in caplog.text
    rewritten = onnx.load(str(tmp_path / "q" / "model.onnx"))
    gemm = next(node for node in rewritten.graph.node if node.op_type == "Gemm")
    assert gemm.input[1] == "W2"
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    y = create_session(tmp_path / "q" / "model.onnx", device="cpu", optimization="basic").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x @ weight) @ weight, atol=0.1)


@pytest.mark.parametrize("pass_name,recipe", [("scale_activations_awq", make_recipe(name="w4a16", block_size=32)),
                                              ("smooth_activations", make_recipe(name="w8a8", smoothquant=0.5))])
def test_scaling_passes_keep_the_function(planted_model, profile, tmp_path, pass_name, recipe):
    """AWQ or SmoothQuant alone (weights not rounded yet) must not change the model's output."""
    from accullm_export.calibration.profile import load_profile
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.linear import find_linear_layers
    from accullm_export.recipes.plan import plan_layers

    folder, _ = planted_model
    source = folder / "model.onnx"
    loaded = load_profile(profile, source)
    plans = plan_layers(recipe, find_linear_layers(onnx.load(str(source))), loaded)
    statistics = {e["name"]: loaded.input_statistics(e["name"]) for e in loaded.manifest["inputs"]}
    data = PassData(plans=plans, float_dtype=np.dtype(np.float32), statistics=statistics,
                    smoothing=recipe.activations.smoothquant or None)
    graph, model = load_graph(source)
    graph, reports, data = run_passes(graph, [pass_name], data)
    assert data.input_scales, "no input was scaled"
    save_graph(graph, model, tmp_path / "scaled.onnx", {})
    feed = llm_feed(folder)
    np.testing.assert_allclose(ort_logits(tmp_path / "scaled.onnx", feed), ort_logits(source, feed),
                               rtol=1e-4, atol=1e-4)
    assert any("not scaled" in note for note in reports[0].notes)  # attention outputs have no producer to fold into


def test_smoothquant_scales_and_static_ranges_equal_numpy(planted_model, profile, tmp_path):
    from accullm_export.calibration.profile import load_profile

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(name="w8a8", smoothquant=0.5), profile)
    loaded = load_profile(profile)
    tensor = "/model/layers.1/post_attention_layernorm/Mul/output_0"  # read by gate_proj and up_proj
    statistics = loaded.input_statistics(tensor)
    source = read_initializers(folder / "model.onnx")
    outliers = next(layer["outliers"] for layer in manifest["layers"] if layer["input"] == tensor)
    weight_range = np.maximum(np.abs(source["model.layers.1.mlp.gate_proj.MatMul.weight"]).max(axis=1),
                              np.abs(source["model.layers.1.mlp.up_proj.MatMul.weight"]).max(axis=1))
    activation_range = np.maximum(statistics["absmax"], statistics["sink_absmax"]).astype(np.float64)
    smoothing = np.sqrt(activation_range) / np.sqrt(weight_range)
    smoothing[outliers] = 1.0
    expected_scale = np.delete(activation_range / smoothing, outliers).max() / 127
    got = read_initializers(tmp_path / "q" / "model.onnx")[f"{tensor}/input_scale"]
    np.testing.assert_allclose(got, expected_scale, rtol=1e-5)
    assert abs(expected_scale - np.delete(activation_range, outliers).max() / 127) > 1e-3 * expected_scale


def test_quantize_cli(planted_model, profile, tmp_path, capsys):
    folder, _ = planted_model
    config = write_config(tmp_path / "awq.toml", make_recipe(name="w4a16", awq=True, gptq=True, gptq_samples=2))
    code = main(["quantize", str(folder), "--config", config, "--profile", str(profile), "-o", str(tmp_path / "q"),
                 "--block-size", "32", "--override", "lm_head=int8"])
    out = capsys.readouterr().out
    assert code == 0 and "effective bits per weight" in out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["scale_activations_awq", "isolate_outliers",
                                                       "compensate_errors_gptq", "quantize_weights",
                                                       "quantize_activations", "quantize_embeddings",
                                                       "merge_parallel_linears"]
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "genai_config.json").is_file()
    assert not any(note.startswith("GPTQ: gptq.samples") for note in manifest["notes"])
    config = write_config(tmp_path / "gptq.toml", make_recipe(name="w4a16", gptq=True, gptq_samples=1000))
    code = main(["quantize", str(folder), "--config", config, "--profile", str(profile), "-o", str(tmp_path / "q2"),
                 "--block-size", "32"])
    notes = json.loads((tmp_path / "q2" / "manifest.json").read_text())["notes"]
    assert code == 0 and any("gptq.samples is 1000, but the profile holds" in note for note in notes)
    w4a16 = {"weights": {"precision": "int4"}}
    w8a8 = {"weights": {"precision": "int8"}, "activations": {"mode": "static"}}
    for table, bad, message in (
            (w4a16, ["--outliers", "-1"], "outliers.channels"),
            ({**w8a8, "weights": {"precision": "int8", "awq": True}}, [], "weights.awq"),
            (w4a16, ["--override", "nothing=int8"], "matches no linear layer"),
            (w4a16, ["--override", "lm_head=int3"], "precision must be one of"),
            ({**w4a16, "activations": {"smoothquant": 0.5}}, [], "activations.smoothquant"),
            (w4a16, ["--block-size", "100"], "--block-size"),
            ({**w4a16, "activations": {"group": 32}}, [], "activations.group"),
            ({**w8a8, "activations": {"mode": "static", "group": 32}}, [], "activations.group"),
            ({**w8a8, "activations": {"mode": "dynamic", "group": 0}}, [], "activations.group: must be one of")):
        config = write_config(tmp_path / "bad.toml", table)
        args = ["quantize", str(folder), "--config", config, "--profile", str(profile), "-o", str(tmp_path / "bad"),
                *bad]
        try:
            code = main(args)
        except SystemExit as exited:  # argparse refuses a value outside a flag's choices, with the same exit code
            code = exited.code
        assert code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_fp16_exports_quantize_with_fp16_scales(tmp_path):
    """An fp16 export (the TensorRT path): scales and branches stay fp16; every recipe runs and stays close."""
    from accullm_export.calibration.outliers import OutlierPolicy
    from accullm_export.calibration.run import CalibrationConfig, calibrate
    from accullm_export.models.export import export_model

    hf = make_tiny_checkpoint(tmp_path / "hf", "llama", seed=3)
    export_model(str(hf), tmp_path / "onnx", dtype="fp16")
    (tmp_path / "text.txt").write_text(TEXT)
    calibrate(tmp_path / "onnx", tmp_path / "p", CalibrationConfig(source=str(tmp_path / "text.txt"), samples=4,
                                                                   seq_len=32, policy=OutlierPolicy(name="topk", k=2)))
    feed = llm_feed(tmp_path / "onnx")
    reference = ort_logits(tmp_path / "onnx" / "model.onnx", feed).astype(np.float32)
    for recipe in (make_recipe(name="w4a16", block_size=32), make_recipe(name="w8a8", activations="dynamic", smoothquant=0.5)):
        out = tmp_path / recipe.name
        manifest = quantize_model(tmp_path / "onnx", out, recipe, tmp_path / "p")
        assert any(layer["outliers"] for layer in manifest["layers"])
        stored = read_initializers(out / "model.onnx")
        scales = [a for name, a in stored.items() if "weight" in name and "scale" in name and "nbits" not in name]
        assert all(a.dtype == np.float16 for a in scales)
        # w8a8's MatMulNBits run on a float32 copy of their input (an ONNX Runtime fault with float16): FP16 values
        nbits = [a for name, a in stored.items() if name.endswith("weight_nbits_scale")]
        assert bool(nbits) == (recipe.name == "w8a8") and bool(scales) == (recipe.name == "w4a16")
        assert all(a.dtype == np.float32 and np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in nbits)
        logits = ort_logits(out / "model.onnx", feed).astype(np.float32)
        assert np.abs(logits - reference).max() < 0.25 * np.abs(reference).max()


def test_gptq_second_moments_streamed_a_group_at_a_time_give_the_same_model(planted_model, profile, tmp_path, caplog):
    """With room for one matrix at a time (``moments_mb=0``) every low-bit input's second moments are collected
    in a pass of their own, each group once (the rotated head's input first, as rotate_inputs reads it before
    GPTQ), and the written model is byte-identical to the one collected in a single pass."""
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=16, embeddings="fp32", gptq=True, gptq_samples=2,
                         rotate=("lm_head", "*gate_proj*"))
    quantize_model(folder, tmp_path / "whole", recipe, profile)
    with caplog.at_level(logging.INFO, logger="accullm_export.calibration.hessian"):
        manifest = quantize_model(folder, tmp_path / "streamed", recipe, profile, options=QuantizeOptions(moments_mb=0))
    groups = [record.getMessage() for record in caplog.records
              if record.getMessage().startswith("second moments: group")]
    inputs = {layer["input"] for layer in manifest["layers"] if layer["precision"] == "int4"}
    assert len(groups) == len(set(groups)) >= 4 and groups[0].startswith("second moments: group 1 of")
    assert not any("no second-moment matrix" in note for note in manifest["notes"])
    assert len(inputs) >= 4
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()


def test_a_weight_replaced_by_its_integers_is_freed_without_waiting_for_the_garbage_collector(monkeypatch):
    """graphsurgeon tensors refer to themselves through their producer and consumer lists, so only Python's cycle
    collector frees a replaced float constant: replace_weight_dequantized runs it once COLLECT_BYTES of them wait,
    and until then they are held."""
    import gc
    import weakref

    import onnx_graphsurgeon as gs

    from accullm_export.graph import rewrite

    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, (2, 64))
    weights = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    nodes = [gs.Node("MatMul", f"m{i}", inputs=[x, gs.Constant(f"w{i}", w)],
                     outputs=[gs.Variable(f"y{i}", np.float32, (2, 64))]) for i, w in enumerate(weights)]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[node.outputs[0] for node in nodes], opset=21)
    alive = [weakref.ref(w) for w in weights]
    del weights
    values, scales = np.ones((64, 64), np.int8), np.ones((1, 64), np.float32)
    gc.disable()
    try:
        monkeypatch.setattr(rewrite, "_waiting", 0)
        monkeypatch.setattr(rewrite, "COLLECT_BYTES", 2 * 64 * 64 * 4)
        rewrite.replace_weight_dequantized(graph, nodes[0], values, scales, 8, None, np.float32)
        assert alive[0]() is not None  # replaced, in a cycle: waits for the collector
        rewrite.replace_weight_dequantized(graph, nodes[1], values, scales, 8, None, np.float32)
        assert alive[0]() is None and alive[1]() is None and alive[2]() is not None
        assert rewrite._waiting == 0
    finally:
        gc.enable()
