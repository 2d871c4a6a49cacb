"""The calibration report: outlier ranking, heatmap pooling, a self-contained escaped page, a short summary."""

from __future__ import annotations

import re

import numpy as np
import pytest

from accullm_export import svg
from accullm_export.calibration.report import (format_calibration_summary, pool_channel_max, short_label,
                                               top_outlier_channels, write_calibration_report)
from accullm_export.calibration.stats import SPARSITY_LEVELS, MagnitudeHistogram

SCRIPT = "<script>alert('x')</script>"
NAMES = ["/model/layers.0/input_layernorm/Mul/output_0", f"/model/layers.0/self_attn/{SCRIPT}/output_0",
         "/model/layers.0/mlp/Mul/output_0"]
CHANNELS = [192, 192, 320]
PLANTED = {(2, 250): 140.0, (0, 17): 60.0, (1, 3): 35.0}  # (input index, channel) -> absmax
READERS = {0: ["q_proj", "k_proj", "v_proj"], 1: ["o_proj"], 2: ["down_proj"]}


def _layer(index: int, projection: str, absmax: np.ndarray) -> dict:
    median = float(np.median(absmax))
    candidates = {"ratio": np.flatnonzero(absmax > 20 * median).tolist(),
                  "threshold": np.flatnonzero(absmax > 6.0).tolist(),
                  "topk": np.sort(np.argsort(absmax)[-8:]).tolist()}
    block = "mlp" if projection == "down_proj" else "self_attn"
    return {"node": f"/model/layers.0/{block}/{projection}/MatMul", "input": NAMES[index], "input_index": index,
            "outliers": candidates["ratio"], "candidates": candidates,
            "mlp_down_projection": projection == "down_proj"}


@pytest.fixture(scope="module")
def profile() -> tuple[dict, dict[str, np.ndarray]]:
    """Three layer inputs with planted outlier channels and one down-projection histogram."""
    rng = np.random.default_rng(0)
    arrays = {}
    for index, channels in enumerate(CHANNELS):
        absmax = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        for (planted_index, channel), value in PLANTED.items():
            if planted_index == index:
                absmax[channel] = value
        arrays[f"{index}.absmax"] = absmax
        arrays[f"{index}.p999"] = absmax * 0.5
        arrays[f"{index}.sink_absmax"] = absmax * (30.0 if index == 2 else 0.8)
        arrays[f"{index}.rows"] = np.int64(512)
    histogram = MagnitudeHistogram()
    histogram.update(rng.laplace(0.0, 0.3, (512, CHANNELS[2])))
    arrays["2.magnitude_histogram"] = histogram.counts
    layers = [_layer(index, projection, arrays[f"{index}.absmax"])
              for index, projections in READERS.items() for projection in projections]
    manifest = {
        "model": {"path": "/models/tiny <b>/model.onnx", "sha256": "ab" * 32, "llm": True},
        "source": {"name": "wiki", "split": "calibration"},
        "config": {"samples": 4, "seq_len": 129},
        "policy": {"name": "ratio", "threshold": 6.0, "k": 8, "percent": None, "ratio": 20.0, "version": 1},
        "batches": 4,
        "inputs": [{"name": name, "channels": channels, "rows": 512, "p999_exact": True}
                   for name, channels in zip(NAMES, CHANNELS)],
        "layers": layers,
        "sparsity": {layers[-1]["node"]: {"levels": list(SPARSITY_LEVELS),
                                          "thresholds": histogram.thresholds().tolist()}},
        "versions": {"accullm_export": "0.0.0"},
    }
    return manifest, arrays


def test_top_outlier_channels_rank_planted_channels_by_ratio(profile):
    manifest, arrays = profile
    top = top_outlier_channels(manifest, arrays, top=5)
    planted = sorted(PLANTED, key=lambda key: -PLANTED[key] / float(np.median(arrays[f"{key[0]}.absmax"])))
    assert [(row["input_index"], row["channel"]) for row in top[:3]] == planted
    first = top[0]
    median = float(np.median(arrays["2.absmax"]))
    assert first["input"] == NAMES[2] and first["layers"] == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert first["absmax"] == pytest.approx(140.0)
    assert first["median"] == pytest.approx(median)
    assert first["ratio"] == pytest.approx(140.0 / median)
    assert first["sink_absmax"] == pytest.approx(140.0 * 30.0)
    assert all(a["ratio"] >= b["ratio"] for a, b in zip(top, top[1:]))
    assert top[3]["ratio"] < 2.0 / 0.5 + 1e-6  # after the planted ones only ordinary channels remain


def test_pooling_keeps_each_planted_maximum():
    rows = [np.ones(1000), np.ones(3000), np.ones(100)]
    rows[1][2345] = 77.0
    pooled, stride = pool_channel_max(rows, max_columns=128)
    assert stride == 24 and pooled.shape == (3, 125)
    assert pooled[1, 2345 // stride] == 77.0 and np.nanmax(pooled[1]) == 77.0
    assert np.isnan(pooled[2, 10]) and pooled[2, 4] == 1.0  # a shorter row is padded, never stretched


def test_html_is_self_contained_escaped_and_drawn(profile, tmp_path):
    manifest, arrays = profile
    path = write_calibration_report(manifest, arrays, tmp_path)
    page = path.read_text()
    assert path == tmp_path / "report.html"
    assert page.count("<svg") >= 5
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    assert "&lt;script&gt;" in page and "/models/tiny &lt;b&gt;/model.onnx" in page
    assert "Magnitude CDF" in page and "25% sparse" in page and "<details>" in page
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_heatmap_draws_nan_grey_and_outlier_in_top_colour():
    plot = svg.heatmap_svg([[0.0, 1.0, float("nan")], [0.5, 4.0]], title="t", xlabel="x", ylabel="y",
                           row_labels=["a", SCRIPT])
    assert svg.HEATMAP_NAN_COLOUR in plot and "#fde725" in plot and "<script" not in plot
    cells = re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="[^"]+" fill="(#[0-9a-f]+)"/>', plot)[:6]
    assert cells[0] == "#440154" and cells[2] == svg.HEATMAP_NAN_COLOUR  # the minimum, then NaN after 1.0
    assert cells[1] not in ("#440154", "#fde725", svg.HEATMAP_NAN_COLOUR)
    assert cells[4:] == ["#fde725", svg.HEATMAP_NAN_COLOUR]  # the maximum, then the short row's padding
    assert "no data" in svg.heatmap_svg([[float("nan")]], title="t", xlabel="", ylabel="")


def test_summary_names_planted_channel_and_fits(profile):
    manifest, arrays = profile
    summary = format_calibration_summary(manifest, arrays)
    lines = summary.splitlines()
    assert len(lines) <= 20
    assert "L0 down_proj" in lines[2] and " 250 " in lines[2]
    assert "ratio 5 (chosen)" in lines[-1]  # q, k and v each keep channel 17


def test_short_labels_name_the_layers_that_read_a_tensor():
    nodes = [f"/model/layers.12/self_attn/{name}_proj/MatMul" for name in "qkv"]
    assert short_label("x", nodes) == "L12 q/k/v_proj"
    assert short_label("x", ["/lm_head/MatMul"]) == "lm_head"
    assert short_label("tensor", []) == "tensor"
