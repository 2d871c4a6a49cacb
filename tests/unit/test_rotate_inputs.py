"""Block-Hadamard input rotation (``quantize --rotate``): the model against an independent NumPy emulation (with
and without GPTQ's statistics, merged and unmerged), the rotation nodes, the distillation replica, the
refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from accullm_export.graph.recipes import Recipe
from tests.unit.test_quantize import _builds_equal_emulation, _feed, _logits, np_round_symmetric

W4 = dict(name="w4a16", block_size=16, embeddings="fp32")


def np_hadamard(size: int) -> np.ndarray:
    """Sylvester's construction, entry by entry: H[i, j] = (-1)^popcount(i & j) / sqrt(size)."""
    index = np.arange(size)
    parity = np.vectorize(lambda value: bin(value).count("1") % 2)(index[:, None] & index[None, :])
    return (1.0 - 2.0 * parity) / np.sqrt(size)


def _signs(folder, layer: str) -> np.ndarray:
    """The signs the rotation in front of ``layer`` (possibly shared with the other readers of its input)
    multiplies by, read from the file."""
    model = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    node = next(node for node in model.graph.node if node.name == layer)
    tensor = node.input[0]
    while producers[tensor].op_type != "Mul":  # Reshape <- MatMul <- Reshape <- Mul(x, signs)
        tensor = producers[tensor].input[0]
    return numpy_helper.to_array(initializers[producers[tensor].input[1]])


def _emulate_rotated(folder):
    """emulate(weight, plan) for _builds_equal_emulation: the rotated rest rounded, rotated back, FP16 rows."""

    def emulate(weight, plan):
        outliers = list(plan.outliers)
        rest = weight.astype(np.float64).copy()
        rest[outliers] = 0
        if not plan.rotation:
            out = np_round_symmetric(rest.astype(np.float32), plan.bits, plan.block_size)
        else:
            signs = _signs(folder, plan.node).astype(np.float64)
            rotation = np.zeros((weight.shape[0], weight.shape[0]))
            for start in range(0, weight.shape[0], plan.rotation):
                block = slice(start, start + plan.rotation)
                rotation[block, block] = np_hadamard(plan.rotation)
            rotation *= signs[:, None]
            rounded = np_round_symmetric((rotation.T @ rest).astype(np.float32), plan.bits, plan.block_size)
            out = (rotation @ rounded.astype(np.float64)).astype(np.float32)
        out[outliers] = weight[outliers].astype(np.float16).astype(np.float32)
        return out

    return emulate


def test_rotated_model_equals_numpy_emulation(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = Recipe(**W4, rotate=("lm_head", "*gate_proj*", "*q_proj*"))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)  # merged q/k/v and gate/up
    rotated = {layer["node"]: layer for layer in manifest["layers"] if layer["rotation"]}
    assert set(rotated) == {"/lm_head/MatMul"} | {layer["node"] for layer in manifest["layers"]
                                                 if "gate_proj" in layer["node"] or "q_proj" in layer["node"]}
    assert all(layer["rotation"] == 64 and layer["input"].endswith("/rotation/output") for layer in rotated.values())
    assert any(layer["outliers"] for layer in rotated.values())
    for name, layer in rotated.items():
        signs = _signs(tmp_path / "q", name)
        assert set(np.unique(np.abs(signs))) <= {0.0, 1.0}
        assert sorted(np.flatnonzero(signs == 0)) == layer["outliers"]
    _builds_equal_emulation(folder, manifest, tmp_path, _emulate_rotated(tmp_path / "q"))
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
    recipe = Recipe(**W4, gptq=True, scale_search=True, asymmetric=True, rotate=("lm_head",))
    quantize_model(folder, tmp_path / "g", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "p", Recipe(**W4, scale_search=True, asymmetric=True, rotate=("lm_head",)),
                   profile, finishing=())
    feed = _feed(folder)
    reference = _logits(folder / "model.onnx", feed)
    gptq, plain = _logits(tmp_path / "g" / "model.onnx", feed), _logits(tmp_path / "p" / "model.onnx", feed)
    assert not np.allclose(gptq, plain)
    assert np.abs(gptq - reference).mean() < np.abs(reference).mean() * 0.2


def test_distillation_replica_equals_the_rotated_graph(planted_model, profile, tmp_path):
    torch = pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
    pytest.importorskip("transformers", reason="the replicas are transformers models (the [export] extra)")
    from accullm_export.graph.ir import load_graph
    from accullm_export.graph.passes.distill_scales import block_scaled_layers, graph_weights
    from accullm_export.quant.distill import student_replica
    from tests.unit.test_distill import _ids, _ort_logits

    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", Recipe(**W4, rotate=("lm_head", "*up_proj*")), profile, finishing=())
    graph, _ = load_graph(tmp_path / "q" / "model.onnx")
    layers, _, _ = block_scaled_layers(graph, [])
    rotated = [layer for layer in layers if layer.rotation is not None]
    assert {layer.module for layer in rotated} >= {"lm_head"} and any(layer.outliers for layer in rotated)
    student, _ = student_replica(folder, graph_weights(graph), layers)
    ids = _ids(seed=4)
    with torch.no_grad():
        replica = student(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(replica, _ort_logits(tmp_path / "q", ids), rtol=1e-4, atol=1e-4)


def test_distilled_rotated_build_runs(planted_model, profile, tmp_path):
    pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
    from accullm_export.build.quantize import QuantizeOptions

    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "d", Recipe(**W4, rotate=("lm_head",), distill_steps=4,
                                                             distill_outlier_rows=True), profile,
                              options=QuantizeOptions(distill_samples=4))
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    assert "trained" in note


def test_rotate_refusals(planted_model, profile, tmp_path):
    folder, _ = planted_model
    with pytest.raises(UserError, match="--rotate applies to blocked INT4"):
        Recipe(name="w8a8", rotate=("lm_head",))
    with pytest.raises(UserError, match="--bias-correction"):
        Recipe(**W4, rotate=("lm_head",), bias_correction=True)
    with pytest.raises(UserError, match="--rotate 'nothing_here' matches no linear layer"):
        quantize_model(folder, tmp_path / "x", Recipe(**W4, rotate=("nothing_here",)), profile)
    with pytest.raises(UserError, match="only weight-only INT4 layers"):
        quantize_model(folder, tmp_path / "y", Recipe(**W4, rotate=("lm_head",), overrides=(("lm_head", "int8"),)),
                       profile)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantize_cli_takes_rotate(planted_model, profile, tmp_path, capsys):
    from accullm_export.cli.main import main

    folder, _ = planted_model
    assert main(["quantize", str(folder), "--recipe", "w4a16", "--block-size", "16", "--profile", str(profile),
                 "-o", str(tmp_path / "c"), "--rotate", "lm_head", "--embeddings", "fp32"]) == 0
    import json

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["recipe"]["rotate"] == ["lm_head"]
    assert [layer["node"] for layer in manifest["layers"] if layer["rotation"]] == ["/lm_head/MatMul"]


def test_readers_of_one_input_share_the_rotation_and_still_merge(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = Recipe(**W4, rotate=("*q_proj*", "*k_proj*", "*v_proj*"))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)
    blocks = sum("q_proj" in layer["node"] for layer in manifest["layers"])
    model = onnx.load(str(tmp_path / "u" / "model.onnx"))
    rotations = [node for node in model.graph.node if node.name.endswith("/rotation/Mul")]
    assert len(rotations) == blocks
    merged = [node for node in model.graph.node if node.op_type == "MatMul" and "merged_with_2" in node.name
              and node.input[0].endswith("/rotation/output")]
    assert len(merged) == blocks  # q, k and v read the same rotated tensor, so they still merge
    _builds_equal_emulation(folder, manifest, tmp_path, _emulate_rotated(tmp_path / "q"))


def test_tensorrt_swap_leaves_a_rotated_layer_standard():
    """OutlierSplitGemm reads one input for both parts; a rotated layer's low-bit part reads x R, so the swap
    leaves it as standard ONNX, with a note, and the graph computes what it did before the swap."""
    import dataclasses

    from accullm_export.graph.pipeline import run_passes
    from accullm_export.graph.recipes import PassContext
    from tests.unit.test_quantize import one_layer_graph, plan_for, run_graph

    weight = (np.random.default_rng(5).standard_normal((32, 8)) * 0.1).astype(np.float32)
    plan = dataclasses.replace(plan_for(weight, "int4", block=16, outliers=(3,)), rotation=16)
    passes = ("isolate_outliers", "rotate_inputs", "quantize_weights")
    graphs = {}
    for name, extra in (("standard", ()), ("swapped", ("fuse_outlier_split_gemm",))):
        context = PassContext(plans={plan.node: plan}, float_dtype=np.dtype(np.float32))
        graphs[name], reports = run_passes(one_layer_graph(weight), [(p, context) for p in passes + extra])
    assert not [node for node in graphs["swapped"].nodes if node.op == "OutlierSplitGemm"]
    assert any("left as standard ONNX" in note for note in reports[-1].notes)
    x = np.random.default_rng(6).standard_normal((2, 3, 32)).astype(np.float32)
    swapped = run_graph(graphs["swapped"], x)
    np.testing.assert_array_equal(swapped, run_graph(graphs["standard"], x))
    assert np.abs(swapped - x @ weight).mean() < 0.1 * np.abs(x @ weight).mean()  # INT4 rounding only
