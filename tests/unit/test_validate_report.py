"""The validation report: report.json round-trips, report.html is self-contained and escaped, the summary fits."""

from __future__ import annotations

import json
import math
import re

import pytest

from accullm_export import svg
from accullm_export.validate.report import format_summary, overall_passed, render_html, write_report

SCRIPT = "<script>alert('x')</script>"


def sample_report(gates_pass: bool = True) -> dict:
    """A report with every section, a NaN metric and a prompt that tries to inject a script."""
    edges = [10.0 ** (-8 + 0.25 * i) for i in range(33)]
    return {
        "kind": "accullm-export/validate", "version": 1, "reference": "ref/model.onnx", "candidate": "int4/model.onnx",
        "mode": "llm",
        "text": {"source": "wikitext-2 (test)", "windows": 8, "seq_len": 256, "tokens": 2040},
        "metrics": {"ppl_reference": 12.5, "ppl_candidate": 12.9, "ppl_delta_pct": 3.2, "kl_mean": 0.021,
                    "kl_p99": math.nan, "top1_agreement": 0.934},
        "kl_histogram": {"bin_edges": edges, "counts": [int(200 * math.exp(-((i - 20) / 4) ** 2)) for i in range(32)]},
        "greedy": {"new_tokens": 32, "mean_prefix": 21.5, "min_prefix": 3, "full_matches": 2, "count": 4,
                   "prompts": [{"prompt": SCRIPT, "prefix": 3, "length": 32, "full_match": False},
                               {"prompt": "The capital of France is", "prefix": 32, "length": 32, "full_match": True},
                               {"prompt": "Once upon a time", "prefix": 19, "length": 32, "full_match": False},
                               {"prompt": "def fib(n):", "prefix": 32, "length": 32, "full_match": True}]},
        "probes": {"agreement": 0.9,
                   "tasks": {"arithmetic": {"agree": 4, "total": 5}, "copy": {"agree": 5, "total": 5}},
                   "items": [{"task": "arithmetic", "prompt": "2 + 3 =", "reference_answer": "5",
                              "candidate_answer": "6 & <b>", "agree": False},
                             {"task": "copy", "prompt": "copy: abc", "reference_answer": "abc",
                              "candidate_answer": "abc", "agree": True}]},
        "gates": [{"name": "max-kl", "threshold": 0.05, "value": 0.021, "passed": True,
                   "message": "max-kl: mean KL 0.021 <= 0.05"},
                  {"name": "max-ppl-delta", "threshold": 2.0, "value": 3.2, "passed": gates_pass,
                   "message": "max-ppl-delta: |perplexity change| in % 3.2 > 2 (off by 1.2)"}],
        "layers": {"tolerance": 0.05, "metric": "rel_error",
                   "blocks": [{"name": f"model.layers.{i}", "index": i, "max_abs": 0.1 * i,
                               "rel_error": 0.08 if i == 5 else 0.01 + 0.002 * i, "cosine": 0.999} for i in range(8)]},
        "bisect": {"culprit": {"node": "/model/layers.5/mlp/down_proj/MatMulNBits", "op_type": "MatMulNBits",
                               "tensor": "/model/layers.5/mlp/down_proj/output_0", "max_abs": 3.1, "rel_error": 0.2,
                               "cosine": 0.97, "precision": "int4"},
                   "block": "model.layers.5", "tolerance": 0.05, "message": "first node over tolerance found"},
        "generic": {"atol": 1e-3, "rtol": 1e-3, "iterations": 2, "passed": True,
                    "outputs": [{"name": "logits", "max_abs": 1e-4, "max_rel": 2e-4, "mean_abs": 1e-5, "cosine": 1.0,
                                 "passed": True}],
                    "inputs_json": "inputs.json", "outputs_json": "outputs.json",
                    "polygraphy_command": "polygraphy run int4/model.onnx --onnxrt --load-inputs inputs.json"},
        "versions": {"onnx": "1.17.0", "onnxruntime": "1.20.0"},
    }


def test_report_json_round_trips_with_nan_as_null(tmp_path):
    json_path, html_path = write_report(sample_report(), tmp_path / "out")
    assert json_path == tmp_path / "out" / "report.json" and html_path.exists()
    text = json_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["metrics"]["kl_p99"] is None
    assert loaded["metrics"]["kl_mean"] == 0.021
    assert loaded["greedy"]["prompts"][0]["prompt"] == SCRIPT
    assert loaded["layers"]["blocks"][5]["rel_error"] == 0.08
    # a report read back from JSON (None in place of NaN) renders too
    assert "<svg" in render_html(loaded) and "n/a" in format_summary(loaded)
    assert not list((tmp_path / "out").glob(".*")), "atomic writes left temporary files"


def test_html_is_self_contained_with_inline_plots(tmp_path):
    _, html_path = write_report(sample_report(), tmp_path)
    page = html_path.read_text()
    assert page.count("<svg") == 3  # KL histogram, per-layer errors, greedy prefixes
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|data:)""", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "polygraphy run int4/model.onnx" in page and "<pre>" in page
    assert "<details>" in page


def test_strings_from_the_report_are_escaped():
    page = render_html(sample_report())
    assert SCRIPT not in page and "<script" not in page
    assert html_escaped(SCRIPT) in page
    assert "6 &amp; &lt;b&gt;" in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


@pytest.mark.parametrize("gates_pass", [True, False])
def test_header_verdict_follows_the_gates(gates_pass):
    report = sample_report(gates_pass)
    header = render_html(report).split("<main>")[0]
    assert overall_passed(report) is gates_pass
    assert ("PASS" in header) is gates_pass and ("FAIL" in header) is not gates_pass
    assert format_summary(report).splitlines()[0].endswith("PASS" if gates_pass else "FAIL")


def test_failed_gate_row_is_highlighted_with_its_message():
    page = render_html(sample_report(gates_pass=False))
    failed_rows = re.findall(r'<tr class="fail">(.*?)</tr>', page.split('id="gates"')[1].split("</section>")[0])
    assert len(failed_rows) == 1 and "max-ppl-delta" in failed_rows[0] and "off by 1.2" in failed_rows[0]


def test_culprit_block_is_highlighted_in_the_layer_plot():
    page = render_html(sample_report())
    layers = page.split('id="layers"')[1].split("</section>")[0]
    assert layers.count(f'fill="{svg.WARNING_COLOUR}"') == 1
    assert "stroke-dasharray" in layers  # the tolerance line


def test_summary_fits_one_screen_and_names_every_gate():
    report = sample_report(gates_pass=False)
    summary = format_summary(report)
    lines = summary.splitlines()
    assert len(lines) <= 30
    for gate in report["gates"]:
        line = next(line for line in lines if gate["name"] in line)
        assert ("PASS" if gate["passed"] else "FAIL") in line
    assert "MatMulNBits" in summary and "+3.20%" in summary and "93.4%" in summary and "21.5/32" in summary


def test_summary_caps_many_gates():
    report = sample_report()
    report["gates"] = [{"name": f"gate-{i}", "threshold": 1.0, "value": 0.5, "passed": i != 17, "message": "m"}
                       for i in range(40)]
    lines = format_summary(report).splitlines()
    assert len(lines) <= 30
    assert any("gate-17" in line and "FAIL" in line for line in lines)


def test_generic_only_report_renders(tmp_path):
    report = {"kind": "accullm-export/validate", "version": 1, "reference": "a.onnx", "candidate": "b.onnx",
              "mode": "generic",
              "generic": {"atol": 1e-5, "rtol": 1e-5, "iterations": 1, "passed": False,
                          "outputs": [{"name": "y", "max_abs": math.inf, "max_rel": math.nan, "mean_abs": 0.5,
                                       "cosine": 0.2, "passed": False}],
                          "inputs_json": "in.json", "outputs_json": "out.json",
                          "polygraphy_command": "polygraphy run b.onnx --onnxrt"}}
    json_path, html_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["generic"]["outputs"][0]["max_abs"] is None
    page = html_path.read_text()
    assert "polygraphy run b.onnx --onnxrt" in page and "Metrics" not in page and "<svg" not in page
    summary = format_summary(report)
    assert "FAIL" in summary and "y" in summary.splitlines()[-1]


@pytest.mark.parametrize("plot", [
    lambda: svg.histogram_svg([], [], title="t", xlabel="x", ylabel="y", log_x=True),
    lambda: svg.histogram_svg([1.0, math.nan], [math.inf], title="t", xlabel="x", ylabel="y"),
    lambda: svg.bar_svg(["a", "b"], [math.nan, math.inf], title="t", ylabel="y", threshold=math.nan),
    lambda: svg.line_svg([], {}, title="t", xlabel="x", ylabel="y"),
    lambda: svg.line_svg([1.0, 2.0], {"s": [math.nan, math.nan]}, title="t", xlabel="x", ylabel="y"),
])
def test_plots_without_finite_data_say_no_data(plot):
    drawing = plot()
    assert drawing.startswith("<svg") and drawing.endswith("</svg>") and "no data" in drawing


def test_plots_escape_text_and_skip_non_finite_points():
    bars = svg.bar_svg(["<a>", "b&c", "nan"], [1.0, 2.0, math.nan], title="x < y", ylabel="e", threshold=1.5,
                       highlight=1)
    assert "<a>" not in bars and "&lt;a&gt;" in bars and "b&amp;c" in bars and "x &lt; y" in bars
    assert bars.count("<rect") == 1 + 2 and "n/a" in bars  # background + two finite bars
    lines = svg.line_svg([0.0, 0.5, 1.0, 1.5], {"a": [1.0, 2.0, math.nan, 3.0], "b": [2.0, 2.0, 2.0, 2.0]},
                         title="sparsity", xlabel="sparsity", ylabel="accuracy")
    assert lines.count("<polyline") == 2  # "a" has a one-point run after the NaN; "b" is one line
    assert "nan" not in lines.lower().replace("no data", "")


def test_nice_ticks_cover_the_range():
    for lo, hi in [(0.0, 0.37), (-3.0, 17.0), (5.0, 5.0), (1e-9, 3e-9), (0.0, 1234.0)]:
        ticks = svg.nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
        assert all(b > a for a, b in zip(ticks, ticks[1:]))
