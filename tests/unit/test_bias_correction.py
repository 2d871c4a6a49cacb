"""Bias correction (``quantize --bias-correction``): the stored biases and the whole model against an independent
NumPy emulation, GPTQ on the covariance, merging, ONNX Runtime's fusion, the distillation replica, the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from accullm_export.build.quantize import quantize_model
from accullm_export.calibration.profile import load_profile
from accullm_export.calibration.run import profile_feeds
from accullm_export.errors import UserError
from accullm_export.graph.pipeline import run_passes
from accullm_export.graph.recipes import PassContext, Recipe
from accullm_export.graph.rewrite import float_weight
from accullm_export.quant.gptq import gptq_quantize
from accullm_export.runtime.session import create_session
from tests.unit.test_quantize import (_emulate_weight, _feed, _fused_at_level_1, _initializers, _logits,
                                      _substituted, one_layer_graph, plan_for)

SAMPLES = 4  # calibration windows for the means (--gptq-samples)


def np_input_means(model_path, feeds, tensors) -> dict[str, np.ndarray]:
    """Each tensor's mean over every position but the first of every feed, from the fp32 model run with the
    tensors as extra graph outputs."""
    model = onnx.load(str(model_path))
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in tensors)
    session = create_session(model.SerializeToString(), device="cpu", optimization="basic")
    rows = {name: [] for name in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), feed)):
            rows[name].append(value[:, 1:].reshape(-1, value.shape[-1]).astype(np.float64))
    return {name: np.concatenate(parts).mean(axis=0) for name, parts in rows.items()}


def _with_biases(path, biases: dict[str, np.ndarray], tmp_path):
    """The model at ``path`` with bias[node] added to each named MatMul's output (as FP16 widened to float32)."""
    model = onnx.load(str(path))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.name in biases:
            result = node.output[0]
            node.output[0] = f"{result}/before_bias"
            name = f"{node.name}/np_bias"
            model.graph.initializer.append(numpy_helper.from_array(
                biases[node.name].astype(np.float16).astype(np.float32), name))
            nodes.append(helper.make_node("Add", [node.output[0], name], [result]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out = tmp_path / "emulated_biased.onnx"
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def corrected(planted_model, profile, tmp_path_factory):
    """The planted model at w4a16 block 32 with bias correction: unmerged ("q") and merged ("u")."""
    folder, _ = planted_model
    out = tmp_path_factory.mktemp("corrected")
    from accullm_export.build.quantize import QuantizeOptions

    recipe = Recipe(name="w4a16", block_size=32, embeddings="fp32", bias_correction=True)
    options = QuantizeOptions(gptq_samples=SAMPLES)
    manifest = quantize_model(folder, out / "q", recipe, profile, options=options, finishing=())
    quantize_model(folder, out / "u", recipe, profile, options=options)
    return out, manifest


def test_biases_and_model_equal_numpy_emulation(planted_model, profile, corrected, tmp_path):
    folder, _ = planted_model
    out, manifest = corrected
    feeds = profile_feeds(folder / "model.onnx", load_profile(profile, folder / "model.onnx").manifest, SAMPLES)
    assert len(feeds) == SAMPLES
    layers = manifest["layers"]
    means = np_input_means(folder / "model.onnx", feeds, sorted({layer["input"] for layer in layers}))
    source = _initializers(folder / "model.onnx")
    stored = _initializers(out / "q" / "model.onnx")
    expected = {}
    for layer in layers:
        from tests.unit.test_quantize import LayerPlan

        plan = LayerPlan(**{k: (tuple(v) if k == "outliers" else v) for k, v in layer.items()
                            if k in LayerPlan.__dataclass_fields__})
        weight = source[layer["weight"]]
        expected[layer["node"]] = means[layer["input"]] @ (weight - _emulate_weight(weight, plan)).astype(np.float64)
        got = stored[f"{layer['node']}/bias_correction"]
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float64), expected[layer["node"]], rtol=2e-3, atol=1e-6)
    assert any(np.abs(bias).max() > 1e-3 for bias in expected.values())  # the planted outliers shift the means
    emulated = _with_biases(_substituted(folder, manifest, tmp_path, _emulate_weight), expected, tmp_path)
    feed = _feed(folder)
    want = _logits(emulated, feed)
    for build in ("q", "u"):
        np.testing.assert_allclose(_logits(out / build / "model.onnx", feed), want, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(onnx.load(str(out / "u" / "model.onnx")), full_check=True)
    # the bias costs 16 bits per output column: 16 / in_features per weight on top of the uncorrected layer
    size = manifest["size"]["layers"]
    for layer in layers:
        plain = (layer["in_features"] * layer["out_features"] * 4 + 16 * layer["out_features"] * (
            -(-layer["in_features"] // 32)) + 16 * len(layer["outliers"]) * layer["out_features"]) / (
            layer["in_features"] * layer["out_features"])
        assert size[layer["node"]] == pytest.approx(plain + 16 / layer["in_features"], abs=1e-3)


def test_corrected_layers_have_zero_mean_error(planted_model, profile, corrected):
    """E[x] W_q + b = E[x] W for every layer, W_q read back from the file (the property the bias exists for)."""
    from accullm_export.graph.ir import load_graph
    from accullm_export.graph.passes.distill_scales import effective_weight

    folder, _ = planted_model
    out, manifest = corrected
    feeds = profile_feeds(folder / "model.onnx", load_profile(profile, folder / "model.onnx").manifest, SAMPLES)
    means = np_input_means(folder / "model.onnx", feeds, sorted({layer["input"] for layer in manifest["layers"]}))
    source = _initializers(folder / "model.onnx")
    graph, _ = load_graph(out / "q" / "model.onnx")
    nodes = {node.name: node for node in graph.nodes}
    stored = _initializers(out / "q" / "model.onnx")
    for layer in manifest["layers"]:
        mean = means[layer["input"]]
        quantized = effective_weight(nodes[layer["node"]])
        error = mean @ source[layer["weight"]] - (mean @ quantized + stored[f"{layer['node']}/bias_correction"])
        uncorrected = mean @ source[layer["weight"]] - mean @ quantized
        assert np.abs(error).max() <= 2e-3 * np.abs(uncorrected).max() + 1e-6


def test_onnxruntime_fuses_the_bias_into_matmulnbits(corrected, planted_model, tmp_path):
    out, _ = corrected
    path = out / "u" / "model.onnx"
    session, nodes = _fused_at_level_1(path, tmp_path)
    fused = [node for node in nodes if node.op_type == "MatMulNBits"]
    assert fused and all(len(node.input) >= 6 and node.input[5] for node in fused)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    constants = {tensor.name for tensor in optimized.graph.initializer}
    assert not [node for node in nodes if node.op_type == "DequantizeLinear"
                or node.op_type == "Add" and set(node.input) & constants]  # every bias went into MatMulNBits
    feed = _feed(planted_model[0])
    np.testing.assert_allclose(session.run(["logits"], feed)[0], _logits(path, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias_correction,sink_weight", [(True, 0.0), (False, 0.0), (False, 0.3), (True, 0.3)])
def test_gptq_objective(bias_correction, sink_weight):
    """GPTQ works on the covariance with bias correction, and adds the sink position's moment with its weight."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((32, 12)) * 0.1).astype(np.float32)
    x = rng.standard_normal((400, 32))
    x[:, 7] = 20.0 + 0.5 * rng.standard_normal(400)  # a large, nearly constant channel
    sinks = rng.standard_normal((6, 32))
    sinks[:, 3] = 50.0  # ... and one that only the sink position has
    hessian, mean = x.T @ x / len(x), x.mean(axis=0)
    sink_second, sink_mean = sinks.T @ sinks / len(sinks), sinks.mean(axis=0)
    plan = plan_for(weight, "int4", block=16)
    context = PassContext(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), hessians={"x": hessian},
                          means={"x": mean}, bias_correction=bias_correction,
                          reference_weights={plan.node: weight.copy()}, gptq_sink_weight=sink_weight,
                          sink_moments={"x": (sink_second, sink_mean)})
    graph, _ = run_passes(one_layer_graph(weight), [("compensate_errors_gptq", context),
                                                    ("correct_bias", context)])
    centre = mean if bias_correction else np.zeros(32)
    used = (x - centre).T @ (x - centre) / len(x) + sink_weight * (sinks - centre).T @ (sinks - centre) / len(sinks)
    values, _ = gptq_quantize(weight, used, 4, 16, act_order=True)
    dequantize = next(node for node in graph.nodes if node.op == "DequantizeLinear")
    np.testing.assert_array_equal(np.asarray(dequantize.inputs[0].values).astype(np.int8), values)
    biases = [node for node in graph.nodes if node.op == "Add"]
    assert len(biases) == (1 if bias_correction else 0)


def test_correct_bias_notes_a_layer_it_cannot_correct():
    weight = np.ones((8, 4), np.float32)
    plan = plan_for(weight, "int8")
    context = PassContext(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), bias_correction=True)
    graph, reports = run_passes(one_layer_graph(weight), [("quantize_weights", context), ("correct_bias", context)])
    assert reports[1].nodes_added == {} and "no bias correction" in reports[1].notes[0]
    matmul = next(node for node in graph.nodes if node.op == "MatMul")
    assert float_weight(matmul) is None and matmul.outputs[0].name == "y"  # quantized, and left uncorrected


def test_distillation_replica_adds_the_tracking_bias():
    torch = pytest.importorskip("torch", reason="the distillation replica needs torch (the export extra)")
    from accullm_export.quant.distill import BlockScaled, block_scaled_linear_class

    rng = np.random.default_rng(2)
    values = rng.integers(-8, 8, size=(16, 6)).astype(np.int8)
    scales = rng.uniform(0.01, 0.02, size=(2, 6)).astype(np.float32)
    mean = rng.standard_normal(16).astype(np.float32)
    target = rng.standard_normal(6).astype(np.float32)
    layer = BlockScaled("m", values, scales, 8, mean=mean, target=target)
    linear = block_scaled_linear_class()(layer, None)
    with torch.no_grad():
        linear.theta.add_(0.1)  # the bias follows the trained scales
        x = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
        weight = values.astype(np.float32) * np.repeat(scales * np.exp(np.float32(0.1)), 8, axis=0)
        expected = x.numpy() @ weight + target - mean @ weight
        np.testing.assert_allclose(linear(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bias_correction_needs_low_bit_layers():
    with pytest.raises(UserError, match="--bias-correction"):
        Recipe(name="fp16", bias_correction=True)
    Recipe(name="fp16", bias_correction=True, overrides=(("lm_head", "int8"),))


def test_tensorrt_swap_keeps_the_bias_after_the_plugin_op():
    weight = (np.random.default_rng(4).standard_normal((32, 8)) * 0.1).astype(np.float32)
    plan = plan_for(weight, "int4", block=16, outliers=(3,))
    mean = np.linspace(-1.0, 2.0, 32)
    context = PassContext(plans={plan.node: plan}, float_dtype=np.dtype(np.float32), means={"x": mean},
                          bias_correction=True, reference_weights={plan.node: weight.copy()})
    graph, reports = run_passes(one_layer_graph(weight), [(name, context) for name in (
        "isolate_outliers", "quantize_weights", "correct_bias", "fuse_outlier_split_gemm")])
    assert not reports[-1].notes
    fused = next(node for node in graph.nodes if node.op == "OutlierSplitGemm")
    bias = fused.outputs[0].outputs[0]
    assert bias.op == "Add" and bias.outputs[0].name == "y" and bias.outputs[0] in graph.outputs
    assert not [node for node in graph.nodes if node.op == "MatMul"]


def test_gptq_sink_weight_needs_gptq_and_sink_statistics():
    with pytest.raises(UserError, match="--gptq-sink-weight"):
        Recipe(name="w4a16", gptq_sink_weight=0.2)
    with pytest.raises(UserError, match="--gptq-sink-weight"):
        Recipe(name="w4a16", gptq=True, gptq_sink_weight=-1.0)
    weight = np.ones((16, 4), np.float32)
    plan = plan_for(weight, "int4", block=16)
    context = PassContext(plans={plan.node: plan}, float_dtype=np.dtype(np.float32),
                          hessians={"x": np.eye(16)}, gptq_sink_weight=0.2)
    with pytest.raises(UserError, match="position 0"):
        run_passes(one_layer_graph(weight), [("compensate_errors_gptq", context)])


def test_quantize_cli_takes_both_options(planted_model, profile, tmp_path, capsys):
    import json

    from accullm_export.cli.main import main

    folder, _ = planted_model
    common = ["quantize", str(folder), "--recipe", "w4a16", "--profile", str(profile), "--block-size", "32",
              "--gptq", "--gptq-samples", str(SAMPLES), "--embeddings", "fp32"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "--bias-correction", "--gptq-sink-weight", "0.5", "-o", str(tmp_path / "both")]) == 0
    recipe = json.loads((tmp_path / "both" / "manifest.json").read_text())["recipe"]
    assert recipe["bias_correction"] is True and recipe["gptq_sink_weight"] == 0.5
    plain, both = _initializers(tmp_path / "plain" / "model.onnx"), _initializers(tmp_path / "both" / "model.onnx")
    assert any(name.endswith("/bias_correction") for name in both)
    assert not any(name.endswith("/bias_correction") for name in plain)
    moved = [name for name in plain if name.endswith("weight_quantized")
             and not np.array_equal(plain[name].astype(np.int8), both[name].astype(np.int8))]
    assert moved  # the other objective rounds some layer differently


def test_w8a8_static_layers_get_their_bias_behind_the_activation_quantizer(planted_model, profile, tmp_path):
    """The layer reads its input through w8a8's Q/DQ; the mean is found by the planned input's name."""
    from accullm_export.build.quantize import QuantizeOptions

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", Recipe(name="w8a8", embeddings="fp32", bias_correction=True),
                              profile, options=QuantizeOptions(gptq_samples=SAMPLES), finishing=())
    stored = _initializers(tmp_path / "q" / "model.onnx")
    quantized = [layer for layer in manifest["layers"] if layer["precision"] in ("int8", "int4")]
    assert quantized and all(f"{layer['node']}/bias_correction" in stored for layer in quantized)
    assert not [note for note in manifest["notes"] if "no bias correction" in note]
