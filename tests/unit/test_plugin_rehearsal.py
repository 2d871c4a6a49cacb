"""The plugin graph's rehearsal: model_plugins/ in ONNX Runtime with every accullm node run by its NumPy reference,
against model/ (``accullm-export rehearse``).

The bundle is the tiny planted Llama quantized in the TensorRT form (INT4 blocks, FP16 outlier branches) with
guessed sparse-skip MLPs, so both plugin ops appear; model_plugins/ is written by the bundle's own swap code. The
mis-wired copies change one input or attribute of one plugin node and must be caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.cli.main import main
from accullm_export.errors import BackendError, UserError
from tests.helpers.models import TEXT

pytest.importorskip("onnxruntime_extensions", reason="the rehearsal runs the references as onnxruntime-extensions "
                                                    "Python ops (pip install 'accullm-export[rehearse]')")

from accullm_export.runtime.plugin_rehearsal import (PLUGIN_DOMAIN, RehearsalCausalLM,  # noqa: E402
                                                     RehearsalError, load_reference, rehearsal_model)
from accullm_export.validate.rehearsal import (TOLERANCES, RehearsalConfig, check_rehearsal,  # noqa: E402
                                               rehearse_bundle)

# fast predictor training and no distillation: the wiring, not the accuracy, is under test
TINY_RECIPE = dict(block_size=64, gptq_samples=4, sparsity=0.5, method="predictor", predictor_rank=8,
                   predictor_samples=2, predictor_steps=20)
SAMPLE_RECIPE = dict(block_size=64, gptq=False)  # the orin preset's form: outlier branches, dense MLPs
PROMPTS, NEW_TOKENS = 8, 64


def make_plugin_bundle(model_dir, profile, out, **recipe_keys) -> dict:
    """model/ (the TensorRT form of w4a16 with ``recipe_keys``) and model_plugins/ as the bundle writes it; returns
    the plugin op counts. The recipe keeps position 0 sparse like the plugin op (no dense first token)."""
    from accullm_export.build.bundle import _plugin_model
    from accullm_export.build.quantize import quantize_model
    from accullm_export.recipes.config import Recipe
    from accullm_export.recipes.presets import get_preset

    data = get_preset("w4a16").resolve("tensorrt").to_dict()
    data["distill"].update(steps=0, norms=False, outlier_rows=False)
    keys = {"block_size": ("weights", "block_size"), "gptq": ("gptq", "enabled"), "gptq_samples": ("gptq", "samples"),
            "sparsity": ("sparsity", "fraction"), "method": ("sparsity", "method"),
            "predictor_rank": ("sparsity", "predictor_rank"), "predictor_samples": ("sparsity", "predictor_samples"),
            "predictor_steps": ("sparsity", "predictor_steps")}
    for keyword, value in recipe_keys.items():
        section, key = keys[keyword]
        data[section][key] = value
    data["sparsity"]["dense_first_token"] = False
    out.mkdir(parents=True)
    quantize_model(str(model_dir), out / "model", Recipe.from_dict(data), profile)
    return _plugin_model(out / "model", out / "model_plugins")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def bundle(planted_model, profile, tmp_path_factory):
    folder, _ = planted_model
    out = tmp_path_factory.mktemp("rehearsal") / "bundle"
    fused = make_plugin_bundle(folder, profile, out, **TINY_RECIPE)
    assert fused.get("OutlierSplitGemm") and fused.get("SparseSkipMLP"), fused  # both ops are rehearsed
    return out


def _config(text_file, **overrides) -> RehearsalConfig:
    return RehearsalConfig(**{"text": str(text_file), "windows": 4, "seq_len": 48, "prompts": PROMPTS,
                              "new_tokens": NEW_TOKENS, **overrides})


def test_the_plugin_graph_matches_the_standard_graph(bundle, text_file):
    report = rehearse_bundle(bundle, _config(text_file))

    assert report["activations"] == "float32" and report["tolerances"] == TOLERANCES["float32"]
    assert report["plugin_ops"]["SparseSkipMLP"] == 2 and report["plugin_ops"]["OutlierSplitGemm"] >= 3
    logits = report["logits"]
    assert logits["max_abs_relative"] <= TOLERANCES["float32"]["max_abs_relative"]
    assert logits["kl_mean"] <= TOLERANCES["float32"]["kl_mean"]
    assert logits["top1_agreement"] == 1.0
    greedy = report["greedy"]
    assert len(greedy["prompts"]) == PROMPTS and len({row["prompt_tokens"] for row in greedy["prompts"]}) > 1
    for row in greedy["prompts"]:
        assert row["standard"] == row["plugins"] and len(row["plugins"]) == NEW_TOKENS
    assert report["passed"] and not report["failures"]
    check_rehearsal(report)


def test_int4_weights_reach_the_reference_as_their_stored_bytes(bundle):
    """The copy hands each int4 initializer over as its packed bytes; unpacked by the reference, they are the
    values ONNX reads (an independent decoder: onnx.numpy_helper)."""
    path = bundle / "model_plugins" / "model.onnx"
    original = onnx.load(str(path))
    copy = onnx.load_from_string(rehearsal_model(path).model)
    handed = {tensor.name: tensor for tensor in copy.graph.initializer}
    reference = load_reference("OutlierSplitGemm")
    plugin_inputs = {name for node in original.graph.node if node.domain == PLUGIN_DOMAIN for name in node.input}
    checked = 0
    for tensor in original.graph.initializer:
        if tensor.data_type != onnx.TensorProto.INT4 or tensor.name not in plugin_inputs:
            continue
        packed = handed[f"{tensor.name}/rehearsal_int4"]
        assert packed.data_type == onnx.TensorProto.UINT8
        values = numpy_helper.to_array(tensor)
        np.testing.assert_array_equal(reference.unpack_int4(numpy_helper.to_array(packed), values.shape), values)
        checked += 1
    assert checked >= 4
    assert not any(node.domain == PLUGIN_DOMAIN for node in copy.graph.node)


def test_float16_activations_and_absent_inputs_reach_the_references(tmp_path, rng):
    """A hand-built graph: float16 activations, an int4 OutlierSplitGemm and a blocked threshold SparseSkipMLP whose
    optional guesser inputs are absent; ONNX Runtime's outputs equal the references called directly."""
    from onnx import TensorProto, helper

    from accullm_export.runtime.plugin_rehearsal import _session

    hidden, outputs, intermediate = 64, 16, 32
    x = rng.standard_normal((2, 3, hidden)).astype(np.float16)
    gemm = dict(weight=rng.integers(-8, 8, (hidden, outputs)), scales=(rng.random((1, outputs)) * 0.1 + 0.01),
                channels=np.array([3, 40], np.int32), rows=rng.standard_normal((2, outputs)))
    mlp = dict(gate=rng.integers(-8, 8, (hidden, intermediate)), up=rng.integers(-8, 8, (hidden, intermediate)),
               down=rng.integers(-8, 8, (intermediate, hidden)), gate_scale=rng.random((2, intermediate)) * 0.05,
               up_scale=rng.random((2, intermediate)) * 0.05, down_scale=rng.random((1, hidden)) * 0.05)
    int4 = lambda name, values: helper.make_tensor(name, TensorProto.INT4, values.shape, values.ravel().tolist())
    half = lambda name, values: numpy_helper.from_array(np.asarray(values, np.float16), name)
    initializers = [int4("w", gemm["weight"]), half("s", gemm["scales"]),
                    numpy_helper.from_array(gemm["channels"], "c"), half("r", gemm["rows"]), int4("g", mlp["gate"]),
                    int4("u", mlp["up"]), int4("d", mlp["down"]),
                    numpy_helper.from_array(np.array(0.5, np.float32), "level"), half("gs", mlp["gate_scale"]),
                    half("us", mlp["up_scale"]), half("ds", mlp["down_scale"])]
    plugin = dict(domain=PLUGIN_DOMAIN, plugin_version="1", plugin_namespace=PLUGIN_DOMAIN)
    nodes = [helper.make_node("OutlierSplitGemm", ["x", "w", "s", "c", "r"], ["y"], name="gemm", bits=4, block_size=64,
                              **plugin),
             helper.make_node("SparseSkipMLP", ["x", "g", "u", "d", "level", "", "", "", "gs", "us", "ds"], ["z"],
                              name="mlp", method="threshold", block_size=32, **plugin)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, hidden])]
    graph = helper.make_graph(nodes, "plugins", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, None)], initializers)
    path = tmp_path / "plugins.onnx"
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))

    y, z = _session(rehearsal_model(path), "basic", None).run(["y", "z"], {"x": x})

    half_of = lambda values: np.asarray(values, np.float16)
    expected_y = load_reference("OutlierSplitGemm").outlier_split_gemm(
        x, gemm["weight"].astype(np.int8), half_of(gemm["scales"]), gemm["channels"], half_of(gemm["rows"]), bits=4,
        block_size=64)
    expected_z = load_reference("SparseSkipMLP").sparse_skip_mlp(
        x, mlp["gate"].astype(np.int8), mlp["up"].astype(np.int8), mlp["down"].astype(np.int8), np.float32(0.5),
        gate_scale=half_of(mlp["gate_scale"]), up_scale=half_of(mlp["up_scale"]),
        down_scale=half_of(mlp["down_scale"]), method="threshold", block_size=32)
    assert y.dtype == z.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), expected_y.astype(np.float32), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(z.astype(np.float32), expected_z.astype(np.float32), rtol=1e-3, atol=1e-3)
    assert np.abs(z).max() > 0 and not np.allclose(y, 0)


def _miswired(bundle, tmp_path, change) -> object:
    """A copy of the bundle whose model_plugins/ graph has ``change(nodes)`` applied (nodes: the plugin nodes)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / "model_plugins" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    change([node for node in model.graph.node if node.domain == PLUGIN_DOMAIN])
    onnx.save(model, str(path))
    return copy


def _attribute(node, name):
    return next(attribute for attribute in node.attribute if attribute.name == name)


def _swap_gate_and_up(nodes):
    mlp = next(node for node in nodes if node.op_type == "SparseSkipMLP")
    mlp.input[1], mlp.input[2] = mlp.input[2], mlp.input[1]  # same shapes: only the numbers can tell


def _swap_key_and_value_scales(nodes):
    key = next(node for node in nodes if node.name.endswith("self_attn/k_proj/MatMul/OutlierSplitGemm"))
    value = next(node for node in nodes if node.name.endswith("self_attn/v_proj/MatMul/OutlierSplitGemm"))
    key.input[2], value.input[2] = value.input[2], key.input[2]


def _threshold_method(nodes):
    _attribute(next(node for node in nodes if node.op_type == "SparseSkipMLP"), "method").s = b"threshold"


@pytest.mark.parametrize("change", [_swap_gate_and_up, _swap_key_and_value_scales, _threshold_method])
def test_a_miswired_plugin_graph_fails_the_comparison(bundle, text_file, tmp_path, change, capsys):
    miswired = _miswired(bundle, tmp_path, change)
    report = rehearse_bundle(miswired, _config(text_file, windows=2, new_tokens=16))

    assert not report["passed"] and report["failures"]
    assert report["logits"]["max_abs_relative"] > TOLERANCES["float32"]["max_abs_relative"]
    assert main(["rehearse", str(miswired), "--text", str(text_file), "--windows", "1", "--seq-len", "48",
                 "--new-tokens", "8"]) == 1
    assert "the plugin graph does not match the standard graph" in capsys.readouterr().err


def _int8_bits(nodes):
    _attribute(next(node for node in nodes if node.op_type == "OutlierSplitGemm"), "bits").i = 8


def _plugin_version_2(nodes):
    _attribute(nodes[0], "plugin_version").s = b"2"


@pytest.mark.parametrize("change,message", [(_int8_bits, "block_size must be 0"),
                                            (_plugin_version_2, "plugin_version is not '1'")])
def test_attributes_the_reference_refuses_name_the_node(bundle, tmp_path, change, message):
    miswired = _miswired(bundle, tmp_path, change)
    runner = RehearsalCausalLM(miswired / "model_plugins" / "model.onnx")
    with pytest.raises(RehearsalError, match=message):
        runner.full_logits(np.array([[5, 6, 7]]))


def test_the_cli_reports_and_exits_0(bundle, text_file, capsys):
    assert main(["rehearse", str(bundle), "--text", str(text_file), "--windows", "1", "--seq-len", "48",
                 "--prompts", "2", "--new-tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["greedy"]["identical"] == 2


def test_bad_input_exits_2_with_one_line(bundle, tmp_path, capsys, monkeypatch):
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    no_plugins = tmp_path / "standard-only"
    (no_plugins / "model").mkdir(parents=True)
    shutil.copy(bundle / "model" / "model.onnx", no_plugins / "model" / "model.onnx")
    for folder, message in ((not_a_bundle, "is not a deployment bundle"), (no_plugins, "has no model_plugins")):
        assert main(["rehearse", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime_extensions", None)  # as if not installed
    assert main(["rehearse", str(bundle)]) == 2
    assert "pip install 'accullm-export[rehearse]'" in capsys.readouterr().err


def test_the_kernel_backend_says_it_needs_a_gpu(bundle):
    with pytest.raises(BackendError, match="needs a GPU"):
        RehearsalCausalLM(bundle / "model_plugins" / "model.onnx", backend="kernels")


def test_a_model_without_plugin_nodes_is_refused(bundle):
    with pytest.raises(UserError, match="no accullm plugin node"):
        rehearsal_model(bundle / "model" / "model.onnx")


@pytest.mark.slow
def test_the_sample_plugin_graph_matches(tmp_path_factory):
    """SmolLM2-135M in the orin preset's TensorRT form (outlier branches, dense MLPs, so no selection level whose
    rounding could flip a neuron: see accullm_export.validate.rehearsal): 8 prompts, 64 greedy tokens."""
    from accullm_export.calibration.run import CalibrationConfig, calibrate
    from accullm_export.models.export import export_model
    from accullm_export.models.sample import sample_gguf_path

    try:
        sample_gguf_path("smollm2-135m")
    except UserError as error:
        pytest.skip(f"the sample model is not installed: {error}")
    root = tmp_path_factory.mktemp("sample-rehearsal")
    export_model("smollm2-135m", root / "onnx")
    calibrate(root / "onnx", root / "profile", CalibrationConfig(source="wiki", samples=8, seq_len=128))
    fused = make_plugin_bundle(root / "onnx", root / "profile", root / "bundle", **SAMPLE_RECIPE)
    assert fused.get("OutlierSplitGemm"), fused

    report = rehearse_bundle(root / "bundle", RehearsalConfig(windows=2, seq_len=128, prompts=PROMPTS,
                                                              new_tokens=NEW_TOKENS))

    assert report["greedy"]["identical"] == PROMPTS, report["failures"]
    assert report["passed"], report["failures"]
