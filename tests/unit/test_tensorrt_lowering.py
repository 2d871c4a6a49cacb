"""Lowering for a TensorRT version: opset 23's attention ops rewritten into opset-21 ops with the same outputs, the
forms the pass cannot lower left alone, and build_engine.sh's check of the device's TensorRT version."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from accullm_export.build.bundle import build_script, trtexec_command
from accullm_export.build.lowering import runs_on
from accullm_export.graph.ir import load_graph, save_graph
from accullm_export.graph.pipeline import run_passes
from accullm_export.targets import get_target
from tests.helpers.models import TINY_ARCHITECTURES, make_tiny_checkpoint

SHARED_TENSORRT = Path(__file__).resolve().parents[3] / "shared" / "tensorrt"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """model_type -> (fused fp32 export, decomposed fp32 export, fused fp16 export)."""
    from accullm_export.models.export import export_model

    root = tmp_path_factory.mktemp("lowering")
    made = {}
    for model_type in TINY_ARCHITECTURES:
        hf = make_tiny_checkpoint(root / f"{model_type}-hf", model_type)
        folders = []
        for attention, dtype in (("fused", "fp32"), ("decomposed", "fp32"), ("fused", "fp16")):
            folder = root / f"{model_type}-{attention}-{dtype}"
            export_model(str(hf), folder, attention=attention, dtype=dtype)
            folders.append(folder / "model.onnx")
        made[model_type] = folders
    return made


def _lower(path: Path, out_dir: Path) -> tuple[Path, tuple[str, ...]]:
    graph, source = load_graph(path)
    graph, (report,), _ = run_passes(graph, [("lower_attention", None)])
    out_dir.mkdir()
    save_graph(graph, source, out_dir / "model.onnx", {})
    return out_dir / "model.onnx", report.notes


def _feeds(model_path: Path, batch=2, seq=5, past=3, seed=0) -> dict:
    """A prefill step after ``past`` cached tokens; the second row's first two positions are padding."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in onnx.load(str(model_path), load_external_data=False).graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(3, 250, (batch, seq)).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones((batch, past + seq), np.int64)
            mask[1, :2] = 0
            feeds[value.name] = mask
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)
        else:
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(dtype)
    return feeds


def _run(path: Path, feeds: dict) -> dict:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("model_type", list(TINY_ARCHITECTURES))
def test_lowered_attention_computes_what_the_fused_ops_do(exports, model_type, tmp_path):
    fused, decomposed, _ = exports[model_type]
    lowered, notes = _lower(fused, tmp_path / "lowered")
    onnx.checker.check_model(str(lowered))
    model = onnx.load(str(lowered), load_external_data=False)
    assert not notes
    assert not {node.op_type for node in model.graph.node} & {"Attention", "RotaryEmbedding"}
    assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {21}
    feeds = _feeds(fused)
    expected, got = _run(fused, feeds), _run(lowered, feeds)
    assert set(expected) == set(got)  # the logits and every present.{i}.key|value, same names
    for name in expected:
        assert got[name].shape == expected[name].shape
        np.testing.assert_allclose(got[name], expected[name], atol=2e-5, rtol=1e-4, err_msg=name)
    # and the exporter's own opset-21 form, written independently
    np.testing.assert_allclose(got["logits"], _run(decomposed, feeds)["logits"], atol=2e-5, rtol=1e-4)


def test_lowered_fp16_attention_keeps_the_softmax_in_fp32(exports, tmp_path):
    _, _, fused = exports["qwen3"]
    lowered, _ = _lower(fused, tmp_path / "lowered")
    model = onnx.load(str(lowered), load_external_data=False)
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    casts = [node for node in model.graph.node if node.op_type == "Cast" and softmax.input[0] in node.output or
             node.op_type == "Cast" and softmax.output[0] in node.input]
    assert casts  # widened before, narrowed after
    feeds = _feeds(fused)
    expected, got = _run(fused, feeds), _run(lowered, feeds)
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=2e-2, rtol=2e-2)


def _rotary_graph(tmp_path: Path, **attributes) -> Path:
    """One RotaryEmbedding on a [1, 2, 8] input with 2 heads of 4, at opset 23."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8])
    positions = helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8])
    cache = np.linspace(0, 1, 16 * 2, dtype=np.float32).reshape(16, 2)
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "position_ids"], ["y"], name="rope",
                            num_heads=2, **attributes)
    graph = helper.make_graph([node], "g", [x, positions], [y], [
        onnx.numpy_helper.from_array(np.cos(cache), "cos"), onnx.numpy_helper.from_array(np.sin(cache), "sin")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    path = tmp_path / "rope.onnx"
    onnx.save(model, str(path))
    return path


def test_the_forms_it_cannot_lower_stay_with_a_note(tmp_path):
    path = _rotary_graph(tmp_path, interleaved=1)
    lowered, notes = _lower(path, tmp_path / "out")
    model = onnx.load(str(lowered))
    assert [node.op_type for node in model.graph.node] == ["RotaryEmbedding"]
    assert notes == ("rope: RotaryEmbedding left as it is (interleaved rotation)",)
    assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {23}


def test_a_lone_rotary_lowers_exactly(tmp_path):
    path = _rotary_graph(tmp_path)
    lowered, notes = _lower(path, tmp_path / "out")
    assert not notes
    feeds = {"x": np.arange(16, dtype=np.float32).reshape(1, 2, 8) / 7, "position_ids": np.array([[3, 11]])}
    np.testing.assert_allclose(_run(lowered, feeds)["y"], _run(path, feeds)["y"], atol=1e-6)


def test_runs_on_needs_the_same_major_and_a_parser_as_new():
    assert runs_on("10.3", "10.3") and runs_on("10.3", "10.15")
    assert not runs_on("10.15", "10.3") and not runs_on("10.3", "11.1") and not runs_on("11.1", "10.15")


# --------------------------------------------------------------------------------------------- build_engine.sh
FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] # trtexec $*"
if [ "$*" = "--help" ]; then exit 0; fi
for arg in "$@"; do
    case "$arg" in --saveEngine=*) printf 'engine' > "${{arg#--saveEngine=}}";; esac
    printf '%s\\n' "$arg" >> "$(dirname "$0")/calls.txt"
done
"""


def _bundle(tmp_path: Path, code: int, version: str = "10.3") -> tuple[Path, dict]:
    """A bundle folder whose name holds a space, quotes and $(...), with a fake trtexec reporting ``code``."""
    folder = tmp_path / "my bundle 'x' \"y\" $(touch pwned)"
    (folder / "model").mkdir(parents=True)
    target = get_target("orin")
    script = build_script(target, trtexec_command("model/model.onnx", target, "w4a16", {}, plugins=False),
                          plugins=False, tensorrt_version=version)
    (folder / "build_engine.sh").write_text(script)
    tools = tmp_path / "tools"
    tools.mkdir()
    trtexec = tools / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC.format(code=code))
    trtexec.chmod(trtexec.stat().st_mode | stat.S_IEXEC)
    env = {key: value for key, value in os.environ.items() if key not in ("TensorRT_ROOT", "ACCULLM_TENSORRT_VERSION")}
    env["TRTEXEC"] = str(trtexec)
    return folder, env


def _run_script(folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / "build_engine.sh")], env=env, capture_output=True, text=True,
                          cwd=folder.parent, timeout=60)


def test_build_engine_sh_builds_on_the_bundles_version_and_records_the_engine(tmp_path):
    folder, env = _bundle(tmp_path, 100300)
    result = _run_script(folder, env)
    assert result.returncode == 0, result.stderr
    record = json.loads((folder / "engine.json").read_text())
    import hashlib

    assert record["sha256"] == hashlib.sha256((folder / "model.engine").read_bytes()).hexdigest()
    assert record["tensorrt"] == "10.3" and record["bundle_tensorrt"] == "10.3" and record["target"] == "orin"
    calls = (tmp_path / "tools" / "calls.txt").read_text().splitlines()
    assert f"--onnx={folder}/model/model.onnx" in calls  # the odd folder name reached trtexec whole
    assert not (tmp_path / "pwned").exists() and not (folder.parent / "pwned").exists()


def test_build_engine_sh_takes_a_newer_parser_of_the_same_major(tmp_path):
    folder, env = _bundle(tmp_path, 101500)
    result = _run_script(folder, env)
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "engine.json").read_text())["tensorrt"] == "10.15"


@pytest.mark.parametrize("how,device", [("banner", "10.2"), ("env", "11.1"), ("header", "11.1")])
def test_build_engine_sh_stops_on_another_tensorrt_before_any_work(tmp_path, how, device):
    folder, env = _bundle(tmp_path, 100200 if how == "banner" else 100300)
    if how == "env":
        env["ACCULLM_TENSORRT_VERSION"] = "11.1.0"
    if how == "header":
        header = SHARED_TENSORRT / "11.1" / "include" / "NvInferVersion.h"
        if not header.is_file():
            pytest.skip(f"TensorRT 11.1's headers are not at {header.parent} (the shared folder is absent)")
        (tmp_path / "trt" / "include").mkdir(parents=True)
        (tmp_path / "trt" / "include" / "NvInferVersion.h").write_text(header.read_text())
        env["TensorRT_ROOT"] = str(tmp_path / "trt")
    result = _run_script(folder, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"this bundle is for TensorRT 10.3 and this device has TensorRT {device}" in lines[0]
    assert f"--tensorrt-version {device}" in lines[0]
    assert not (folder / "model.engine").exists() and not (tmp_path / "tools" / "calls.txt").exists()


@pytest.mark.parametrize("value", ["ten", "10", "10.x", ""])
def test_build_engine_sh_refuses_a_version_it_cannot_read(tmp_path, value):
    folder, env = _bundle(tmp_path, 0)
    (tmp_path / "tools" / "trtexec").write_text("#!/usr/bin/env bash\necho 'no banner'\n")
    if value:
        env["ACCULLM_TENSORRT_VERSION"] = value
    result = _run_script(folder, env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "ACCULLM_TENSORRT_VERSION=X.Y" in result.stderr
    assert not (folder / "model.engine").exists()


@pytest.mark.parametrize("version,kept,opset", [("10.3", set(), 21), ("11.1", {"RotaryEmbedding"}, 23)])
def test_lower_for_tensorrt_lowers_what_that_parser_lacks(exports, tmp_path, version, kept, opset):
    """10.3 parses neither op; 11.1 parses RotaryEmbedding but not Attention with a KV cache."""
    import shutil

    from accullm_export.build.lowering import lower_for_tensorrt
    from accullm_export.targets.tensorrt_support import check_model

    fused = exports["llama"][0]
    copy = tmp_path / "model"
    shutil.copytree(fused.parent, copy)
    assert {finding.op for finding in check_model(copy / "model.onnx", version)} & {"Attention"}
    done = lower_for_tensorrt(copy / "model.onnx", version)
    assert any(line.startswith(f"lowered for TensorRT {version}") for line in done)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    assert {node.op_type for node in model.graph.node} & {"Attention", "RotaryEmbedding"} == kept
    assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {opset}
    assert check_model(copy / "model.onnx", version) == []
    feeds = _feeds(fused)
    np.testing.assert_allclose(_run(copy / "model.onnx", feeds)["logits"], _run(fused, feeds)["logits"],
                               atol=2e-5, rtol=1e-4)
