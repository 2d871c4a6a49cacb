"""The validation report: ``report.json``, a self-contained ``report.html`` and a one-screen summary.

The report is a plain dict (schema "accullm-export/validate", version 1): a header (reference, candidate,
mode) plus optional sections: text, metrics, kl_histogram, greedy, probes, gates, layers, bisect, generic,
versions. Each renderer draws only the sections present. The HTML has no scripts and no external
resources: styles are inline and plots are inline SVG from :mod:`accullm_export.svg`.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from accullm_export.atomic import atomic_write_text
from accullm_export import html_page, svg

_MAX_SUMMARY_GATES = 12
# ----------------------------------------------------------------------------------------------- writing
def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: NaN/inf become None.

    NumPy scalars and arrays (anything with ``tolist``) become Python numbers and lists.
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (created if missing), each atomically.

    Args:
        report: the report dict (see the module docstring).
        out_dir: the folder to write into.

    Returns:
        The paths of report.json and report.html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_text(json_path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(html_path, render_html(report))
    return json_path, html_path


def overall_passed(report: dict) -> bool:
    """PASS when every gate passed (or there are none) and a generic comparison, if any, passed."""
    gates_passed = all(bool(gate.get("passed")) for gate in report.get("gates") or [])
    generic = report.get("generic")
    return gates_passed and (not generic or generic.get("passed") is not False)


# ----------------------------------------------------------------------------------------------- formatting
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; None -> "n/a", NaN/inf spelled out."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else ("NaN" if math.isnan(value) else str(value))
    return str(value)


def _pct(fraction: Any) -> str:
    """A 0..1 fraction as a percentage ("n/a" when missing or not finite)."""
    if not _is_number(fraction) or not math.isfinite(fraction):
        return "n/a"
    return f"{100.0 * fraction:.1f}%"


def _signed_pct(value: Any) -> str:
    """An already-percent value with its sign (a perplexity change)."""
    if not _is_number(value) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.2f}%"


def _esc(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _num_cell(value: Any) -> str:
    return f'<td class="num">{_esc(value)}</td>'


def _badge(passed: Any) -> str:
    return '<span class="badge pass">PASS</span>' if passed else '<span class="badge fail">FAIL</span>'


def _td(value: Any) -> str:
    return f"<td>{_esc(value)}</td>"


# ----------------------------------------------------------------------------------------------- HTML sections
def _header_html(report: dict) -> str:
    passed = overall_passed(report)
    lines = [f'<h1>Validation report <span class="badge verdict {"pass" if passed else "fail"}">'
             f'{"PASS" if passed else "FAIL"}</span></h1>',
             f"<div>reference: <code>{_esc(report.get('reference'))}</code></div>",
             f"<div>candidate: <code>{_esc(report.get('candidate'))}</code></div>",
             f'<div class="muted">mode: {_esc(report.get("mode", "llm"))}</div>']
    text = report.get("text")
    if text:
        lines.append(f'<div class="muted">text: {_esc(text.get("source"))}, {_esc(text.get("windows"))} windows '
                     f'of {_esc(text.get("seq_len"))} tokens ({_esc(text.get("tokens"))} scored)</div>')
    return f'<header><div class="inner">{"".join(lines)}</div></header>'


def _metrics_html(report: dict) -> str:
    metrics = report.get("metrics")
    if not metrics:
        return ""
    rows = [("perplexity (reference)", _fmt(metrics.get("ppl_reference"))),
            ("perplexity (candidate)", _fmt(metrics.get("ppl_candidate"))),
            ("perplexity change", _signed_pct(metrics.get("ppl_delta_pct"))),
            ("KL divergence, mean (nats/token)", _fmt(metrics.get("kl_mean"))),
            ("KL divergence, p99", _fmt(metrics.get("kl_p99"))),
            ("top-1 agreement", _pct(metrics.get("top1_agreement")))]
    cells = [[f"<td>{html.escape(name)}</td>", f'<td class="num">{html.escape(value)}</td>'] for name, value in rows]
    return html_page.section("Metrics", "metrics", html_page.table(["metric", "value"], cells))


def _gates_html(report: dict) -> str:
    gates = report.get("gates")
    if not gates:
        return ""
    rows = [[_td(gate.get("name")), _num_cell(gate.get("value")), _num_cell(gate.get("threshold")),
             f"<td>{_badge(gate.get('passed'))}</td>", _td(gate.get("message", ""))] for gate in gates]
    failed = [not gate.get("passed") for gate in gates]
    headers = ["gate", "value", "threshold", "result", "message"]
    return html_page.section("Gates", "gates", html_page.table(headers, rows, failed))


def _kl_html(report: dict) -> str:
    histogram = report.get("kl_histogram")
    if not histogram:
        return ""
    plot = svg.histogram_svg(histogram.get("bin_edges") or [], histogram.get("counts") or [],
                             title="Per-token KL(reference || candidate)", xlabel="KL divergence (nats, log scale)",
                             ylabel="tokens", log_x=True)
    return html_page.section("Per-token KL divergence", "kl", html_page.figure(plot))


def _culprit_block_index(report: dict, blocks: Sequence[dict]) -> int | None:
    block_name = (report.get("bisect") or {}).get("block")
    return next((i for i, block in enumerate(blocks) if block_name and block.get("name") == block_name), None)


def _layers_html(report: dict) -> str:
    layers = report.get("layers")
    if not layers:
        return ""
    blocks = layers.get("blocks") or []
    metric, tolerance = str(layers.get("metric", "rel_error")), _as_float(layers.get("tolerance"))
    plot = svg.bar_svg([str(block.get("index", i)) for i, block in enumerate(blocks)],
                       [_as_float(block.get(metric)) for block in blocks],
                       title=f"Per-block {metric} (tolerance {_fmt(tolerance)})", ylabel=metric,
                       threshold=tolerance, highlight=_culprit_block_index(report, blocks))
    rows = [[_td(block.get("index")), _td(block.get("name")), _num_cell(block.get("max_abs")),
             _num_cell(block.get("rel_error")), _num_cell(block.get("cosine"))] for block in blocks]
    failed = [_as_float(block.get("rel_error")) > tolerance for block in blocks]
    table = html_page.table(["index", "block", "max |diff|", "relative error", "cosine"], rows, failed)
    details = f"<details><summary>All {len(blocks)} blocks</summary>{table}</details>"
    return html_page.section("Per-layer error", "layers", html_page.figure(plot) + details)


def _as_float(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def _bisect_html(report: dict) -> str:
    bisect = report.get("bisect")
    if not bisect:
        return ""
    parts = [f"<p>{_esc(bisect.get('message', ''))}</p>",
             f'<p class="muted">tolerance {_esc(bisect.get("tolerance"))}; block {_esc(bisect.get("block"))}</p>']
    culprit = bisect.get("culprit")
    if culprit:
        keys = ("node", "op_type", "tensor", "precision", "max_abs", "rel_error", "cosine")
        rows = [[f"<td>{html.escape(key)}</td>", _td(culprit.get(key))] for key in keys]
        parts.append(html_page.table(["first node over tolerance", ""], rows))
    return html_page.section("Bisection", "bisect", "".join(parts))


def _greedy_html(report: dict) -> str:
    greedy = report.get("greedy")
    if not greedy:
        return ""
    prompts = greedy.get("prompts") or []
    summary = (f"<p>{_esc(greedy.get('count'))} prompts, {_esc(greedy.get('new_tokens'))} new tokens each: "
               f"mean matching prefix {_esc(greedy.get('mean_prefix'))}, minimum {_esc(greedy.get('min_prefix'))}, "
               f"full matches {_esc(greedy.get('full_matches'))}/{_esc(greedy.get('count'))}</p>")
    plot = svg.bar_svg([f"#{i + 1}" for i in range(len(prompts))], [_as_float(p.get("prefix")) for p in prompts],
                       title="Greedy tokens identical to the reference, per prompt", ylabel="matching prefix (tokens)",
                       threshold=_as_float(greedy.get("new_tokens")))
    rows = [[_td(f"#{i + 1}"), _td(p.get("prompt")), _num_cell(p.get("prefix")), _num_cell(p.get("length")),
             _td(p.get("full_match"))] for i, p in enumerate(prompts)]
    table = html_page.table(["", "prompt", "prefix", "length", "full match"], rows,
                            [not p.get("full_match") for p in prompts])
    details = f"<details><summary>Prompts ({len(prompts)})</summary>{table}</details>"
    return html_page.section("Greedy generation", "greedy", summary + html_page.figure(plot) + details)


def _probes_html(report: dict) -> str:
    probes = report.get("probes")
    if not probes:
        return ""
    tasks = probes.get("tasks") or {}
    task_rows = [[_td(name), _num_cell(counts.get("agree")), _num_cell(counts.get("total")),
                  f'<td class="num">{_pct(_ratio(counts.get("agree"), counts.get("total")))}</td>']
                 for name, counts in tasks.items()]
    items = sorted(probes.get("items") or [], key=lambda item: bool(item.get("agree")))  # disagreements first
    item_rows = [[_td(item.get("task")), _td(item.get("prompt")), _td(item.get("reference_answer")),
                  _td(item.get("candidate_answer")), _td(item.get("agree"))] for item in items]
    disagree = sum(1 for item in items if not item.get("agree"))
    body = (f"<p>answers identical to the reference: {_pct(probes.get('agreement'))}</p>"
            + html_page.table(["task", "agree", "total", "agreement"], task_rows)
            + f"<details><summary>Items ({len(items)}, {disagree} disagree)</summary>"
            + html_page.table(["task", "prompt", "reference", "candidate", "agree"], item_rows,
                     [not item.get("agree") for item in items]) + "</details>")
    return html_page.section("Golden probes", "probes", body)


def _ratio(numerator: Any, denominator: Any) -> float:
    if not _is_number(numerator) or not _is_number(denominator) or not denominator:
        return math.nan
    return numerator / denominator


def _generic_html(report: dict) -> str:
    generic = report.get("generic")
    if not generic:
        return ""
    outputs = generic.get("outputs") or []
    rows = [[_td(out.get("name")), _num_cell(out.get("max_abs")), _num_cell(out.get("max_rel")),
             _num_cell(out.get("mean_abs")), _num_cell(out.get("cosine")), f"<td>{_badge(out.get('passed'))}</td>"]
            for out in outputs]
    parts = [f"<p>{_badge(generic.get('passed'))} atol {_esc(generic.get('atol'))}, rtol {_esc(generic.get('rtol'))}, "
             f"{_esc(generic.get('iterations'))} iterations</p>",
             html_page.table(["output", "max |diff|", "max rel", "mean |diff|", "cosine", "result"], rows,
                    [not out.get("passed") for out in outputs])]
    for key, label in (("inputs_json", "inputs"), ("outputs_json", "reference outputs")):
        if generic.get(key):
            parts.append(f"<p class=\"muted\">{label}: <code>{_esc(generic[key])}</code></p>")
    if generic.get("polygraphy_command"):
        parts.append(f"<p>Reproduce with Polygraphy:</p><pre>{_esc(generic['polygraphy_command'])}</pre>")
    return html_page.section("Output comparison", "generic", "".join(parts))


def _versions_html(report: dict) -> str:
    versions = report.get("versions")
    if not versions:
        return ""
    rows = [[_td(name), _td(version)] for name, version in versions.items()]
    return html_page.section("Versions", "versions", html_page.table(["package", "version"], rows))


_SECTIONS: tuple[Callable[[dict], str], ...] = (
    _metrics_html, _gates_html, _kl_html, _layers_html, _bisect_html, _greedy_html, _probes_html,
    _generic_html, _versions_html)


def render_html(report: dict) -> str:
    """The whole report as one self-contained HTML page (inline CSS and SVG, no scripts or links).

    Args:
        report: the report dict; every section but the header is optional.

    Returns:
        The HTML document.
    """
    title = f"accullm-export validate: {_fmt(report.get('candidate'))} vs {_fmt(report.get('reference'))}"
    body = "\n".join(part for part in (section(report) for section in _SECTIONS) if part)
    return html_page.page(title, _header_html(report), body)


# ----------------------------------------------------------------------------------------------- terminal
def _one_line(value: Any, width: int = 70) -> str:
    text = re.sub(r"\s+", " ", _fmt(value)).strip()
    return text if len(text) <= width else text[:width - 1] + "…"


def _metric_lines(report: dict) -> list[str]:
    lines = []
    text = report.get("text")
    if text:
        lines.append(f"  text       {_one_line(text.get('source'), 40)}: {_fmt(text.get('windows'))} windows x "
                     f"{_fmt(text.get('seq_len'))} ({_fmt(text.get('tokens'))} tokens)")
    metrics = report.get("metrics")
    if metrics:
        lines.append(f"  perplexity {_fmt(metrics.get('ppl_reference'))} -> {_fmt(metrics.get('ppl_candidate'))} "
                     f"({_signed_pct(metrics.get('ppl_delta_pct'))})")
        lines.append(f"  KL         mean {_fmt(metrics.get('kl_mean'), 3)}  p99 {_fmt(metrics.get('kl_p99'), 3)}"
                     f"    top-1 agreement {_pct(metrics.get('top1_agreement'))}")
    greedy = report.get("greedy")
    if greedy:
        lines.append(f"  greedy     mean prefix {_fmt(greedy.get('mean_prefix'), 3)}/{_fmt(greedy.get('new_tokens'))}"
                     f", min {_fmt(greedy.get('min_prefix'))}, full matches {_fmt(greedy.get('full_matches'))}"
                     f"/{_fmt(greedy.get('count'))}")
    probes = report.get("probes")
    if probes:
        lines.append(f"  probes     agreement {_pct(probes.get('agreement'))}")
    return lines


def _gate_lines(gates: Sequence[dict]) -> list[str]:
    """One line per gate; past the cap, failed gates are kept and passed ones are counted."""
    shown = list(gates)
    if len(shown) > _MAX_SUMMARY_GATES:
        shown = sorted(shown, key=lambda gate: bool(gate.get("passed")))[:_MAX_SUMMARY_GATES]
    lines = ["  gates"]
    for gate in shown:
        verdict = "PASS" if gate.get("passed") else "FAIL"
        name = _fmt(gate.get("name"))
        line = (f"    {verdict}  {_one_line(name, 20):<20} {_fmt(gate.get('value'))} "
                f"(threshold {_fmt(gate.get('threshold'))})")
        message = str(gate.get("message") or "").removeprefix(f"{name}:").strip()
        if not gate.get("passed") and message:
            line += f"  {_one_line(message, 60)}"
        lines.append(line)
    if len(gates) > len(shown):
        lines.append(f"    ... and {len(gates) - len(shown)} more passed")
    return lines


def _diagnosis_lines(report: dict) -> list[str]:
    lines = []
    culprit = (report.get("bisect") or {}).get("culprit")
    if culprit:
        lines.append(f"  culprit    {_one_line(culprit.get('node'), 40)} ({_fmt(culprit.get('op_type'))}, "
                     f"{_fmt(culprit.get('precision'))}) rel_error {_fmt(culprit.get('rel_error'), 3)}")
        lines.append(f"             in {_one_line((report.get('bisect') or {}).get('block'), 40)}, "
                     f"tensor {_one_line(culprit.get('tensor'), 40)}")
    generic = report.get("generic")
    if generic:
        outputs = generic.get("outputs") or []
        failed = [out.get("name") for out in outputs if not out.get("passed")]
        lines.append(f"  outputs    {'PASS' if generic.get('passed') else 'FAIL'}: {len(outputs) - len(failed)}/"
                     f"{len(outputs)} within atol {_fmt(generic.get('atol'))} rtol {_fmt(generic.get('rtol'))}")
        if failed:
            lines.append(f"             failed: {_one_line(', '.join(str(name) for name in failed), 60)}")
    return lines


def format_summary(report: dict) -> str:
    """A one-screen (at most ~30 lines) plain-text summary for the terminal.

    Args:
        report: the report dict.

    Returns:
        The summary, lines joined by newlines, without a trailing newline.
    """
    lines = [f"accullm-export validate: {'PASS' if overall_passed(report) else 'FAIL'}",
             f"  reference  {_one_line(report.get('reference'))}",
             f"  candidate  {_one_line(report.get('candidate'))}"]
    lines += _metric_lines(report)
    if report.get("gates"):
        lines += _gate_lines(report["gates"])
    lines += _diagnosis_lines(report)
    return "\n".join(lines)
