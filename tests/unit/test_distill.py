"""Distilled INT4 block scales (``quantize --distill-steps``): the torch replicas equal the graphs they are read
from, training moves only the scales, and it lowers the KL it is kept for."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.build.quantize import QuantizeOptions, quantize_model
from accullm_export.errors import UserError
from accullm_export.graph.ir import load_graph
from accullm_export.graph.recipes import Recipe

torch = pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
pytest.importorskip("transformers", reason="the replicas are transformers models (the [export] extra)")

from accullm_export.graph.passes.distill_scales import block_scaled_layers, graph_weights  # noqa: E402
from accullm_export.quant.distill import DistillConfig, build_replica, module_of, student_replica  # noqa: E402
from tests.conftest import TINY_ARCHITECTURES, load_torch_model  # noqa: E402
from tests.unit.test_quantize import _logits  # noqa: E402
from tests.unit.test_validate import hand_kl  # noqa: E402

W4 = dict(name="w4a16", block_size=16, policy="ratio", embeddings="fp32")


def _ids(seq=12, seed=0):
    return np.random.default_rng(seed).integers(3, 250, size=(1, seq))


def _ort_logits(folder, ids):
    from accullm_export.calibration.feeds import llm_feeds

    return _logits(folder / "model.onnx", llm_feeds(ids, folder / "model.onnx")[0])


def _kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL over the positions of one sequence's logits [1, seq, vocab]."""
    return float(hand_kl(reference[0], candidate[0]).mean())


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_replica_equals_the_source_model(tiny_exports, model_type):
    """graph_weights reads every parameter back (transposes, tied embedding, biases, q/k norms)."""
    hf, folder = tiny_exports[model_type]
    graph, _ = load_graph(folder / "model.onnx")
    replica = build_replica(folder, graph_weights(graph))
    ids = torch.from_numpy(_ids())
    with torch.no_grad():
        expected = load_torch_model(hf)(ids).logits.numpy()
        np.testing.assert_allclose(replica(ids).logits.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_student_replica_equals_the_quantized_graph(planted_model, profile, tmp_path):
    """INT4 blocks, FP16 outlier rows and plain rounding, as ONNX Runtime runs them."""
    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", Recipe(**W4), profile, finishing=())
    graph, _ = load_graph(tmp_path / "q" / "model.onnx")
    layers, _ = block_scaled_layers(graph, [])
    assert layers and any(layer.outliers for layer in layers)
    student, modules = student_replica(folder, graph_weights(graph), layers)
    assert set(modules) == {layer.module for layer in layers}
    ids = _ids(seed=4)
    with torch.no_grad():
        replica = student(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(replica, _ort_logits(tmp_path / "q", ids), rtol=1e-4, atol=1e-4)


def _stored(path):
    model = onnx.load(str(path / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_distillation_moves_only_scales_and_lowers_the_kl(planted_model, profile, tmp_path):
    folder, text = planted_model
    options = QuantizeOptions(distill_lr=2e-2, distill_samples=6)
    quantize_model(folder, tmp_path / "plain", Recipe(**W4), profile, options=options)
    manifest = quantize_model(folder, tmp_path / "distilled", Recipe(**W4, distill_steps=40), profile,
                              options=options)
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    assert "trained" in note and "left as they were" not in note
    plain, distilled = _stored(tmp_path / "plain"), _stored(tmp_path / "distilled")
    assert plain.keys() == distilled.keys()
    scales = [name for name in plain if name.endswith("/weight_scale")]
    integers = [name for name in plain if name.endswith("/weight_quantized")]
    assert scales and integers
    for name in integers:
        np.testing.assert_array_equal(plain[name], distilled[name])
    assert all(distilled[name].dtype == np.float16 for name in scales)
    assert any(not np.array_equal(plain[name], distilled[name]) for name in scales)
    assert (tmp_path / "plain" / "model.onnx.data").stat().st_size == \
        (tmp_path / "distilled" / "model.onnx.data").stat().st_size
    # ONNX Runtime on the calibration text: the trained scales lower the KL to the source model
    ids = np.asarray([list(text.read_text().encode())[:60]]) % 250 + 3
    reference = _ort_logits(folder, ids)
    assert _kl(reference, _ort_logits(tmp_path / "distilled", ids)) < _kl(reference, _ort_logits(tmp_path / "plain",
                                                                                                  ids))
    recorded = json.loads((tmp_path / "distilled" / "manifest.json").read_text())["recipe"]
    assert recorded["distill_steps"] == 40


@pytest.mark.parametrize("fields, message", [
    (dict(name="w8a8", distill_steps=5), "weight-only w4a16"),
    (dict(name="w4a16", distill_steps=-1), r"0 \(off\) or positive"),
    (dict(name="w4a16", distill_norms=True), "give --distill-steps"),
])
def test_bad_distillation_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        Recipe(**fields)


def test_bad_distill_config_and_names_are_refused():
    with pytest.raises(UserError, match="positive"):
        DistillConfig(steps=1, learning_rate=0)
    with pytest.raises(UserError, match="not named like an exported linear layer"):
        module_of("/model/layers.0/mlp/Add")
    assert module_of("/model/layers.3/mlp/down_proj/MatMul") == "model.layers.3.mlp.down_proj"


def test_replica_needs_every_parameter(tiny_exports):
    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    weights.pop("model.norm.weight")
    with pytest.raises(UserError, match="no weight for model.norm.weight"):
        build_replica(folder, weights)
