"""``check-trt``: the TensorRT support table (accullm_export/targets/tensorrt_ops.toml) and the check against it, on
tiny exported decoders (fused and decomposed attention, quantized for TensorRT, with the plugin swap) and on
hand-made graphs that must fail for a stated reason."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from accullm_export.errors import UserError
from accullm_export.targets.tensorrt_support import (KNOWN_TENSORRT_VERSIONS, Finding, _table, check_model,
                                                     check_or_raise, parse_tensorrt_version)
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.models import TEXT, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- tiny decoders
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama exported both ways: {"fused": folder, "decomposed": folder}."""
    from accullm_export.models.export import export_model

    root = tmp_path_factory.mktemp("check-trt")
    hf = make_tiny_checkpoint(root / "hf", "llama")
    for attention in ("fused", "decomposed"):
        export_model(str(hf), root / attention, attention=attention)
    return {attention: root / attention for attention in ("fused", "decomposed")}


@pytest.fixture(scope="module")
def orin_bundle_models(tiny_llama, tmp_path_factory):
    """The decomposed model quantized with w4a16-fast for TensorRT, then as the Orin bundle writes it: the standard
    model with its scale Casts folded, and the plugin model."""
    from accullm_export.build.bundle import _plugin_model
    from accullm_export.build.quantize import quantize_model
    from accullm_export.calibration.run import CalibrationConfig, calibrate
    from accullm_export.recipes.presets import get_preset

    root = tmp_path_factory.mktemp("check-trt-quantized")
    (root / "text.txt").write_text(TEXT)
    calibrate(tiny_llama["decomposed"], root / "profile",
              CalibrationConfig(source=str(root / "text.txt"), samples=4, seq_len=40))
    quantize_model(tiny_llama["decomposed"], root / "quantized", get_preset("w4a16-fast").resolve("tensorrt"),
                   root / "profile")
    shutil.copytree(root / "quantized", root / "bundle/model")
    _fold_scale_casts(root / "bundle/model/model.onnx")
    fused = _plugin_model(root / "bundle/model", root / "bundle/model_plugins")
    return {"quantized": root / "quantized", "model": root / "bundle/model",
            "model_plugins": root / "bundle/model_plugins", "plugin_ops": fused}


def _fold_scale_casts(path: Path) -> None:
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.pipeline import run_passes

    graph, source = load_graph(path)
    graph, (report,), _ = run_passes(graph, [("fold_scale_casts", None)])
    assert report.nodes_removed.get("Cast")  # the folded form differs from the quantized one
    save_graph(graph, source, path, {})


def _by_op(findings: list[Finding]) -> dict[str, list[Finding]]:
    grouped: dict[str, list[Finding]] = {}
    for finding in findings:
        grouped.setdefault(finding.op, []).append(finding)
    return grouped


def test_fused_attention_fails_for_10_3_naming_each_attention_and_rotary_node(tiny_llama):
    findings = _by_op(check_model(tiny_llama["fused"], "10.3"))
    assert set(findings) == {"Attention", "RotaryEmbedding", "opset_import"}
    assert [f.node for f in findings["Attention"]] == [f"/model/layers.{i}/self_attn/Attention" for i in range(2)]
    assert all(f.reason == "added to the parser in 10.14" for f in findings["Attention"])
    assert len(findings["RotaryEmbedding"]) == 4  # q and k in each of 2 layers
    assert all(f.reason == "added to the parser in 10.15" for f in findings["RotaryEmbedding"])
    assert "opset 23 is outside TensorRT 10.3's parser range 9-21" in findings["opset_import"][0].reason
    assert str(findings["Attention"][0]) == ("/model/layers.0/self_attn/Attention (Attention: added to the parser "
                                             "in 10.14)")


def test_fused_attention_fails_for_11_1_on_the_kv_cache_it_carries(tiny_llama):
    """11.1 parses RotaryEmbedding and Attention, but not Attention's past/present cache or 3-D Q, K, V
    (onnx-tensorrt operators.md at 11.1): only the Attention nodes are named."""
    findings = check_model(tiny_llama["fused"], "11.1")
    assert {f.op for f in findings} == {"Attention"} and len(findings) == 2
    reason = findings[0].reason
    assert "input 4 (past_key_values.0.key) is unsupported" in reason
    assert "output 1 (present.0.key) is unsupported" in reason
    assert "input 0 has rank 3; TensorRT takes rank 4" in reason


def test_decomposed_attention_passes_for_every_known_version(tiny_llama):
    for version in KNOWN_TENSORRT_VERSIONS:
        assert check_model(tiny_llama["decomposed"], version) == [], version
    check_or_raise(tiny_llama["decomposed"], "10.3.0.30", "model.onnx")  # raises nothing


def test_orin_bundle_models_pass_for_10_3_and_11_1(orin_bundle_models):
    standard = onnx.load(str(orin_bundle_models["model"] / "model.onnx"), load_external_data=False)
    blocked = [node for node in standard.graph.node if node.op_type == "DequantizeLinear"
               and any(attribute.name == "block_size" and attribute.i for attribute in node.attribute)]
    assert blocked  # the INT4 block rules below ran on real nodes
    assert orin_bundle_models["plugin_ops"].get("OutlierSplitGemm")  # and the plugin rules on real plugin nodes
    for name in ("quantized", "model", "model_plugins"):
        for version in ("10.3", "11.1"):
            assert check_model(orin_bundle_models[name], version) == [], (name, version)


def test_a_plugin_model_with_a_changed_plugin_version_fails(orin_bundle_models, tmp_path):
    model = onnx.load(str(orin_bundle_models["model_plugins"] / "model.onnx"), load_external_data=False)
    node = next(node for node in model.graph.node if node.domain == "accullm")
    for attribute in node.attribute:
        if attribute.name == "plugin_version":
            attribute.s = b"2"
    findings = check_model(model, "10.3")
    assert [f.node for f in findings] == [node.name]
    assert findings[0].reason == "plugin_version '2'; the plugin library registers '1'"


# ------------------------------------------------------------------------------------------ hand-made graphs
def _model(nodes, inputs, outputs, initializers=(), opset=21, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(domain, 1) for domain in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _int4_weight(name="w", shape=(4, 8)):
    return helper.make_tensor(name, TensorProto.INT4, shape, np.ones(int(np.prod(shape)), dtype=np.int8).tolist())


def _dequantize(scale_input: bool = False, zero_point=None, weight_input: bool = False):
    """An INT4 block DequantizeLinear (block 4 along axis 0) feeding a MatMul; variants break one rule each."""
    inits = [] if weight_input else [_int4_weight()]
    inputs = [_float("x", [2, 4])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.INT4, [4, 8]))
    if scale_input:
        inputs.append(_float("scale", [1, 8]))
    else:
        inits.append(numpy_helper.from_array(np.full((1, 8), 0.5, np.float32), "scale"))
    dq_inputs = ["w", "scale"]
    if zero_point is not None:
        inits.append(helper.make_tensor("zp", TensorProto.INT4, [1, 8], [zero_point] * 8))
        dq_inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["wf"], "dq", axis=0, block_size=4),
             helper.make_node("MatMul", ["x", "wf"], ["y"], "matmul")]
    return _model(nodes, inputs, [_float("y", [2, 8])], inits)


def test_int4_block_dequantize_rules():
    assert check_model(_dequantize(), "10.3") == []
    assert check_model(_dequantize(zero_point=0), "10.3") == []
    (finding,) = check_model(_dequantize(scale_input=True), "10.3")
    assert (finding.node, finding.reason) == ("dq", "input 1 (scale) must be a build-time constant")
    (finding,) = check_model(_dequantize(zero_point=1), "11.1")
    assert finding.reason == "input 2 (zp) must be all zeros (symmetric quantization only)"
    (finding,) = check_model(_dequantize(weight_input=True), "10.3")
    assert "input 0 is INT4, which TensorRT takes for weights only" in finding.reason


def test_block_quantization_of_int8_fails():
    weight = numpy_helper.from_array(np.ones((4, 8), np.int8), "w")
    scale = numpy_helper.from_array(np.full((1, 8), 0.5, np.float32), "scale")
    model = _model([helper.make_node("DequantizeLinear", ["w", "scale"], ["y"], "dq", axis=0, block_size=4)],
                   [], [_float("y", [4, 8])], [weight, scale])
    (finding,) = check_model(model, "10.3")
    assert finding.reason == "block quantization (block_size 4) is INT4 only; input 0 is INT8"


def test_an_op_the_version_lacks_fails_until_the_version_that_added_it():
    model = _model([helper.make_node("RMSNormalization", ["x", "g"], ["y"], "norm")], [_float("x", [2, 8])],
                   [_float("y", [2, 8])], [numpy_helper.from_array(np.ones(8, np.float32), "g")], opset=23)
    (finding,) = check_model(model, "10.14")
    assert (finding.node, finding.op, finding.reason) == ("norm", "RMSNormalization", "added to the parser in 10.15")
    assert check_model(model, "10.15") == []


def test_an_op_no_version_parses_and_a_dtype_outside_the_matrix_fail():
    unique = _model([helper.make_node("Unique", ["x"], ["y"], "unique")], [_float("x", [4])], [_float("y", [None])])
    (finding,) = check_model(unique, "11.1")
    assert finding.reason.startswith("no importer in TensorRT 11.1's ONNX parser")
    ints = [helper.make_tensor_value_info(name, TensorProto.INT32, [2, 2]) for name in ("a", "b", "c")]
    matmul = _model([helper.make_node("MatMul", ["a", "b"], ["c"], "mm")], ints[:2], ints[2:])
    (finding,) = check_model(matmul, "10.3")
    assert finding.reason.startswith("input 0 is INT32; TensorRT 10.3 takes FP32, FP16, BF16; input 1 is INT32")


def test_an_opset_above_the_parser_range_fails():
    model = _model([helper.make_node("Relu", ["x"], ["y"], "relu")], [_float("x", [2])], [_float("y", [2])], opset=22)
    (finding,) = check_model(model, "10.3")
    assert (finding.node, finding.reason) == ("(model)", "opset 22 is outside TensorRT 10.3's parser range 9-21")
    assert check_model(model, "10.14") == []


def test_an_op_form_newer_than_the_importer_fails():
    """Opset-21 GroupNormalization (per-channel scale and bias) is parsed from 10.9 on (CHANGELOG.md)."""
    weights = [numpy_helper.from_array(np.ones(4, np.float32), name) for name in ("scale", "bias")]
    model = _model([helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], "gn", num_groups=2)],
                   [_float("x", [1, 4, 8])], [_float("y", [1, 4, 8])], weights, opset=21)
    (finding,) = check_model(model, "10.3")
    assert finding.reason == "the opset-21 form is not parsed by TensorRT 10.3 (it takes opset 18-18 forms)"
    assert check_model(model, "10.14") == []


def test_axes_that_are_not_an_initializer_fail():
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], "mean")], [_float("x", [2, 4]), axes],
                   [_float("y", None)])
    (finding,) = check_model(model, "11.1")
    assert finding.reason == "input 1 (axes) must be an initializer"


def _plugin_node(domain="accullm", **attributes):
    values = {"plugin_version": "1", "plugin_namespace": "accullm", **attributes}
    values = {key: value for key, value in values.items() if value is not None}
    node = helper.make_node("OutlierSplitGemm", ["x"], ["y"], "plugin", domain=domain, **values)
    return _model([node], [_float("x", [2, 8])], [_float("y", [2, 8])], extra_opsets=[domain])


def test_plugin_ops_are_checked_for_name_version_namespace_and_domain():
    assert check_model(_plugin_node(), "10.3") == []
    (finding,) = check_model(_plugin_node(plugin_version="2"), "10.3")
    assert finding.reason == "plugin_version '2'; the plugin library registers '1'"
    (finding,) = check_model(_plugin_node(domain="com.example"), "10.3")
    assert finding.reason == "domain 'com.example'; the accullm plugins use 'accullm'"
    # without plugin_namespace the parser looks in namespace "" before 10.10, in the node's domain from 10.10 on
    (finding,) = check_model(_plugin_node(plugin_namespace=None), "10.3")
    assert finding.reason == "plugin namespace ''; the plugin library registers 'accullm'"
    assert check_model(_plugin_node(plugin_namespace=None), "10.14") == []


def test_an_unknown_custom_domain_op_fails():
    node = helper.make_node("MatMulNBits", ["x"], ["y"], "nbits", domain="com.microsoft")
    model = _model([node], [_float("x", [2, 8])], [_float("y", [2, 8])], extra_opsets=["com.microsoft"])
    (finding,) = check_model(model, "11.1")
    assert (finding.domain, finding.op) == ("com.microsoft", "MatMulNBits")
    assert finding.reason.startswith("custom op in domain 'com.microsoft': TensorRT imports it only as a plugin")
    assert str(finding).startswith("nbits (com.microsoft::MatMulNBits: custom op")


def test_attention_without_a_cache_passes_for_11_1():
    """The Attention rules fail the exporter's cached form, not Attention itself."""
    shape = [1, 4, 3, 16]
    model = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], "attention")],
                   [_float(name, shape) for name in "qkv"], [_float("y", shape)], opset=23)
    assert check_model(model, "11.1") == []
    assert check_model(model, "10.3")[-1].reason == "added to the parser in 10.14"


# ------------------------------------------------------------------------------------- the table and versions
def test_versions_parse_and_unknown_ones_list_the_known():
    assert [parse_tensorrt_version(text) for text in ("10.3", "10.3.0", "10.3.0.30", "11.1")] == ["10.3", "10.3",
                                                                                                 "10.3", "11.1"]
    for bad in ("10.4", "10", "ten", "10.3.0.30.1"):
        with pytest.raises(UserError, match="the support table knows 10.3, 10.14, 10.15, 10.16, 11.1"):
            parse_tensorrt_version(bad)


def test_every_table_entry_cites_a_known_source_and_changes_in_version_order():
    table = _table()
    sources = set(table["sources"])
    entries = ([("version " + name, entry) for name, entry in table["versions"].items()]
               + [("op " + name, entry) for name, entry in table["ops"].items()]
               + [("plugin " + name, entry) for name, entry in table["plugins"].items()])
    for label, entry in entries:
        cited = [part.strip() for part in entry["source"].split(",")]
        assert cited and set(cited) <= sources, (label, cited)
        for change in entry.get("changes", ()):
            assert change["source"] in sources, label
    for name, entry in table["versions"].items():
        assert 9 <= entry["opset_min"] <= entry["opset_max"], name


def _load_reference(path: Path):
    spec = importlib.util.spec_from_file_location(f"reference_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_entries_match_the_plugin_sources():
    """The table's plugin ops are the ones plugins/*/reference.py and the C++ headers define, and the ones the
    swap passes write."""
    from accullm_export.graph.passes import PLUGIN_ATTRIBUTES, PLUGIN_DOMAIN

    plugins = _table()["plugins"]
    references = sorted((REPO / "plugins").glob("*/reference.py"))
    assert references
    namespace = re.search(r'kPLUGIN_NAMESPACE = "([^"]+)"', (REPO / "plugins/common/accullmPlugin.h").read_text())
    for path in references:
        reference = _load_reference(path)
        entry = plugins[reference.OP_TYPE]
        assert (entry["domain"], entry["version"]) == (reference.DOMAIN, str(reference.VERSION)), path
        assert entry["namespace"] == namespace.group(1) == PLUGIN_ATTRIBUTES["plugin_namespace"]
        assert entry["domain"] == PLUGIN_DOMAIN and entry["version"] == PLUGIN_ATTRIBUTES["plugin_version"]
        header = next(path.parent.glob("*Plugin.h")).read_text()
        assert re.search(rf'_NAME = "{reference.OP_TYPE}"', header)
        assert re.search(rf'_VERSION = "{entry["version"]}"', header)
    assert len(plugins) == len(references)


# -------------------------------------------------------------------------------------------------- the CLI
def test_cli_reports_a_failing_model_on_one_stderr_line_and_each_node_on_stdout(tiny_llama, capsys):
    code, out, err = run_cli(capsys, "check-trt", str(tiny_llama["fused"]), "--tensorrt-version", "10.3")
    assert_user_error(code, err, "7 nodes TensorRT 10.3 cannot parse: (model) (opset_import: opset 23")
    assert "... and 4 more" in err
    assert len(out.splitlines()) == 7 and "/model/layers.1/self_attn/Attention (Attention: added to the parser " \
                                            "in 10.14)" in out


def test_cli_json_report_and_ok_line(tiny_llama, capsys):
    code, out, err = run_cli(capsys, "check-trt", str(tiny_llama["fused"]), "--tensorrt-version", "11.1.0", "--json")
    report = json.loads(out)
    assert code == 2 and not report["ok"] and report["tensorrt_version"] == "11.1"
    assert [finding["op"] for finding in report["findings"]] == ["Attention", "Attention"]
    code, out, err = run_cli(capsys, "check-trt", str(tiny_llama["decomposed"]))  # default: 10.3
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1 and "model.onnx: ok for TensorRT 10.3 (" in out and "opset 21)" in out


def test_cli_refuses_an_unknown_version_and_a_missing_model(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(capsys, "check-trt", str(tiny_llama["decomposed"]), "--tensorrt-version", "10.4")
    assert_user_error(code, err, "unknown TensorRT version '10.4'; the support table knows 10.3, 10.14, 10.15")
    code, _, err = run_cli(capsys, "check-trt", str(tmp_path / "missing.onnx"))
    assert_user_error(code, err, "missing.onnx: no such ONNX file")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    code, _, err = run_cli(capsys, "check-trt", str(tmp_path / "junk.onnx"))
    assert_user_error(code, err, "junk.onnx: not an ONNX model")
