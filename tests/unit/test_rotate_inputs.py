"""Block-Hadamard input rotation (recipe key ``rotation.layers``): the model against an independent NumPy
emulation (with and without GPTQ's statistics, merged and unmerged), the rotation nodes, the distillation
replica, the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from tests.helpers.recipes import make_recipe, write_config
from tests.helpers.emulation import emulate_rotated, rotation_signs
from tests.helpers.graphs import (builds_equal_emulation, llm_feed, one_layer_graph, ort_logits, ort_logits_for_ids,
                                  plan_for, run_graph, token_ids)

W4 = dict(name="w4a16", block_size=16, embeddings="fp32")


def test_rotated_model_equals_numpy_emulation(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(**W4, rotate=("lm_head", "*gate_proj*", "*q_proj*"))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)  # merged q/k/v and gate/up
    rotated = {layer["node"]: layer for layer in manifest["layers"] if layer["rotation"]}
    assert set(rotated) == {"/lm_head/MatMul"} | {layer["node"] for layer in manifest["layers"]
                                                 if "gate_proj" in layer["node"] or "q_proj" in layer["node"]}
    assert all(layer["rotation"] == 64 and layer["input"].endswith("/rotation/output") for layer in rotated.values())
    assert any(layer["outliers"] for layer in rotated.values())
    for name, layer in rotated.items():
        signs = rotation_signs(tmp_path / "q", name)
        assert set(np.unique(np.abs(signs))) <= {0.0, 1.0}
        assert sorted(np.flatnonzero(signs == 0)) == layer["outliers"]
    builds_equal_emulation(folder, manifest, tmp_path, emulate_rotated(tmp_path / "q"))
    mixers = [node for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node
              if node.name.endswith("/rotation/MatMul")]
    assert len(mixers) == len({layer["input"] for layer in rotated.values()}) > 1
    assert len({node.input[1] for node in mixers}) == 1  # one H_64 shared by every rotation
    note = next(note for note in manifest["notes"] if "rotated" in note)
    assert note.startswith(f"{len(rotated)} layers'")


def test_gptq_sees_the_rotated_statistics(planted_model, profile, tmp_path):
    """With GPTQ the rotated layer is rounded against R^T H R: the build runs, its rotated layers' rounding
    differs from plain rounding, and the result stays close to the source model."""
    folder, _ = planted_model
    recipe = make_recipe(**W4, gptq=True, scale_search=True, asymmetric=True, rotate=("lm_head",))
    quantize_model(folder, tmp_path / "g", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "p", make_recipe(**W4, scale_search=True, asymmetric=True, rotate=("lm_head",)),
                   profile, finishing=())
    feed = llm_feed(folder)
    reference = ort_logits(folder / "model.onnx", feed)
    gptq, plain = ort_logits(tmp_path / "g" / "model.onnx", feed), ort_logits(tmp_path / "p" / "model.onnx", feed)
    assert not np.allclose(gptq, plain)
    assert np.abs(gptq - reference).mean() < np.abs(reference).mean() * 0.2


def test_distillation_replica_equals_the_rotated_graph(planted_model, profile, tmp_path):
    torch = pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
    pytest.importorskip("transformers", reason="the replicas are transformers models (the [export] extra)")
    from accullm_export.graph.ir import load_graph
    from accullm_export.graph.passes.distill_scales import block_scaled_layers, graph_weights
    from accullm_export.training.distill import student_replica

    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", make_recipe(**W4, rotate=("lm_head", "*up_proj*")), profile, finishing=())
    graph, _ = load_graph(tmp_path / "q" / "model.onnx")
    layers, _, _ = block_scaled_layers(graph, [])
    rotated = [layer for layer in layers if layer.rotation is not None]
    assert {layer.module for layer in rotated} >= {"lm_head"} and any(layer.outliers for layer in rotated)
    student, _ = student_replica(folder, graph_weights(graph), layers)
    ids = token_ids(seed=4)
    with torch.no_grad():
        replica = student(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(replica, ort_logits_for_ids(tmp_path / "q", ids), rtol=1e-4, atol=1e-4)


def test_distilled_rotated_build_runs(planted_model, profile, tmp_path):
    pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "d", make_recipe(**W4, rotate=("lm_head",), distill_steps=4,
                                                                  distill_outlier_rows=True, distill_samples=4),
                              profile)
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    assert "trained" in note


def test_rotate_refusals(planted_model, profile, tmp_path):
    folder, _ = planted_model
    with pytest.raises(UserError, match="rotation.layers: applies to blocked INT4"):
        make_recipe(name="w8a8", rotate=("lm_head",))
    with pytest.raises(UserError, match="rotation.layers 'nothing_here' matches no linear layer"):
        quantize_model(folder, tmp_path / "x", make_recipe(**W4, rotate=("nothing_here",)), profile)
    with pytest.raises(UserError, match="only weight-only INT4 layers"):
        quantize_model(folder, tmp_path / "y", make_recipe(**W4, rotate=("lm_head",), overrides=(("lm_head", "int8"),)),
                       profile)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantize_cli_takes_rotate(planted_model, profile, tmp_path, capsys):
    from accullm_export.cli.main import main

    folder, _ = planted_model
    config = write_config(tmp_path / "rotate.toml", make_recipe(name="w4a16", rotate=("lm_head",), embeddings="fp32"))
    assert main(["quantize", str(folder), "--config", config, "--block-size", "16", "--profile", str(profile),
                 "-o", str(tmp_path / "c")]) == 0
    import json

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["recipe"]["rotation"]["layers"] == ["lm_head"]
    assert [layer["node"] for layer in manifest["layers"] if layer["rotation"]] == ["/lm_head/MatMul"]


def test_readers_of_one_input_share_the_rotation_and_still_merge(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(**W4, rotate=("*q_proj*", "*k_proj*", "*v_proj*"))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)
    blocks = sum("q_proj" in layer["node"] for layer in manifest["layers"])
    model = onnx.load(str(tmp_path / "u" / "model.onnx"))
    rotations = [node for node in model.graph.node if node.name.endswith("/rotation/Mul")]
    assert len(rotations) == blocks
    merged = [node for node in model.graph.node if node.op_type == "MatMul" and "merged_with_2" in node.name
              and node.input[0].endswith("/rotation/output")]
    assert len(merged) == blocks  # q, k and v read the same rotated tensor, so they still merge
    builds_equal_emulation(folder, manifest, tmp_path, emulate_rotated(tmp_path / "q"))


def test_tensorrt_swap_leaves_a_rotated_layer_standard():
    """OutlierSplitGemm reads one input for both parts; a rotated layer's low-bit part reads x R, so the swap
    leaves it as standard ONNX, with a note, and the graph computes what it did before the swap."""
    import dataclasses

    from accullm_export.graph.pipeline import run_passes
    from accullm_export.graph.pass_data import PassData

    weight = (np.random.default_rng(5).standard_normal((32, 8)) * 0.1).astype(np.float32)
    plan = dataclasses.replace(plan_for(weight, "int4", block=16, outliers=(3,)), rotation=16)
    passes = ("isolate_outliers", "rotate_inputs", "quantize_weights")
    graphs = {}
    for name, extra in (("standard", ()), ("swapped", ("fuse_outlier_split_gemm",))):
        data = PassData(plans={plan.node: plan}, float_dtype=np.dtype(np.float32))
        graphs[name], reports, _ = run_passes(one_layer_graph(weight), list(passes + extra), data)
    assert not [node for node in graphs["swapped"].nodes if node.op == "OutlierSplitGemm"]
    assert any("left as standard ONNX" in note for note in reports[-1].notes)
    x = np.random.default_rng(6).standard_normal((2, 3, 32)).astype(np.float32)
    swapped = run_graph(graphs["swapped"], x)
    np.testing.assert_array_equal(swapped, run_graph(graphs["standard"], x))
    assert np.abs(swapped - x @ weight).mean() < 0.1 * np.abs(x @ weight).mean()  # INT4 rounding only


def test_rotated_rows_by_parts_of_the_columns_is_r_transpose_w():
    """The rotated weight made a few output columns at a time is R^T W with R formed whole (the rows ``zeroed``
    counting as 0), in the weight's dtype, whatever the part size."""
    from accullm_export.graph.passes.rotate_inputs import rotated_rows
    from accullm_export.graph.rotation import rotation_matrix

    rng = np.random.default_rng(3)
    weight = rng.normal(size=(16, 11)).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], size=16).astype(np.float32)
    signs[5] = 0.0
    rest = weight.astype(np.float64)
    rest[[5, 9]] = 0.0
    expected = (rotation_matrix(signs, 4).T @ rest).astype(np.float32)
    whole = rotated_rows(weight, signs, 4, zeroed=[9], columns=11)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(whole, expected, rtol=1e-6, atol=1e-6)
    for columns in (1, 3, 4):
        np.testing.assert_array_equal(rotated_rows(weight, signs, 4, zeroed=[9], columns=columns), whole)


def test_a_rotated_weight_is_made_when_read_from_the_unzeroed_source():
    """rotate_inputs leaves the rotated weight to be made when a later pass reads it (a head-sized copy is not
    held from one pass to the next), from the source weight with the outlier rows and the rows
    isolate_outliers zeroed counting as 0: what R^T W of the zeroed weight is."""
    import dataclasses

    from accullm_export.graph.ir import LazyArray, ZeroedRows, constant_array
    from accullm_export.graph.passes import rotate_inputs
    from accullm_export.graph.passes.rotate_inputs import rotated_rows
    from accullm_export.graph.rotation import rotation_matrix

    weight = np.random.default_rng(2).normal(size=(16, 6)).astype(np.float32)
    graph = one_layer_graph(weight)
    node = graph.nodes[0]
    node.inputs[1].values = ZeroedRows(weight, (3,))
    plan = dataclasses.replace(plan_for(weight, "int4", outliers=(3,), block=8), rotation=4)
    result = rotate_inputs.run(graph, rotate_inputs.Config(plans={node.name: plan}))
    rotated = next(node for node in result.graph.nodes if node.name == "/layer/MatMul").inputs[1]
    assert isinstance(rotated._values, LazyArray) and rotated._values.shape == weight.shape
    signs = rotate_inputs.rotation_signs("x", 16, (3,))
    zeroed = weight.astype(np.float64)
    zeroed[3] = 0.0
    np.testing.assert_array_equal(constant_array(rotated), rotated_rows(weight, signs, 4, zeroed=[3]))
    np.testing.assert_allclose(constant_array(rotated), rotation_matrix(signs, 4).T @ zeroed, rtol=1e-5, atol=1e-6)
