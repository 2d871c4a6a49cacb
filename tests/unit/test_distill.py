"""Distilled INT4 block scales (``quantize --distill-steps``): the torch replicas equal the graphs they are read
from, training moves only the scales, and it lowers the KL it is kept for."""

from __future__ import annotations

import json
import re

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
from accullm_export.quant.distill import (BlockScaled, DistillConfig, block_scaled_linear_class,  # noqa: E402
                                          build_replica, module_of, student_replica)
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
    layers, _, _ = block_scaled_layers(graph, [])
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


def _assert_same_size_and_lower_kl(source, text, trained, plain):
    """The trained folder's file is as large as the plain one's, and ONNX Runtime on the calibration text
    measures a lower KL to the source model for it."""
    assert (plain / "model.onnx.data").stat().st_size == (trained / "model.onnx.data").stat().st_size
    ids = np.asarray([list(text.read_text().encode())[:60]]) % 250 + 3
    reference = _ort_logits(source, ids)
    assert _kl(reference, _ort_logits(trained, ids)) < _kl(reference, _ort_logits(plain, ids))


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
    _assert_same_size_and_lower_kl(folder, text, tmp_path / "distilled", tmp_path / "plain")
    recorded = json.loads((tmp_path / "distilled" / "manifest.json").read_text())["recipe"]
    assert recorded["distill_steps"] == 40


def _plain_and_trained(planted_model, profile, tmp_path, learning_rate=2e-2, base=W4, **fields):
    """A plain build of recipe ``base`` and one distilled for 40 steps with ``fields``: (distill note, plain
    constants, trained constants)."""
    folder, _ = planted_model
    options = QuantizeOptions(distill_lr=learning_rate, distill_samples=6)
    quantize_model(folder, tmp_path / "plain", Recipe(**base), profile, options=options)
    manifest = quantize_model(folder, tmp_path / "trained", Recipe(**base, distill_steps=40, **fields), profile,
                              options=options)
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    return note, _stored(tmp_path / "plain"), _stored(tmp_path / "trained")


def test_learned_rounding_moves_integers_one_step_within_range(planted_model, profile, tmp_path):
    """--distill-rounding: integers move (by one step at most, inside [-8, 7], never on an FP16 outlier row),
    the file keeps its size, and ONNX Runtime measures the lower KL the pass kept the result for."""
    folder, text = planted_model
    note, plain, rounded = _plain_and_trained(planted_model, profile, tmp_path, distill_rounding=True)
    assert "trained" in note and "integers moved by one step" in note
    integers = [name for name in plain if plain[name].dtype.name == "int4"]  # q/k/v and gate/up merged too
    assert integers
    moved = 0
    for name in integers:
        before, after = plain[name].astype(np.int8), rounded[name].astype(np.int8)
        assert rounded[name].dtype.name == "int4" and after.min() >= -8 and after.max() <= 7
        assert np.abs(after - before).max() <= 1
        assert not np.any(after[np.all(before == 0, axis=1)]), "an all-zero (outlier) row gained integers"
        moved += int(np.count_nonzero(after != before))
    assert moved > 0 and f"{moved} integers moved" in note
    _assert_same_size_and_lower_kl(folder, text, tmp_path / "trained", tmp_path / "plain")
    assert json.loads((tmp_path / "trained" / "manifest.json").read_text())["recipe"]["distill_rounding"] is True


def test_outlier_rows_train_with_the_scales(planted_model, profile, tmp_path):
    """--distill-outlier-rows: the FP16 branch's weight rows move too (stored in FP16, same size), the integers do
    not, and the pass kept them for a lower held-out KL (on this tiny model's 60-token text the gain is within
    noise, so ONNX Runtime's KL is not compared here; the replica-equals-graph test covers the rows' numerics)."""
    # the rows' step is a tenth of the scales': 5e-3 moves the tiny model's ~0.02 weights by a few percent per step
    note, plain, rows = _plain_and_trained(planted_model, profile, tmp_path, learning_rate=5e-3,
                                           distill_outlier_rows=True)
    assert "trained" in note and "outlier rows" in note
    branches = [name for name in plain if "/outliers/" in name and plain[name].dtype == np.float16]
    assert branches and all(rows[name].dtype == np.float16 for name in branches)
    assert any(not np.array_equal(plain[name], rows[name]) for name in branches)
    for name in (name for name in plain if plain[name].dtype.name == "int4"):
        np.testing.assert_array_equal(plain[name], rows[name])
    before, after = map(float, re.search(r"held-out ones ([\d.]+) -> ([\d.]+)", note).groups())
    assert after < before
    assert (tmp_path / "plain" / "model.onnx.data").stat().st_size == \
        (tmp_path / "trained" / "model.onnx.data").stat().st_size


def test_trainable_outlier_rows_leave_the_low_bit_rows_alone():
    """Only the outlier rows of the trainable FP16 part get a gradient; the low-bit rows' part stays zero."""
    values = np.array([[1, -2], [0, 0], [3, 4]], dtype=np.int8)
    layer = BlockScaled("m", values, np.ones((1, 2), dtype=np.float32), block_size=4, outliers=(1,),
                        outlier_rows=np.array([[0.5, -0.25]], dtype=np.float32))
    linear = block_scaled_linear_class()(layer, None, outlier_rows=True)
    linear.fixed.requires_grad_(True)
    out = linear(torch.tensor([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(out.detach().numpy(), [[1 + 1.0 + 9, -2 - 0.5 + 12]])
    out.sum().backward()
    grad = linear.fixed.grad.numpy()
    assert np.all(grad[[0, 2]] == 0) and np.all(grad[1] == 2.0)


def test_rounding_offsets_round_through_and_clamp():
    """An offset past +-0.5 moves the integer one step (never more, never past the type's range), the outlier
    rows stay zero, and the gradient reaches the offset straight through the rounding."""
    values = np.array([[7, -8, 0, 3], [0, 0, 0, 0], [1, 2, -3, -1]], dtype=np.int8)
    layer = BlockScaled("m", values, np.ones((1, 4), dtype=np.float32), block_size=4, outliers=(1,),
                        outlier_rows=np.full((1, 4), 0.5, dtype=np.float32))
    linear = block_scaled_linear_class()(layer, None, rounding=True)
    with torch.no_grad():
        linear.offset.copy_(torch.tensor([[0.9, -3.0, 0.4, -0.6], [1.0, 1.0, -1.0, 1.0], [2.5, -0.51, 0.49, 0.0]]))
    expected = np.array([[7, -8, 0, 2], [0, 0, 0, 0], [2, 1, -3, -1]], dtype=np.float32)
    np.testing.assert_array_equal(linear.integers().detach().numpy(), expected)
    linear(torch.ones(1, 3)).sum().backward()
    assert linear.offset.grad is not None and torch.count_nonzero(linear.offset.grad[2]) > 0


@pytest.mark.parametrize("fields, message", [
    (dict(name="w8a8", distill_steps=5), "weight-only w4a16"),
    (dict(name="w4a16", distill_steps=-1), r"0 \(off\) or positive"),
    (dict(name="w4a16", distill_norms=True), "give --distill-steps"),
    (dict(name="w4a16", distill_rounding=True), "give --distill-steps"),
    (dict(name="w4a16", distill_outlier_rows=True), "give --distill-steps"),
    (dict(name="w4a16", distill_steps=5, distill_outlier_rows=True, outliers=0), "--outliers 0"),
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


@pytest.mark.parametrize("flags", [["--distill-rounding-lr", "0.1"],
                                   ["--distill-steps", "5", "--distill-rounding", "--distill-rounding-lr", "0"]])
def test_bad_rounding_rate_is_refused_before_any_work(capsys, tiny_exports, tmp_path, flags):
    from tests.unit.test_cli_errors import assert_user_error, run_cli

    _, folder = tiny_exports["llama"]
    code, _, err = run_cli(capsys, "quantize", str(folder), "--recipe", "w4a16", "--profile", str(tmp_path / "p"),
                           "-o", str(tmp_path / "q"), *flags)
    assert_user_error(code, err, "--distill-rounding-lr takes a positive rate and needs --distill-rounding")
    assert not (tmp_path / "q").exists()
    with pytest.raises(UserError, match="needs rounding on"):
        DistillConfig(steps=5, rounding_lr=0.1)


def test_replica_needs_every_parameter(tiny_exports):
    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    weights.pop("model.norm.weight")
    with pytest.raises(UserError, match="no weight for model.norm.weight"):
        build_replica(folder, weights)
