"""Outlier rows folded into the INT4 weights as two planes (recipe key ``outliers.planes``): the model against an
independent NumPy emulation, ONNX Runtime's single MatMulNBits per layer, merging, the bit count, the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from accullm_export.graph.passes.fold_outlier_planes import COPIES
from tests.helpers.recipes import make_recipe, write_config
from tests.helpers.emulation import np_round_symmetric, np_symmetric_scales
from tests.helpers.graphs import builds_equal_emulation, fused_at_level_1, llm_feed, ort_logits


def _half(scale: np.ndarray) -> np.ndarray:
    return np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)


def np_planes(rows: np.ndarray, row_scales: np.ndarray, importance: np.ndarray, copies: int = 2) -> np.ndarray:
    """What two INT4 planes keep of ``rows`` [n, N], column by column and entry by entry: plane 1 on each row's
    block grid (int4's full range, -8..7); plane 2, read ``copies`` times, an integer in [-8 copies, 7 copies]
    times one FP16 scale per column, searched over 2^(k/8) times absmax / (7 copies) of what plane 1 alone leaves
    (k = -40..8) for the least E[x^2]-weighted squared error; each entry takes the plane-2 integer of least error
    (the first on ties)."""
    out = np.empty_like(rows)
    for column in range(rows.shape[1]):
        scales, target = row_scales[:, column], rows[:, column]
        anchor = np.abs(target - np.clip(np.rint(target / scales), -8, 7) * scales).max() / np.float32(7 * copies)
        best = None
        for k in range(-40, 9):
            scale = _half(np.float32(anchor * np.float32(2.0 ** (k / 8))))
            kept = np.empty_like(target)
            for row in range(len(target)):
                options = []
                for second in range(-8 * copies, 7 * copies + 1):
                    rest = target[row] - np.float32(second) * scale
                    first = np.clip(np.rint(rest / scales[row]), -8, 7)
                    options.append((abs(rest - first * scales[row]), first * scales[row] + np.float32(second) * scale))
                kept[row] = min(options, key=lambda option: option[0])[1]
            cost = float((importance * (target - kept).astype(np.float64) ** 2).sum())
            if best is None or cost < best[0]:
                best = (cost, kept)
        out[:, column] = best[1]
    return out


def _emulator(profile):
    from accullm_export.calibration.profile import load_profile

    loaded = load_profile(profile)

    def emulate(weight: np.ndarray, plan) -> np.ndarray:
        if not plan.outliers:
            return np_round_symmetric(weight, plan.bits, plan.block_size) if plan.quantized else weight
        rows = list(plan.outliers)
        rest = weight.copy()
        rest[rows] = 0
        out = np_round_symmetric(rest, plan.bits, plan.block_size)
        scales = np_symmetric_scales(rest, plan.bits, plan.block_size)  # the scales np_round_symmetric used
        importance = loaded.input_statistics(plan.input)["second_moment"][rows].astype(np.float64)
        out[rows] = np_planes(weight[rows].astype(np.float16).astype(np.float32), scales[rows], importance)
        return out

    return emulate


def test_planes_equal_numpy_emulation(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, embeddings="fp32", outlier_planes=True)
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)
    assert [layer for layer in manifest["layers"] if layer["outliers"]]
    builds_equal_emulation(folder, manifest, tmp_path, _emulator(profile))
    for build in ("q", "u"):
        names = [node.name for node in onnx.load(str(tmp_path / build / "model.onnx")).graph.node]
        assert not [name for name in names if "/outliers/MatMul" in name or name.endswith("/outliers/Add")]
        assert [name for name in names if name.endswith("/outlier_planes/Concat")]


def test_onnxruntime_runs_one_matmulnbits_per_layer(planted_model, profile, tmp_path):
    """Asymmetric weights with 8-bit scale codes, merged: each merged layer is one MatMulNBits over K + 2 |O|
    inputs, and ONNX Runtime's fused graph (accuracy level 1) computes what the unfused one does."""
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, embeddings="fp32", asymmetric=True, scale_bits=8,
                    outlier_planes=True)
    manifest = quantize_model(folder, tmp_path / "u", recipe, profile)
    assert any("outlier branches folded into their INT4 weights as two planes" in note for note in manifest["notes"])
    session, nodes = fused_at_level_1(tmp_path / "u" / "model.onnx", tmp_path)
    assert not [node for node in nodes if node.op_type in ("DequantizeLinear", "MatMul")]
    hidden = next(layer["in_features"] for layer in manifest["layers"] if layer["outliers"])
    widths = {next(a.i for a in node.attribute if a.name == "K") for node in nodes if node.op_type == "MatMulNBits"}
    outliers = {len(layer["outliers"]) for layer in manifest["layers"] if layer["outliers"]}
    assert {hidden + COPIES * count for count in outliers} <= widths
    feed = llm_feed(folder)
    np.testing.assert_allclose(session.run(["logits"], feed)[0], ort_logits(tmp_path / "u" / "model.onnx", feed),
                               rtol=1e-4, atol=1e-4)


def test_planes_stay_close_to_the_fp16_rows_and_cost_fewer_bits(planted_model, profile, tmp_path):
    folder, _ = planted_model
    branch = quantize_model(folder, tmp_path / "b", make_recipe(name="w4a16", block_size=32, embeddings="fp32"), profile)
    planes = quantize_model(folder, tmp_path / "p", make_recipe(name="w4a16", block_size=32, embeddings="fp32",
                                                           outlier_planes=True), profile)
    for layer, other in zip(planes["layers"], branch["layers"]):
        # n FP16 rows (16 bits an entry) become 2 n INT4 entries of plane 2 (read twice) and one more FP16 scale
        # per column; plane 1 reuses the zero rows the INT4 part already stored
        rows, columns = len(layer["outliers"]), layer["out_features"]
        saved = (16 * rows - 2 * 4 * rows - 16) * columns if rows else 0
        assert layer["bits_per_weight"] == pytest.approx(
            other["bits_per_weight"] - saved / (layer["in_features"] * columns), abs=1e-3)
    feed = llm_feed(folder)
    reference = ort_logits(folder / "model.onnx", feed)
    branch_error = np.abs(ort_logits(tmp_path / "b" / "model.onnx", feed) - reference).mean()
    planes_error = np.abs(ort_logits(tmp_path / "p" / "model.onnx", feed) - reference).mean()
    assert planes_error < 1.1 * branch_error


def test_layers_in_another_form_keep_their_branch(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, embeddings="fp32", outlier_planes=True,
                    overrides=(("layers.0", "int8"),))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    kept = [note for note in manifest["notes"] if "its outlier branch stays" in note]
    assert kept and all("layers.0" in note for note in kept)
    names = [node.name for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node]
    assert [name for name in names if "layers.0" in name and name.endswith("/outliers/Add")]
    assert not [name for name in names if "layers.1" in name and name.endswith("/outliers/Add")]


def test_planes_need_int4_layers_with_a_branch():
    with pytest.raises(UserError, match="outliers.planes"):
        make_recipe(name="w4a16", outliers=0, outlier_planes=True)
    with pytest.raises(UserError, match="outliers.planes"):
        make_recipe(name="fp16", outlier_planes=True)
    with pytest.raises(UserError, match="outliers.planes"):
        make_recipe(name="w8a8", outlier_planes=True)


def test_quantize_cli_reports_planes(planted_model, profile, tmp_path, capsys):
    from accullm_export.cli.main import main

    folder, _ = planted_model
    config = write_config(tmp_path / "planes.toml", make_recipe(name="w4a16", outlier_planes=True))
    assert main(["quantize", str(folder), "--config", config, "--profile", str(profile), "--block-size", "32",
                 "-o", str(tmp_path / "q")]) == 0
    assert "rows folded into INT4 planes" in capsys.readouterr().out


def test_branches_on_the_attention_sinks_activations_stay(planted_model, profile, tmp_path, monkeypatch):
    """An input whose outlier channels see the attention sink's activations far beyond their usual range keeps its
    FP16 branch (folded rows would carry those activations' errors into every later token); the rest fold."""
    from accullm_export.calibration.profile import Profile

    original = Profile.input_statistics

    def with_a_sink(self, tensor):
        statistics = dict(original(self, tensor))
        if "layers.1/post_attention_layernorm" in tensor:
            statistics["sink_absmax"] = np.asarray(statistics["p999"]) * 1000
        return statistics

    monkeypatch.setattr(Profile, "input_statistics", with_a_sink)
    folder, _ = planted_model
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=32, embeddings="fp32",
                                                             outlier_planes=True), profile, finishing=())
    kept = [note for note in manifest["notes"] if "attention sink" in note]
    assert kept and all("layers.1/mlp/" in note and "1000x" in note for note in kept)
    names = [node.name for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node]
    branches = {name.split("/")[2] + "/" + name.split("/")[4] for name in names if name.endswith("/outliers/Add")}
    assert branches == {"layers.1/gate_proj", "layers.1/up_proj"}


def test_plane_two_copies_sum_to_its_integer():
    from accullm_export.graph.passes.fold_outlier_planes import split_copies

    total = np.arange(-16, 15).reshape(1, -1)
    first, second = split_copies(total, 2)
    assert (first + second == total).all() and first.min() >= -8 and second.max() <= 7 and first.max() <= 7


def test_planes_compose_with_sparse_skip(planted_model, profile, tmp_path):
    """The threshold method narrows the down projections' inputs and leaves gate/up (folded) alone; the model runs
    and skips as many MLPs as without the planes."""
    folder, _ = planted_model
    runs = {}
    for planes in (False, True):
        out = tmp_path / ("p" if planes else "b")
        runs[planes] = quantize_model(folder, out, make_recipe(name="w4a16", block_size=32, outlier_planes=planes,
                                                               sparsity=0.5), profile)
        assert np.isfinite(ort_logits(out / "model.onnx", llm_feed(folder))).all()
    assert runs[True]["sparsity"]["mlps"] == runs[False]["sparsity"]["mlps"] > 0
    assert any("two planes" in note for note in runs[True]["notes"])


def test_int8_rows_go_to_the_branches_the_planes_leave(planted_model, profile, tmp_path):
    """``build --target cpu`` asks for both: the planes fold from the FP16 rows (no double rounding), and the
    branches left (here layers.0's, an INT8 per-channel override) store INT8 rows."""
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, embeddings="fp32", outlier_planes=True, outlier_bits=8,
                    overrides=(("layers.0", "int8"),))
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    names = [node.name for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node]
    int8_rows = {name.split("/")[2] for name in names if name.endswith("/outlier_weight/DequantizeLinear")}
    assert int8_rows == {"layers.0"}
    assert not [name for name in names if "layers.1" in name and name.endswith("/outliers/Add")]
    assert not [note for note in manifest["notes"] if "its rows stay as they are" in note]


def test_a_folded_head_takes_the_vocabulary_refinement(planted_model, profile, tmp_path):
    """vocab.refine_rows measures the head as saved: folded, it reads Concat(x, x[O], x[O]), whose map from x the
    refinement inverts as it does a rotation; the result is as close to the fp32 logits as with the head's branch."""
    folder, _ = planted_model
    common = dict(name="w4a16", block_size=32, refine_vocab=16, min_outliers=(("lm_head", 2),))
    planes = quantize_model(folder, tmp_path / "p", make_recipe(outlier_planes=True, **common), profile)
    quantize_model(folder, tmp_path / "b", make_recipe(**common), profile)
    names = [node.name for node in onnx.load(str(tmp_path / "p" / "model.onnx")).graph.node]
    assert not [name for name in names if name.startswith("/lm_head/") and name.endswith("/outliers/Add")]
    assert any(note.startswith("/lm_head/MatMul: its 16 vocabulary rows") for note in planes["notes"])
    feed = llm_feed(folder)
    reference = ort_logits(folder / "model.onnx", feed)
    errors = [np.abs(ort_logits(tmp_path / build / "model.onnx", feed) - reference).mean() for build in ("p", "b")]
    assert errors[0] < 1.1 * errors[1]
