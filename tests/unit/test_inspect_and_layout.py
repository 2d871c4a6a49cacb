"""The exported graph's layout: names, opset, I/O, initializers, summary figures."""

from __future__ import annotations

import json

import onnx
import pytest

from accullm_export.cli.main import main
from accullm_export.graph.io import load_onnx
from accullm_export.graph.summary import summarize
from tests.conftest import load_torch_model


def test_layout_of_export(tiny_exports):
    _, folder = tiny_exports["llama"]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}[""] == 23  # standard Attention
    inputs = [i.name for i in model.graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in inputs
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits" and "present.1.key" in outputs
    dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
    names = {node.name for node in model.graph.node}
    assert "/model/layers.1/mlp/down_proj/MatMul" in names
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name.endswith("_proj/MatMul") or node.name == "/lm_head/MatMul":
            assert node.op_type == "MatMul" and node.input[1] in initializers
    assert (folder / "model.onnx.data").stat().st_size > 0
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    assert config["search"]["past_present_share_buffer"] is False


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_parameter_count_equals_torch(tiny_exports, model_type):
    hf, folder = tiny_exports[model_type]
    summary = summarize(load_onnx(folder, load_external_data=False))
    torch_params = sum(p.numel() for p in load_torch_model(hf).parameters())  # tied weights counted once
    float_params = summary.parameters_by_dtype["float32"][0]
    rotary_caches = 2 * 1024 * (16 // 2)  # cos and sin, [max_position_embeddings, head_dim / 2]
    scalars = 2  # the RMSNorm exponent and epsilon
    assert float_params == torch_params + rotary_caches + scalars
    assert len(summary.linear_layers) == 2 * 7 + 1


def test_inspect_cli(capsys, tiny_exports):
    _, folder = tiny_exports["llama"]
    assert main(["inspect", str(folder / "model.onnx"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "opset: ai.onnx 23" in out
    assert "/model/layers.1/mlp/down_proj/MatMul" in out and "linear layers (15)" in out
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["op_counts"]["MatMul"] >= 15
