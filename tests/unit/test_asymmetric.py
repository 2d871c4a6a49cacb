"""Asymmetric blocked INT4 (recipe key ``weights.asymmetric``): uint4 values with a zero point per block, equal to an
independent NumPy emulation, through rounding, GPTQ, the merge, distillation and ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest

from accullm_export.build.quantize import quantize_model
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from tests.helpers.recipes import make_recipe, write_config
from accullm_export.quant.asymmetric import quantize_asymmetric
from accullm_export.quant.gptq import gptq_grid, gptq_proxy_error, gptq_quantize
from accullm_export.quant.symmetric import CLIP_RATIOS, dequantize
from accullm_export.runtime.session import create_session
from tests.helpers.emulation import np_round_asymmetric
from tests.helpers.graphs import builds_equal_emulation, fused_at_level_1, ort_logits, read_initializers

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("rows, block", [(64, 16), (40, 16)])  # 40: a short last block
def test_plain_grid_equals_the_emulation(rows, block):
    weight = RNG.normal(size=(rows, 24)).astype(np.float32)
    weight[:, 3] = np.abs(weight[:, 3])  # a column with no negative weight: zero point 0
    weight[:16, 5] = 0.0  # an all-zero block
    values, scales, zeros = quantize_asymmetric(weight, block)
    expected, expected_zeros = np_round_asymmetric(weight, block)
    np.testing.assert_array_equal(dequantize(values, scales, block), expected)
    np.testing.assert_array_equal(zeros, expected_zeros)
    assert zeros[:, 3].max() == 0 and values.min() >= -15 and values.max() <= 15


def test_search_matches_brute_force_and_beats_the_symmetric_grid():
    """The searched grid is the best of every (low, high) shrink pair per block, weighted by importance, and its
    weighted error is below the symmetric searched grid's on skewed blocks."""
    from accullm_export.quant.symmetric import quantize

    weight = (RNG.normal(size=(32, 6)) + 0.6).astype(np.float32)  # skewed: mostly positive
    importance = RNG.uniform(0.1, 3.0, size=32)
    values, scales, _ = quantize_asymmetric(weight, 16, search=True, importance=importance)
    found = dequantize(values, scales, 16)

    def weighted(result, rows):
        return (importance[rows, None] * (result[rows] - weight[rows]) ** 2).sum(axis=0)

    for start in (0, 16):
        rows = slice(start, start + 16)
        best = np.full(6, np.inf)
        for low_ratio in CLIP_RATIOS:
            for high_ratio in CLIP_RATIOS:
                candidate, _ = np_round_asymmetric(weight[rows], 16, low_ratio, high_ratio)
                best = np.minimum(best, (importance[rows, None] * (candidate - weight[rows]) ** 2).sum(axis=0))
        np.testing.assert_allclose(weighted(found, rows), best, rtol=1e-5)
    symmetric = dequantize(*quantize(weight, 4, 16, search=True, importance=importance), 16)
    assert weighted(found, slice(0, 32)).sum() < 0.7 * weighted(symmetric, slice(0, 32)).sum()


@pytest.mark.parametrize("search", ["asymmetric", "symmetric"])
def test_search_in_column_parts_on_threads_equals_one_part(monkeypatch, search):
    """The searches split the output columns into cache-sized parts run on threads: parts of one column each
    (many threads) give the same grid, bit for bit, as one part holding every column."""
    from accullm_export.quant import symmetric
    from accullm_export.quant.asymmetric import asymmetric_grid

    weight = RNG.normal(size=(40, 23)).astype(np.float32)  # a short last block
    importance = RNG.uniform(0.1, 3.0, size=40)

    def searched():
        if search == "asymmetric":
            return asymmetric_grid(weight, 16, search=True, importance=importance)
        return (symmetric.searched_scales(weight, 4, 16, importance=importance),)

    monkeypatch.setattr(symmetric, "SEARCH_ELEMENTS", 1 << 20)
    whole = searched()
    monkeypatch.setattr(symmetric, "SEARCH_ELEMENTS", 1)
    monkeypatch.setattr(symmetric.os, "cpu_count", lambda: 4)
    for expected, found in zip(whole, searched()):
        np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("mode", [dict(asymmetric=True, search=True), dict(asymmetric=True),
                                  dict(search=True), dict()])
def test_gptq_grid_in_column_parts_is_the_whole_grid(mode):
    """The grid is made a part of the output columns at a time (a large head's working copies): parts of 4
    and 7 columns, the last one short, give exactly the grid of the whole weight."""
    weight = RNG.normal(size=(40, 23)).astype(np.float32)
    weight[:, 5] *= 30  # a column of another range
    inputs = RNG.normal(size=(200, 40))
    hessian = inputs.T @ inputs / len(inputs)
    whole = gptq_grid(weight, hessian, 4, 16, exclude=[3], columns=1000, **mode)
    for columns in (4, 7):
        parts = gptq_grid(weight, hessian, 4, 16, exclude=[3], columns=columns, **mode)
        np.testing.assert_array_equal(parts[0], whole[0])
        assert whole[0].shape == (3, 23)
        if mode.get("asymmetric"):
            np.testing.assert_array_equal(parts[1], whole[1])
        else:
            assert parts[1] is None and whole[1] is None


def test_gptq_rounds_into_each_blocks_range():
    """With an identity Hessian GPTQ is plain asymmetric rounding; with a correlated one it lowers the
    layer-output error, and every value stays in its block's [-z, 15 - z]."""
    weight = RNG.normal(size=(48, 10)).astype(np.float32)
    identity = np.eye(48)
    grid = gptq_grid(weight, identity, 4, 16, asymmetric=True)
    values, scales = gptq_quantize(weight, identity, 4, 16, grid=grid)
    expected_values, expected_scales, expected_zeros = quantize_asymmetric(weight, 16)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(grid[1], expected_zeros)

    inputs = RNG.normal(size=(400, 48)) @ RNG.normal(size=(48, 48)) * 0.3
    hessian = inputs.T @ inputs / len(inputs)
    grid = gptq_grid(weight, hessian, 4, 16, exclude=[7], asymmetric=True)
    values, scales = gptq_quantize(weight, hessian, 4, 16, exclude=[7], act_order=True, grid=grid)
    zeros = grid[1][np.arange(48) // 16].astype(np.int16)
    assert (values >= -zeros).all() and (values <= 15 - zeros).all() and not values[7].any()
    rest = weight.copy()
    rest[7] = 0
    plain = dequantize(*quantize_asymmetric(rest, 16, importance=np.where(np.arange(48) == 7, 0, 1))[:2], 16)
    assert gptq_proxy_error(rest, dequantize(values, scales, 16), hessian) < gptq_proxy_error(rest, plain, hessian)
    with pytest.raises(UserError, match="asymmetric grid"):
        gptq_quantize(weight, hessian, 4, 16, grid=(scales[:1], grid[1][:1]))


def test_model_equals_emulation_and_runs_as_matmulnbits(planted_model, profile, tmp_path):
    """uint4 values and zero points behind DequantizeLinear; ONNX Runtime (basic) equals the NumPy emulation;
    at ORT_ENABLE_ALL the layers fuse into MatMulNBits with zero points; the manifest counts the zero points'
    4 bits per block; merged q/k/v keep the numerics."""
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=16, embeddings="fp32", asymmetric=True)
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile)
    unmerged = quantize_model(folder, tmp_path / "u", recipe, profile, finishing=())
    assert manifest["recipe"]["weights"]["asymmetric"] is True

    def emulate(weight, plan):
        rest = weight.copy()
        rest[list(plan.outliers)] = 0
        out, _ = np_round_asymmetric(rest, 16)
        out[list(plan.outliers)] = weight[list(plan.outliers)].astype(np.float16).astype(np.float32)
        return out

    feed, _ = builds_equal_emulation(folder, manifest, tmp_path, emulate)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    dequantize_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                        and any(a.name == "block_size" for a in n.attribute)]
    stored = read_initializers(tmp_path / "q" / "model.onnx")
    assert dequantize_nodes and all(len(n.input) == 3 for n in dequantize_nodes)
    assert all(stored[n.input[0]].dtype == ml_dtypes.uint4 and stored[n.input[2]].dtype == ml_dtypes.uint4
               for n in dequantize_nodes)
    assert any(stored[n.input[2]].astype(np.uint8).max() > 0 for n in dequantize_nodes)

    # MatMulNBits at accuracy level 1 (float inputs) computes exactly what basic does: the zero points are right
    session, nodes = fused_at_level_1(tmp_path / "q" / "model.onnx", tmp_path)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) >= 4 and n.input[3] for n in nbits)  # the zero points are its 4th input
    basic = ort_logits(tmp_path / "q" / "model.onnx", feed)
    np.testing.assert_allclose(session.run(["logits"], feed)[0], basic, rtol=1e-4, atol=1e-4)
    fused = create_session(tmp_path / "q" / "model.onnx", device="cpu", optimization="all").run(["logits"], feed)[0]
    assert np.abs(fused - basic).max() < 0.1 * np.abs(basic).max()  # the default level 4: int8 inputs

    symmetric = quantize_model(folder, tmp_path / "s", make_recipe(name="w4a16", block_size=16, embeddings="fp32"),
                               profile)
    int4_layers = [layer for layer in unmerged["layers"] if layer["precision"] == "int4"]
    assert len(int4_layers) == len(unmerged["layers"]) > 10
    for layer in int4_layers:
        extra = manifest["size"]["layers"][layer["node"]] - symmetric["size"]["layers"][layer["node"]]
        blocks = -(-layer["in_features"] // 16) * layer["out_features"]
        assert abs(extra - round(blocks * 4 / (layer["in_features"] * layer["out_features"]), 4)) <= 2e-4


def test_gptq_and_distillation_take_zero_points(planted_model, profile, tmp_path):
    """GPTQ rounds onto the asymmetric grid (the build would refuse a value outside [0, 15]); distillation reads
    v = q - z, moves only the scales and keeps a lower KL; the config file key reaches the manifest."""
    pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
    from accullm_export.graph.ir import constant_array, load_graph
    from accullm_export.graph.outlier_branch import constant_value
    from accullm_export.graph.passes.distill_scales import block_scaled_layers
    from tests.helpers.distill import assert_same_size_and_lower_kl, plain_and_trained

    folder, text = planted_model
    base = dict(name="w4a16", block_size=16, embeddings="fp32", asymmetric=True, policy="ratio")
    quantize_model(folder, tmp_path / "g", make_recipe(**base, gptq=True, scale_search=True), profile,
                   finishing=())
    graph, _ = load_graph(tmp_path / "g" / "model.onnx")
    layers, _, dequantizers = block_scaled_layers(graph, [])
    assert layers
    for layer in layers:  # the signed values the replica trains on give back what DequantizeLinear computes
        node = dequantizers[layer.module]
        stored, zeros = (constant_array(node.inputs[i]).astype(np.float32) for i in (0, 2))
        rows = np.arange(stored.shape[0]) // 16
        by_hand = (stored - zeros[rows]) * layer.scales[rows]
        np.testing.assert_array_equal(dequantize(layer.values, layer.scales, 16), by_hand)
        np.testing.assert_array_equal(constant_value(node.outputs[0]), by_hand)
    note, plain, trained = plain_and_trained(planted_model, profile, tmp_path, base=base)
    assert "trained" in note and "left as they were" not in note
    for name in plain:
        if name.endswith(("/weight_quantized", "/weight_zero_point")):
            np.testing.assert_array_equal(plain[name], trained[name])
    assert_same_size_and_lower_kl(folder, text, tmp_path / "trained", tmp_path / "plain")

    config = write_config(tmp_path / "asymmetric.toml", make_recipe(name="w4a16", asymmetric=True))
    assert main(["quantize", str(folder), "--config", config, "--block-size", "16", "--profile", str(profile),
                 "-o", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["recipe"]["weights"]["asymmetric"] is True


@pytest.mark.parametrize("fields, message", [
    (dict(name="w8a8", asymmetric=True), "blocked INT4 layers"),
    (dict(name="fp16", asymmetric=True), "blocked INT4 layers"),
])
def test_bad_asymmetric_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        make_recipe(**fields)
    make_recipe(name="fp16", asymmetric=True, overrides=(("lm_head", "int4"),))  # an INT4 override is enough
