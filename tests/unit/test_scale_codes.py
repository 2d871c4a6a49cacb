"""8-bit block scales (recipe key ``weights.scale_bits = 8``): the codes, the pass, and the whole model against an
independent NumPy emulation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from accullm_export.build.quantize import quantize_model
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.graph.pipeline import run_passes
from accullm_export.graph.pass_data import PassData
from tests.helpers.recipes import make_recipe, write_config
from accullm_export.graph.rewrite import replace_weight_dequantized
from accullm_export.graph.summary import summarize
from accullm_export.quant import scale_codes
from accullm_export.quant.symmetric import dequantize
from accullm_export.runtime.session import create_session
from tests.helpers.emulation import np_asymmetric_parts
from tests.helpers.graphs import builds_equal_emulation, fused_at_level_1, llm_feed, ort_logits


def np_code(scales: np.ndarray, used: np.ndarray, group: list[np.ndarray]) -> np.ndarray:
    """The decoded scales, by brute force: the grid spans the group's used positive scales in 255 log steps;
    each used scale takes whichever of the 256 float32 grid values is nearest; unused blocks take the first."""
    pool = np.concatenate([s.ravel() for s in group]).astype(np.float64)
    low, high = np.log(pool.min()), np.log(pool.max())
    step = np.float32((high - low) / 255)
    grid = np.exp(np.arange(256, dtype=np.float32) * step + np.float32(low))
    assert abs(float(grid[-1]) / float(pool.max()) - 1) < 1e-5 and low < high
    nearest = grid[np.argmin(np.abs(grid[None, :] - scales.reshape(-1, 1).astype(np.float64)), axis=1)]
    return np.where(used, nearest.reshape(scales.shape), grid[0]).astype(np.float32)


def test_codes_pick_the_nearest_grid_value():
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-9, -3, size=(7, 33))).astype(np.float32)
    log_min, log_step = scale_codes.scale_grid([scales[:3], scales[3:]])
    codes = scale_codes.encode(scales, log_min, log_step)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    decoded = scale_codes.decode(codes, log_min, log_step)
    np.testing.assert_array_equal(decoded, np_code(scales, np.ones(scales.shape, bool), [scales]))
    assert np.abs(decoded / scales - 1).max() <= np.expm1(float(log_step)) / 2 + 1e-6
    zero = scale_codes.encode(np.array([0.0, -1.0, scales.max()], np.float32), log_min, log_step)
    assert zero.tolist() == [0, 0, 255]
    one_value = np.full((2, 2), 0.25, np.float32)
    assert np.allclose(scale_codes.decode(scale_codes.encode(one_value, *scale_codes.scale_grid([one_value])),
                                          *scale_codes.scale_grid([one_value])), 0.25, rtol=1e-6)


def _one_layer_graph(weight: np.ndarray, block: int, asymmetric: bool) -> tuple[gs.Graph, np.ndarray]:
    """A graph y = x @ DequantizeLinear(weight's INT4 blocks) and the float weight that DequantizeLinear gives."""
    from accullm_export.quant.asymmetric import quantize_asymmetric
    from accullm_export.quant.symmetric import quantize

    x = gs.Variable("x", dtype=np.float32, shape=[2, weight.shape[0]])
    y = gs.Variable("y", dtype=np.float32, shape=[2, weight.shape[1]])
    node = gs.Node("MatMul", name="mm", inputs=[x, gs.Constant("w", weight)], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21)
    if asymmetric:
        values, scales, zeros = quantize_asymmetric(weight, block)
    else:
        (values, scales), zeros = quantize(weight, 4, block), None
    replace_weight_dequantized(graph, node, values, scales, 4, block, np.float32, zero_points=zeros)
    return graph, dequantize(values, scales, block)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_pass_keeps_the_integers_and_ignores_all_zero_blocks(asymmetric, tmp_path):
    """A block of zeros (scale 1, far above the others) does not stretch the grid; the output equals the integers
    times the nearest grid scales; the file's scales shrink from 2 bytes to 1 per block."""
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.02, size=(48, 8)).astype(np.float32)
    weight[16:32, 3] = 0  # one all-zero block
    graph, float_weight = _one_layer_graph(weight, 16, asymmetric)
    data = PassData(plans={"mm": object()}, float_dtype=np.dtype(np.float32))
    dequantize_node = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    scales = np.asarray(next(t for t in graph.tensors().values() if t.name == "mm/weight_scale").values, np.float32)
    assert scales[1, 3] == 1.0
    used = np.ones(scales.shape, bool)
    used[1, 3] = False
    graph, (report,), _ = run_passes(graph, ["code_block_scales"], data)
    assert sorted(n.op for n in graph.nodes) == ["Add", "Cast", "DequantizeLinear", "Exp", "MatMul", "Mul"]
    assert report.constant_bytes_before - report.constant_bytes_after == scales.size - 8  # - the two scalars
    expected_scales = np_code(scales, used, [scales[used]])
    values = float_weight / np.repeat(scales, 16, axis=0)
    expected = np.round(values) * np.repeat(expected_scales, 16, axis=0)
    path = tmp_path / "m.onnx"
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.save(model, str(path))
    onnx.checker.check_model(model, full_check=True)
    feed = {"x": rng.normal(size=(2, 48)).astype(np.float32)}
    out = create_session(path, device="cpu", optimization="basic").run(["y"], feed)[0]
    np.testing.assert_allclose(out, feed["x"] @ expected, rtol=1e-5, atol=1e-6)
    from accullm_export.graph.outlier_branch import constant_value
    np.testing.assert_allclose(constant_value(dequantize_node.outputs[0]), expected, rtol=1e-6, atol=0)
    assert any("8-bit log codes" in note for note in report.notes)

    # the TensorRT bundle's fold turns the codes back into constant scales with the same values
    folded, _, _ = run_passes(graph, [("fold_scale_casts", None)])
    scale = next(n for n in folded.nodes if n.op == "DequantizeLinear").inputs[1]
    assert isinstance(scale, gs.Constant)
    np.testing.assert_array_equal(np.asarray(scale.values), expected_scales)


def test_model_with_codes_equals_emulation_and_fuses(planted_model, profile, tmp_path):
    """The whole tiny model (asymmetric, block 16, q/k/v and gate/up merged) equals an emulation that codes each
    input's readers on one grid; ONNX Runtime still fuses MatMulNBits; the manifest counts 8 bits per block
    (plus the grid's two float32 values per layer); inspect shows the codes."""
    folder, _ = planted_model
    base = dict(name="w4a16", block_size=16, embeddings="fp32", asymmetric=True)
    manifest = quantize_model(folder, tmp_path / "q", make_recipe(**base, scale_bits=8), profile)
    unmerged = quantize_model(folder, tmp_path / "u", make_recipe(**base, scale_bits=8), profile, finishing=())
    sixteen = quantize_model(folder, tmp_path / "f", make_recipe(**base), profile, finishing=())
    assert manifest["recipe"]["weights"]["scale_bits"] == 8
    assert any("8-bit log codes" in note for note in manifest["notes"])

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    grids: dict[str, list] = {}
    rounded = {}
    for layer in unmerged["layers"]:
        rest = weights[layer["weight"]].astype(np.float32).copy()
        rest[list(layer["outliers"])] = 0
        values, scales, _ = np_asymmetric_parts(rest, 16)
        padded = np.zeros((scales.shape[0] * 16, scales.shape[1]), bool)
        padded[:values.shape[0]] = values != 0
        used = padded.reshape(scales.shape[0], 16, -1).any(axis=1)
        rounded[layer["node"]] = (values, scales, used)
        grids.setdefault(layer["input"], []).append(scales[used])

    def emulate(weight, plan):
        values, scales, used = rounded[plan.node]
        coded = np_code(scales, used, grids[plan.input])
        out = values.astype(np.float32) * np.repeat(coded, 16, axis=0)[:values.shape[0]]
        out[list(plan.outliers)] = weight[list(plan.outliers)].astype(np.float16).astype(np.float32)
        return out

    feed, expected = builds_equal_emulation(folder, unmerged, tmp_path, emulate)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Exp" for n in model.graph.node) < len(unmerged["layers"])  # the merged share one

    for layer in unmerged["layers"]:  # 8 bits per block fewer, 64 bits per layer more
        count = layer["in_features"] * layer["out_features"]
        blocks = -(-layer["in_features"] // 16) * layer["out_features"]
        change = unmerged["size"]["layers"][layer["node"]] - sixteen["size"]["layers"][layer["node"]]
        assert abs(change - (64 - 8 * blocks) / count) <= 2e-4
    storages = {layer.node: layer.dtype for layer in summarize(onnx.load(str(tmp_path / "u" / "model.onnx"),
                                                                           load_external_data=False)).linear_layers}
    assert storages["/model/layers.1/mlp/down_proj/MatMul"] == "uint4+zp/b16/s8"

    session, nodes = fused_at_level_1(tmp_path / "q" / "model.onnx", tmp_path)
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulNBits") >= 1 and "Exp" not in ops and "DequantizeLinear" not in ops
    np.testing.assert_allclose(session.run(["logits"], feed)[0], expected, rtol=1e-4, atol=1e-4)


def test_cli_flag_and_refusals(planted_model, profile, tmp_path):
    folder, _ = planted_model
    config = write_config(tmp_path / "codes.toml", make_recipe(name="w4a16", scale_bits=8))
    assert main(["quantize", str(folder), "--config", config, "--block-size", "16", "--profile", str(profile),
                 "-o", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["recipe"]["weights"]["scale_bits"] == 8
    for fields in (dict(name="w8a8", scale_bits=8), dict(name="fp16", scale_bits=8)):
        with pytest.raises(UserError, match="blocked INT4 layers"):
            make_recipe(**fields)
    with pytest.raises(UserError, match="weights.scale_bits: must be one of 16, 8"):
        make_recipe(name="w4a16", scale_bits=4)
    make_recipe(name="w8a8", scale_bits=8, overrides=(("lm_head", "int4"),))  # an INT4 override is enough


def test_sparse_skip_composes_with_codes(planted_model, profile, tmp_path):
    """quantize --sparsity narrows the dequantized weight (Compress after DequantizeLinear), so it reads coded
    scales as it reads FP16 ones: the down projections keep their codes, and the model equals the FP16-scale
    sparse build up to the scales' moves."""
    folder, _ = planted_model
    built = {}
    for bits in (8, 16):
        quantize_model(folder, tmp_path / f"s{bits}", make_recipe(name="w4a16", block_size=16, scale_bits=bits,
                                                                  sparsity=0.5), profile)
        built[bits] = ort_logits(tmp_path / f"s{bits}" / "model.onnx", llm_feed(folder))
    model = onnx.load(str(tmp_path / "s8" / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    down = next(n for n in model.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    dequantize = producers[producers[down.input[1]].input[0]]
    assert producers[down.input[1]].op_type == "Compress" and dequantize.op_type == "DequantizeLinear"
    assert producers[dequantize.input[1]].op_type == "Exp"
    spread = np.abs(built[16]).max()
    assert 0 < np.abs(built[8] - built[16]).max() < 0.05 * spread
