"""The exported graph's layout: names, opset, I/O, initializers, summary figures."""

from __future__ import annotations

import json

import onnx
import pytest

from accullm_export.cli.main import main
from accullm_export.graph.io import load_onnx
from accullm_export.graph.summary import summarize
from tests.helpers.models import load_torch_model


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


def test_inspect_sees_quantized_layers(planted_model, profile, tmp_path, capsys):
    """A quantized model's layers are listed with how their weights are stored: behind a blocked
    DequantizeLinear (with zero points when asymmetric), per output channel, or a Cast of FP16 rows."""
    from accullm_export.build.quantize import quantize_model
    from tests.helpers.recipes import make_recipe

    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=16, asymmetric=True, overrides=(("layers.0", "int8"),))
    quantize_model(folder, tmp_path / "q", recipe, profile)
    assert main(["inspect", str(tmp_path / "q"), "--all"]) == 0
    out = capsys.readouterr().out
    layers = [line.split() for line in out.splitlines()[out.splitlines().index(
        next(line for line in out.splitlines() if line.startswith("linear layers"))) + 1:]]
    storage = {fields[0]: fields[2] for fields in layers}
    assert storage["/model/layers.1/mlp/down_proj/MatMul"] == "uint4+zp/b16"
    assert storage["/model/layers.0/mlp/down_proj/MatMul"] == "int8/ch"
    assert any("/outliers/MatMul" in name and kind == "float16>float32" for name, kind in storage.items())
    summary = summarize(load_onnx(tmp_path / "q" / "model.onnx", load_external_data=False))
    assert len(summary.linear_layers) == len(storage) > 10
