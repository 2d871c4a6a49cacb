"""INT8 outlier rows (recipe key ``outliers.bits = 8``): the model against an independent NumPy emulation, the bit
count, ONNX Runtime's 8-bit MatMulNBits, the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from tests.helpers.recipes import make_recipe, write_config
from tests.helpers.emulation import emulate_weight
from tests.helpers.graphs import builds_equal_emulation, fused_at_level_1, llm_feed, ort_logits


def np_int8_rows(rows: np.ndarray) -> np.ndarray:
    """Rows quantized to INT8 per output column and block of 16 rows: scale = FP16(absmax / 127), at least FP16's
    smallest normal, 1 if zero."""
    out = np.empty_like(rows, dtype=np.float32)
    for start in range(0, rows.shape[0], 16):
        block = rows[start:start + 16].astype(np.float32)
        scale = np.abs(block).max(axis=0) / np.float32(127)
        scale[scale == 0] = 1.0
        scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)
        out[start:start + 16] = np.clip(np.rint(block / scale), -127, 127) * scale
    return out


def _emulate_int8_rows(weight: np.ndarray, plan) -> np.ndarray:
    out = emulate_weight(weight, plan)
    if plan.outliers:
        rows = list(plan.outliers)
        out[rows] = np_int8_rows(weight[rows].astype(np.float16).astype(np.float32))
    return out


def test_int8_rows_equal_numpy_emulation(planted_model, profile, tmp_path):
    folder, _ = planted_model
    recipe = make_recipe(name="w4a16", block_size=32, embeddings="fp32", outlier_bits=8)
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile, finishing=())
    quantize_model(folder, tmp_path / "u", recipe, profile)
    builds_equal_emulation(folder, manifest, tmp_path, _emulate_int8_rows)
    fp16_rows = quantize_model(folder, tmp_path / "f", make_recipe(name="w4a16", block_size=32, embeddings="fp32"),
                               profile, finishing=())
    branched = [layer for layer in manifest["layers"] if layer["outliers"]]
    assert branched
    for layer, other in zip(manifest["layers"], fp16_rows["layers"]):
        # each row entry: 8 bits + one FP16 scale per 16 rows (a partial block counts whole), against 16 bits
        blocks = -(-len(layer["outliers"]) // 16)
        saved = (16 * len(layer["outliers"]) - 8 * len(layer["outliers"]) - 16 * blocks) * layer["out_features"]
        assert layer["bits_per_weight"] == pytest.approx(
            other["bits_per_weight"] - saved / (layer["in_features"] * layer["out_features"]), abs=1e-3)


def test_onnxruntime_runs_the_rows_as_8bit_matmulnbits(planted_model, profile, tmp_path):
    folder, _ = planted_model
    quantize_model(folder, tmp_path / "u", make_recipe(name="w4a16", block_size=32, embeddings="fp32", outlier_bits=8),
                   profile)
    session, nodes = fused_at_level_1(tmp_path / "u" / "model.onnx", tmp_path)
    bits = [next(a.i for a in node.attribute if a.name == "bits") for node in nodes if node.op_type == "MatMulNBits"]
    assert 8 in bits and 4 in bits
    assert not [node for node in nodes if node.op_type in ("DequantizeLinear", "MatMul")]
    feed = llm_feed(folder)
    np.testing.assert_allclose(session.run(["logits"], feed)[0], ort_logits(tmp_path / "u" / "model.onnx", feed),
                               rtol=1e-4, atol=1e-4)


def test_int8_rows_need_a_branch():
    with pytest.raises(UserError, match="outliers.bits: stores the outlier branch's rows as INT8"):
        make_recipe(name="w4a16", outliers=0, outlier_bits=8)
    with pytest.raises(UserError, match="outliers.bits: stores the outlier branch's rows as INT8"):
        make_recipe(name="fp16", outlier_bits=8)
    with pytest.raises(UserError, match="outliers.bits: must be one of 16, 8"):
        make_recipe(name="w4a16", outlier_bits=4)


def test_quantize_cli_reports_int8_rows(planted_model, profile, tmp_path, capsys):
    from accullm_export.cli.main import main

    folder, _ = planted_model
    config = write_config(tmp_path / "rows.toml", make_recipe(name="w4a16", outlier_bits=8))
    assert main(["quantize", str(folder), "--config", config, "--profile", str(profile), "--block-size", "32",
                 "-o", str(tmp_path / "q")]) == 0
    assert "channels in all, rows in INT8" in capsys.readouterr().out
