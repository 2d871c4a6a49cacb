"""The LM head's refined vocabulary rows (recipe key ``vocab.refine_rows``): the ranking against a plain loop, the
refined model against an independent NumPy emulation (rotated head, and plain), what it stores, its fusion into
MatMulNBits, the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from accullm_export.graph.passes.refine_vocab_rows import ranked_columns
from accullm_export.graph.layer_plan import LayerPlan
from tests.helpers.recipes import make_recipe, write_config
from accullm_export.runtime.intermediates import IntermediateReader
from tests.helpers.emulation import emulate_rotated, emulate_weight, np_hadamard, np_round_symmetric, rotation_signs
from tests.helpers.graphs import fused_at_level_1, llm_feed, ort_logits

W4 = dict(name="w4a16", block_size=16, embeddings="fp32")
HEAD = "/lm_head/MatMul"


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 8 * 11 * 5, 1])  # all rows at once, 5 rows, 1 row at a time
def test_ranked_columns_match_a_loop(chunk_bytes, monkeypatch):
    from accullm_export.graph.passes import refine_vocab_rows

    monkeypatch.setattr(refine_vocab_rows, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    samples, weight = rng.normal(size=(37, 8)), rng.normal(size=(8, 11))
    error = rng.normal(size=(8, 11)) * rng.uniform(0, 1, size=11)
    importance = np.zeros(11)
    for x in samples:
        logits = [float(x @ weight[:, v]) for v in range(11)]
        total = sum(np.exp(value - max(logits)) for value in logits)
        for v in range(11):
            importance[v] += np.exp(logits[v] - max(logits)) / total * float(x @ error[:, v]) ** 2
    expected = sorted(int(v) for v in np.argsort(-importance)[:4])
    assert list(ranked_columns(samples.astype(np.float32), weight.astype(np.float32), error.astype(np.float32),
                               4)) == expected


def _head(folder):
    model = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, initializers


@pytest.mark.parametrize("rotate", [(), ("lm_head",)])
def test_refined_head_equals_numpy_emulation(planted_model, profile, tmp_path, rotate):
    folder, _ = planted_model
    base = quantize_model(folder, tmp_path / "b", make_recipe(**W4, rotate=rotate), profile)
    refined = quantize_model(folder, tmp_path / "r", make_recipe(**W4, rotate=rotate, refine_vocab=24), profile)
    layer = next(layer for layer in refined["layers"] if layer["node"] == HEAD)
    plan = LayerPlan(**{k: (tuple(v) if k == "outliers" else v) for k, v in layer.items()
                        if k in LayerPlan.__dataclass_fields__})
    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    weight = source[plan.weight]
    emulate = emulate_rotated(tmp_path / "b") if rotate else emulate_weight
    error = weight - emulate(weight, plan)  # the head's rounding error, emulated independently of the build
    model, initializers = _head(tmp_path / "r")
    columns = initializers[f"{HEAD}/vocab_rows_columns"].reshape(-1)
    assert len(columns) == 24 == len(set(columns.tolist())) and list(columns) == sorted(columns)
    assert np.abs(error[:, columns]).sum() > 0
    target = error[:, columns]
    if rotate:  # the correction reads x R, R = diag(signs) H: it carries R^T d_v
        rotation = np.zeros((weight.shape[0], weight.shape[0]))
        for start in range(0, weight.shape[0], plan.rotation):
            rotation[start:start + plan.rotation, start:start + plan.rotation] = np_hadamard(plan.rotation)
        rotation *= rotation_signs(tmp_path / "b", HEAD).astype(np.float64)[:, None]
        target = (rotation.T @ target).astype(np.float32)
    correction = np_round_symmetric(target, 4, plan.block_size)
    assert np.linalg.norm(target - correction) < 0.2 * np.linalg.norm(target)
    feed = llm_feed(folder)
    x = IntermediateReader(tmp_path / "b" / "model.onnx").run(feed, [layer["input"]])[layer["input"]]
    expected = ort_logits(tmp_path / "b" / "model.onnx", feed).copy()
    expected[..., columns] += x @ correction
    got = ort_logits(tmp_path / "r" / "model.onnx", feed)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(weight.shape[1]), columns)
    np.testing.assert_array_equal(got[..., others], expected[..., others])
    onnx.checker.check_model(model, full_check=True)
    # what it stores: int4 [C, K], FP16 scales [C / block, K] and int32 column indices, counted with the head
    extra = weight.shape[0] * 24 // 2 + weight.shape[0] // plan.block_size * 24 * 2 + 24 * 4
    before = next(item for item in base["layers"] if item["node"] == HEAD)["bits_per_weight"]
    assert layer["bits_per_weight"] == pytest.approx(before + extra * 8 / weight.size, abs=2e-4)
    assert any(HEAD in note and "vocab.refine_rows" in note for note in refined["notes"])


def test_refined_head_merges_into_its_matmulnbits(planted_model, profile, tmp_path):
    folder, _ = planted_model
    quantize_model(folder, tmp_path / "b", make_recipe(**W4, rotate=("lm_head",)), profile)
    quantize_model(folder, tmp_path / "r", make_recipe(**W4, rotate=("lm_head",), refine_vocab=24), profile)
    counts = []
    for build in ("b", "r"):
        (tmp_path / build / "opt").mkdir()
        session, nodes = fused_at_level_1(tmp_path / build / "model.onnx", tmp_path / build / "opt")
        counts.append([sum(node.op_type == op for node in nodes) for op in ("MatMulNBits", "MatMul", "Split")])
        feed = llm_feed(folder)
        np.testing.assert_allclose(session.run(["logits"], feed)[0], ort_logits(tmp_path / build / "model.onnx", feed),
                                   rtol=1e-4, atol=1e-4)
    # the correction reads the head's input: merged with the head into one MatMulNBits, split after it
    assert counts[1] == [counts[0][0], counts[0][1], counts[0][2] + 1]


def test_refine_vocab_refusals(planted_model, profile, tmp_path):
    folder, _ = planted_model
    with pytest.raises(UserError, match="vocab.refine_rows: must be 0"):
        make_recipe(**W4, refine_vocab=-1)
    with pytest.raises(UserError, match="vocab.refine_rows: refines an INT4"):
        make_recipe(name="fp16", refine_vocab=8)
    with pytest.raises(UserError, match="over the head's 256 rows"):
        quantize_model(folder, tmp_path / "a", make_recipe(**W4, refine_vocab=257), profile)
    with pytest.raises(UserError, match="it refines an INT4 head"):
        quantize_model(folder, tmp_path / "b", make_recipe(**W4, refine_vocab=8, overrides=(("lm_head", "fp16"),)),
                       profile)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("precision, keys, flags, needle", [
    ("int4", {"samples": 0}, [], "vocab.samples"),
    ("fp16", {}, [], "refines an INT4"),
    ("int4", {}, ["--override", "lm_head=int8"], "lm_head"),
])
def test_refine_vocab_cli_errors(planted_model, profile, tmp_path, capsys, precision, keys, flags, needle):
    from tests.helpers.cli import assert_user_error, run_cli

    folder, _ = planted_model
    config = write_config(tmp_path / "vocab.toml", {"weights": {"precision": precision},
                                                    "vocab": {"refine_rows": 8, **keys}})
    code, _, err = run_cli(capsys, "quantize", str(folder), "--profile", str(profile), "-o", str(tmp_path / "out"),
                           "--config", config, *flags)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "out").exists()
