"""benchmarks/sparsity.py's ceiling models: every MLP narrowed to the kept width, the selection ops kept, and the
model still decodes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def mlp_weight_shapes(path: Path) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the MatMul weights under each MLP, by projection name."""
    model = onnx.load(str(path))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    shapes = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and "/mlp/" in node.name and node.input[1] in weights:
            role = "guesser" if "/ceiling/" in node.name else node.name.split("/mlp/")[1].split("/")[0]
            shapes.setdefault(role, []).append(weights[node.input[1]].shape)
    return shapes


@pytest.mark.parametrize("method", ["threshold", "predictor"])
def test_ceiling_model_narrows_every_mlp(planted_model, tmp_path, method):
    import sparsity as bench

    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    folder, _ = planted_model
    out = bench.ceiling_model(folder, tmp_path / method, method, 0.5, rank=8)
    dense, narrow = mlp_weight_shapes(folder / "model.onnx"), mlp_weight_shapes(out / "model.onnx")
    hidden, width = dense["down_proj"][0][1], dense["down_proj"][0][0]
    assert narrow["down_proj"] == [(width // 2, hidden)] * 2
    if method == "threshold":
        assert narrow["gate_proj"] == dense["gate_proj"] and narrow["up_proj"] == dense["up_proj"]
        assert "guesser" not in narrow
    else:
        assert narrow["gate_proj"] == narrow["up_proj"] == [(hidden, width // 2)] * 2
        assert sorted(narrow["guesser"]) == sorted([(hidden, 8), (8, width)] * 2)
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"Greater", "Where", "Slice"} <= ops and "Compress" not in ops  # selection stays, gathering is free
    runner = OrtCausalLM.from_path(out, device="cpu", optimization="all")
    tokens = generate(runner, [[1, 2, 3]], GenerationConfig(max_new_tokens=3))
    assert np.asarray(tokens).size > 0


def test_ceiling_model_refuses_a_model_without_plain_mlps(tmp_path):
    import sparsity as bench
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    (tmp_path / "m").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m/model.onnx"))
    with pytest.raises(RuntimeError, match="no plain gated MLP"):
        bench.ceiling_model(tmp_path / "m", tmp_path / "out", "threshold", 0.5, rank=8)
