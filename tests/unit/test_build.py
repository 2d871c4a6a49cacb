"""targets, build --target: the registry, the CPU pipeline end to end, the TensorRT bundle, clear errors."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import onnx
import pytest

from accullm_export.build.pipeline import BuildOptions, build, for_plain_onnx
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.recipes.presets import get_preset
from accullm_export.recipes.toml_io import dump_toml
from accullm_export.targets import TARGETS, get_target
from accullm_export.targets.roofline import bytes_per_token
from accullm_export.targets.tensorrt_support import check_model, parse_tensorrt_version
from tests.helpers.recipes import make_recipe

# the tiny planted Llama: small calibration and validation (its text is the fixture's .txt)
SMALL = dict(calib_samples=4, calib_seq_len=40, validation_windows=2, validation_seq_len=32, validation_prompts=1,
             gates={"max-kl": 5.0})


def test_target_registry():
    assert {"orin", "orin-nx", "orin-nano", "thor", "ampere", "ada", "hopper", "cpu"} <= set(TARGETS)
    orin = get_target("orin")
    assert orin.cuda_arch == "87" and orin.dla_cores == 2 and orin.bandwidth_gbps == pytest.approx(204.8)
    assert "fp8" not in orin.precisions and "int4" in orin.precisions
    assert get_target("orin-nano").dla_cores == 0 and get_target("hopper").cuda_arch == "90"
    assert "fp8" in get_target("hopper").precisions
    # every TensorRT target names a TensorRT version the support table knows (JetPack 6's for the Orins)
    for target in TARGETS.values():
        assert (target.tensorrt_version is None) == (target.backend != "tensorrt"), target.name
        if target.tensorrt_version:
            assert parse_tensorrt_version(target.tensorrt_version) == target.tensorrt_version
    assert {get_target(name).tensorrt_version for name in ("orin", "orin-nx", "orin-nano")} == {"10.3"}
    # roofline: bytes per token over bandwidth
    assert orin.decode_ceiling(204_800_000) == pytest.approx(1000.0)
    with pytest.raises(UserError, match="unknown target 'tpu'"):
        get_target("tpu")
    with pytest.raises(UserError, match="no FP8 support"):
        orin.check_recipe("fp8")
    get_target("hopper").check_recipe("w4a16")


def test_targets_cli(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "orin" in out and "204.8 GB/s" in out and "hopper" in out
    assert main(["targets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["name"] for entry in listed} == set(TARGETS)


def test_bytes_per_token_counts_one_embedding_row(tmp_path):
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["h"]),
                               helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [table, weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert bytes_per_token(tmp_path / "m.onnx") == 8 * 4 + 8 * 4 * 4


def test_build_cpu_end_to_end(planted_model, tmp_path):
    """No recipe given: the cpu target's default preset in its ONNX Runtime form, recorded in the manifest, and a
    model whose graph shows what that preset asks for."""
    from accullm_export.graph.layer_plan import override_matches
    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    folder, text = planted_model
    target = get_target("cpu")
    preset = get_preset(target.default_preset).resolve(target.backend)
    manifest = build(str(folder), tmp_path / "out", BuildOptions(target="cpu", calib=str(text), **SMALL))
    assert manifest["recipe"] == preset.to_dict()
    assert manifest["status"] == "ok" and manifest["deliverable"]["kind"] == "onnxruntime-folder"
    assert [step["name"] for step in manifest["steps"]] == ["export", "calibrate", "quantize", "validate", "target"]
    assert all(gate["passed"] for gate in manifest["accuracy"]["gates"]) and manifest["accuracy"]["gates"]
    assert {"kl_mean", "top1_agreement", "ppl_delta_pct"} <= set(manifest["accuracy"]["metrics"])
    assert manifest["roofline"]["decode_ceiling_tokens_per_s"] > 0
    out = tmp_path / "out"
    assert (out / "validation/report.json").is_file() and (out / "model/genai_config.json").is_file()
    model = OrtCausalLM.from_path(out / "model", device="cpu")
    assert len(generate(model, [[1, 5, 9]], GenerationConfig(max_new_tokens=4)).tokens[0]) == 4
    graph_nodes = onnx.load(str(out / "model/model.onnx"), load_external_data=False).graph.node
    nodes = {node.op_type for node in graph_nodes}
    quantized = json.loads((out / "model/manifest.json").read_text())
    layers = quantized["layers"]
    # the quantize step ran the preset: only "auto" is resolved, to a twelfth of the head's 256 rows
    expected = preset.to_dict()
    expected["vocab"]["refine_rows"] = 256 // 12 if preset.vocab.refine_rows == "auto" else preset.vocab.refine_rows
    assert quantized["recipe"] == expected
    assert preset.weights.precision == "int4" and "DequantizeLinear" in nodes
    assert {layer["block_size"] for layer in layers if layer["precision"] == "int4"} == {preset.weights.block_size}
    if preset.graph.onnxruntime_fusions:  # ONNX Runtime's contrib ops
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= nodes
        assert not {"Attention", "RotaryEmbedding"} & nodes
    if preset.outliers.planes:  # outlier rows folded into the INT4 weights
        assert any("folded into their INT4 weights as two planes" in note for note in quantized["notes"])
    rotated = [layer["node"] for layer in layers if layer["rotation"]]  # e.g. the LM head
    assert rotated == [layer["node"] for layer in layers
                       if any(override_matches(pattern, layer["node"]) for pattern in preset.rotation.layers)]
    assert bool(rotated) == bool(preset.rotation.layers)
    assert ("ScatterElements" in nodes) == bool(preset.vocab.refine_rows)  # the refined vocabulary rows
    if "residual" in preset.outliers.layers:  # branches where the residual stream enters, not after attention/MLP
        assert any(layer["outliers"] for layer in layers)
        assert not any(layer["outliers"] for layer in layers
                       if "o_proj" in layer["node"] or "down_proj" in layer["node"])


def _config(tmp_path, name: str, data: dict) -> str:
    """A --config file holding ``data``."""
    path = tmp_path / name
    path.write_text(dump_toml(data))
    return str(path)


def test_build_cpu_distills_on_request(planted_model, tmp_path, capsys):
    """The w4a16 preset with distill.steps from a config file trains with the cpu form's passes; a preset without
    distillation does not."""
    folder, text = planted_model
    small = dict(SMALL, calib_samples=6)
    plain = build(str(folder), tmp_path / "plain", BuildOptions(
        target="cpu", recipe=get_preset("w4a16-fast").resolve("onnxruntime"), calib=str(text), **small))
    data = get_preset("w4a16").resolve("onnxruntime").to_dict()
    data["distill"]["steps"] = 20
    config = _config(tmp_path, "distill.toml", data)
    code = main(["build", str(folder), "--target", "cpu", "-o", str(tmp_path / "distilled"), "--calib", str(text),
                 "--calib-samples", "6", "--calib-seq-len", "40", "--validation-windows", "2",
                 "--validation-seq-len", "32", "--block-size", "64", "--max-kl", "5", "--config", config])
    assert code == 0, capsys.readouterr().err
    distilled = json.loads((tmp_path / "distilled/manifest.json").read_text())
    assert distilled["recipe"]["distill"]["steps"] == 20 and plain["recipe"]["distill"]["steps"] == 0
    recipe = json.loads((tmp_path / "distilled/model/manifest.json").read_text())["recipe"]
    assert recipe["distill"]["steps"] == 20  # the config's training, with the cpu form's passes
    assert recipe["distill"]["norms"] and recipe["distill"]["outlier_rows"]
    assert recipe["vocab"]["refine_rows"] and recipe["outliers"]["planes"]
    notes = json.loads((tmp_path / "distilled/model/manifest.json").read_text())["notes"]
    note = next(note for note in notes if note.startswith("distill_scales"))
    assert "20 steps on 5 calibration windows" in note  # one of the 6 is held out (kept or not: the tiny
    # model's build is already close, so training may not lower its held-out KL; test_distill covers training)
    plain_recipe = json.loads((tmp_path / "plain/model/manifest.json").read_text())
    assert not plain_recipe["recipe"]["distill"]["steps"]
    assert not any(note.startswith("distill_scales") for note in plain_recipe["notes"])


def test_build_refuses_distillation_it_cannot_do(planted_model, tmp_path, capsys):
    folder, text = planted_model
    for name, data, message in (
            ("w8a8", {"weights": {"precision": "int8"}, "activations": {"mode": "dynamic"}, "distill": {"steps": 5}},
             "distill.steps: trains weight-only INT4 block scales"),
            ("negative", {"distill": {"steps": -1}}, "distill.steps: must be 0 (off) or positive")):
        out = tmp_path / name
        config = _config(tmp_path, f"{name}.toml", data)
        assert main(["build", str(folder), "--target", "cpu", "-o", str(out), "--config", config]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_build_orin_writes_a_bundle(planted_model, tmp_path, capsys):
    folder, text = planted_model
    data = get_preset("w4a16").resolve("tensorrt").to_dict()  # the orin target's preset, distilling briefly
    data["distill"]["steps"] = 5
    data["sparsity"].update(predictor_rank=8, predictor_samples=2, predictor_steps=20)
    config = _config(tmp_path, "orin.toml", data)
    code = main(["build", str(folder), "--target", "orin", "-o", str(tmp_path / "orin"), "--calib", str(text),
                 "--calib-samples", "4", "--calib-seq-len", "40", "--validation-windows", "2",
                 "--validation-seq-len", "32", "--block-size", "64", "--max-kl", "5", "--sparsity", "0.5",
                 "--method", "predictor", "--config", config])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "deployment bundle: on the Jetson AGX Orin 64GB run `bash" in out
    bundle = tmp_path / "orin/bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("model/model.onnx", "profile/manifest.json", "validation/report.json", "plugins/CMakeLists.txt",
                 "build_engine.sh"):
        assert (bundle / name).is_file(), name
        assert name in manifest["files"] or name == "manifest.json"
    script = (bundle / "build_engine.sh").read_text()
    assert subprocess.run(["bash", "-n", str(bundle / "build_engine.sh")]).returncode == 0
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in script and "--dynamicPlugins=" in script
    assert "--minShapes=input_ids:1x1" in script and "--fp16" in script
    # the plugin model: sparse MLPs and outlier layers swapped for the accullm ops, standard model kept too
    assert manifest["plugin_ops"].get("SparseSkipMLP") == 2
    plugin_model = onnx.load(str(bundle / "model_plugins/model.onnx"), load_external_data=False)
    assert any(entry.domain == "accullm" for entry in plugin_model.opset_import)
    assert not any(node.op_type == "Compress" for node in plugin_model.graph.node)
    standard = onnx.load(str(bundle / "model/model.onnx"), load_external_data=False)
    assert not any(node.domain == "accullm" for node in standard.graph.node)
    scale_inputs = {node.input[1] for node in standard.graph.node if node.op_type == "DequantizeLinear"}
    assert scale_inputs and scale_inputs <= {t.name for t in standard.graph.initializer}  # Casts folded for TRT
    assert not any(node.op_type == "Split" for node in standard.graph.node)  # TensorRT targets skip merging
    recipe = json.loads((bundle / "model/manifest.json").read_text())["recipe"]
    assert recipe["weights"]["asymmetric"]  # lowered: TensorRT's Dequantize takes zero points of 0 only
    assert any("asymmetric INT4 layers as signed INT4 plus a block offset term" in note
               for note in json.loads((bundle / "model/manifest.json").read_text())["notes"])
    assert recipe["weights"]["scale_bits"] == 16 and recipe["outliers"]["bits"] == 16  # what TensorRT and its
    # plugin take
    assert not recipe["rotation"]["layers"]  # the OutlierSplitGemm swap takes the plain head
    assert not recipe["vocab"]["refine_rows"]  # the vocabulary refinement is an ONNX Runtime target's
    assert recipe["distill"]["steps"] == 5 and recipe["distill"]["outlier_rows"]  # trained FP16 scales and rows
    assert recipe["sparsity"]["fraction"] == 0.5 and recipe["sparsity"]["method"] == "predictor"
    assert not any(node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]
                   and "block_size" in {a.name for a in node.attribute} for node in standard.graph.node)
    # lowered for the target's TensorRT: opset 23's attention ops gone, and TensorRT 10.3's parser takes the rest
    assert manifest["tensorrt_version"] == "10.3" and "BUNDLE_TENSORRT=10.3" in script
    assert json.loads((tmp_path / "orin/manifest.json").read_text())["tensorrt_version"] == "10.3"
    for model in (standard, plugin_model):
        assert not {node.op_type for node in model.graph.node} & {"Attention", "RotaryEmbedding"}
        assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {21}
    assert check_model(bundle / "model_plugins/model.onnx", "10.3") == []  # what trtexec builds
    # the standard model keeps the sparse MLPs' Compress nodes, which only the plugin replaces
    assert {finding.op for finding in check_model(bundle / "model/model.onnx", "10.3")} == {"Compress"}
    assert manifest["standard_model_unparsed_nodes"] == len(check_model(bundle / "model/model.onnx", "10.3"))
    # the dress rehearsal of what trtexec builds: the lowered plugin graph, its ops run by their references,
    # against the lowered standard graph (sparse MLPs included: the TensorRT form keeps no dense first token)
    from accullm_export.validate.rehearsal import RehearsalConfig, rehearse_bundle

    for copy in (bundle / "plugins").rglob("reference.py"):  # a bundle is data: its copies of the references
        copy.write_text("raise SystemExit('the bundle ran code')\n")  # are never imported
    rehearsal = rehearse_bundle(bundle, RehearsalConfig(text=str(text), windows=2, seq_len=32, prompts=4,
                                                        prompt_tokens=8, new_tokens=16))
    assert rehearsal["passed"], rehearsal["failures"]
    assert rehearsal["plugin_ops"].get("SparseSkipMLP") == 2
    assert rehearsal["greedy"]["identical"] == 4 and rehearsal["greedy"]["new_tokens"] == 16
    # every file the plugin sources include travelled with them
    for source in (bundle / "plugins").rglob("*"):
        if source.suffix in (".cu", ".cuh", ".h", ".cpp"):
            for included in re.findall(r'^#include "([^"]+)"', source.read_text(), flags=re.M):
                assert (source.parent / included).is_file(), f"{source.name} includes {included}"


def test_build_errors(planted_model, tmp_path, capsys):
    folder, text = planted_model
    assert main(["build", str(folder), "--target", "tpu", "-o", str(tmp_path / "a")]) == 2
    assert "unknown target 'tpu'" in capsys.readouterr().err
    assert main(["build", str(folder), "--target", "orin", "--recipe", "fp8", "-o", str(tmp_path / "b")]) == 2
    assert "unknown preset 'fp8'" in capsys.readouterr().err  # no FP8 recipe (check_recipe: test_target_registry)
    assert main(["build", str(folder), "--target", "orin", "--tensorrt-version", "9.9", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT version '9.9'" in err and "10.3" in err and "11.1" in err  # it lists the known ones
    assert main(["build", str(folder), "--target", "cpu", "--tensorrt-version", "10.3", "-o", str(tmp_path / "d")]) == 2
    assert "--tensorrt-version applies to TensorRT targets" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_failed_gate_keeps_the_work_and_exits_1(planted_model, tmp_path, capsys):
    folder, text = planted_model
    code = main(["build", str(folder), "--target", "cpu", "-o", str(tmp_path / "gated"), "--calib", str(text),
                 "--calib-samples", "4", "--calib-seq-len", "40", "--validation-windows", "2",
                 "--validation-seq-len", "32", "--preset", "w4a16-fast", "--max-kl", "0"])  # INT4 never has KL 0
    assert code == 1
    manifest = json.loads((tmp_path / "gated/manifest.json").read_text())
    assert manifest["status"] == "failed-gates" and manifest["deliverable"] is None
    assert (tmp_path / "gated/validation/report.json").is_file() and not (tmp_path / "gated/model").exists()


def test_engine_files_are_checked(tmp_path):
    from accullm_export.runtime.engine_file import check_engine_file, engine_record

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(UserError, match="not built by accullm-export"):
        check_engine_file(engine)
    record = engine_record(engine.read_bytes(), "10.9.0", get_target("orin"), None)
    (tmp_path / "engine.json").write_text(json.dumps(record))
    assert check_engine_file(engine)["target"] == "orin"
    engine.write_bytes(b"not really an engine, truncated or edited")
    with pytest.raises(UserError, match="corrupted"):
        check_engine_file(engine)


def test_tensorrt_absence_is_reported():
    from accullm_export.build.engine import tensorrt_available

    available, reason = tensorrt_available()
    if available:
        pytest.skip(f"TensorRT {reason} and a GPU are present: the absence path cannot be observed")
    assert "tensorrt" in reason or "CUDA" in reason


def test_validate_and_generate_check_an_engine_first(planted_model, tmp_path, capsys):
    from accullm_export.build.engine import tensorrt_available
    from accullm_export.runtime.engine_file import engine_record

    folder, _ = planted_model
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)
    assert main(["validate", str(folder), str(engine)]) == 2
    assert "not built by accullm-export" in capsys.readouterr().err
    (tmp_path / "engine.json").write_text(json.dumps(engine_record(engine.read_bytes(), "10.9", get_target("orin"),
                                                                   None)))
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is present: the missing-backend error cannot be observed")
    assert main(["generate", str(engine), "hi", "--max-new-tokens", "2"]) == 3
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err or "needs TensorRT" in err or "torch" in err


def test_python_sample_without_tensorrt():
    import sys
    from pathlib import Path

    from accullm_export.build.engine import tensorrt_available

    sample = Path(__file__).resolve().parents[2] / "samples/python/generate_trt.py"
    help_run = subprocess.run([sys.executable, str(sample), "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "--plugins" in help_run.stdout
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is present: the missing-backend message cannot be observed")
    run = subprocess.run([sys.executable, str(sample), "missing.engine", "hi"], capture_output=True, text=True)
    assert run.returncode == 3 and ("not installed" in run.stderr or "no CUDA GPU" in run.stderr)


def test_build_a_plain_onnx_model_with_a_load_data_script(tmp_path):
    """Not an LLM: calibrated through a load_data() script and validated through Polygraphy."""
    from tests.helpers.graphs import make_mlp

    model = make_mlp(tmp_path / "mlp.onnx")
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    rng = np.random.default_rng(0)\n"
                      "    for _ in range(4):\n        yield {'x': rng.standard_normal((16, 8)).astype(np.float32)}\n")
    # w8a8 with one dynamic scale per token: the MLP's 8 input channels take no 32-channel group (the w8a8 preset's)
    w8a8 = make_recipe(name="w8a8", activations="dynamic")
    manifest = build(str(model), tmp_path / "out", BuildOptions(target="cpu", recipe=w8a8, calib=str(script),
                                                                calib_samples=4))
    assert manifest["status"] == "ok" and manifest["deliverable"]["kind"] == "onnxruntime-folder"
    gates = manifest["accuracy"]["gates"]
    assert [gate["name"] for gate in gates] == ["polygraphy"] and gates[0]["passed"]
    assert (tmp_path / "out/model/model.onnx").is_file()
    bundle = build(str(model), tmp_path / "trt", BuildOptions(
        target="hopper", recipe=get_preset("w8a8-static").resolve("tensorrt"), calib=str(script), calib_samples=4))
    script_text = (tmp_path / "trt/bundle/build_engine.sh").read_text()
    ops = {node.op_type for node in onnx.load(str(tmp_path / "trt/bundle/model/model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "MatMulInteger" not in ops  # TensorRT takes static per-tensor Q/DQ
    ops = {node.op_type for node in onnx.load(str(tmp_path / "out/model/model.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops  # ONNX Runtime: 8-bit MatMulNBits, INT8 inputs
    assert bundle["deliverable"]["kind"] == "tensorrt-bundle" and "--int8" in script_text
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in script_text or "needs no accullm plugin" in script_text
    # the w4a16 preset on a model that is no decoder: its decoder-only keys (residual readers, distillation, the
    # LM head's rotation and refinement) are dropped, the rest builds
    w4a16 = get_preset("w4a16").resolve("onnxruntime")
    plain = build(str(model), tmp_path / "w4", BuildOptions(target="cpu", recipe=w4a16, calib=str(script),
                                                            calib_samples=4))
    assert plain["status"] == "ok" and plain["recipe"] == for_plain_onnx(w4a16).to_dict()
    assert not plain["recipe"]["distill"]["steps"] and not plain["recipe"]["rotation"]["layers"]
    assert not plain["recipe"]["vocab"]["refine_rows"] and "residual" not in plain["recipe"]["outliers"]["layers"]
    assert plain["recipe"]["weights"] == w4a16.to_dict()["weights"]
    with pytest.raises(UserError, match="is not an exported decoder"):  # text calibration needs a decoder
        build(str(model), tmp_path / "distilled", BuildOptions(target="cpu", recipe=w4a16, calib="wiki",
                                                               calib_samples=4))
    assert not (tmp_path / "distilled").exists()


def test_engine_profiles_take_a_golden_verifiers_pass(planted_model):
    """Prefill runs on an empty cache; the decode profile, tuned for one token, also takes a golden verifier's
    pass over the most draft tokens on a cache of any length up to the context (its mask one position per token
    longer)."""
    from accullm_export.build.engine import VERIFY_TOKENS, shape_profiles
    from accullm_export.runtime.speculative import MAX_DRAFT_TOKENS

    folder, _ = planted_model
    prefill, decode = shape_profiles(folder / "model.onnx", max_batch=2, max_seq_len=256)
    assert VERIFY_TOKENS == MAX_DRAFT_TOKENS + 1
    assert prefill["input_ids"] == ((1, 1), (1, 128), (2, 256))
    assert {shape[2] for shape in prefill["past_key_values.0.key"]} == {0}
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, VERIFY_TOKENS))
    assert [shape[2] for shape in decode["past_key_values.0.key"]] == [0, 128, 255]
    assert decode["attention_mask"] == ((1, 1), (1, 129), (2, 255 + VERIFY_TOKENS))
