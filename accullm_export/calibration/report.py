"""The calibration report: a self-contained ``report.html`` beside the profile, and a terminal summary.

Both read only the profile (``manifest`` plus the ``<input index>.<statistic>`` arrays). The HTML has no
scripts and no external resources: styles are inline, plots are inline SVG from :mod:`accullm_export.svg`,
and every string that comes from the manifest (tensor and node names, paths) is escaped.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from accullm_export import html_page, svg
from accullm_export.atomic import atomic_write_text
from accullm_export.calibration.stats import MagnitudeHistogram

HEATMAP_COLUMNS = 128  # channels are max-pooled down to at most this many heatmap columns
_TOP_TABLE = 20
_CDF_SERIES = 5  # with more MLPs than the palette holds, plot first, quartiles and last
_CDF_POINTS = 200
# ----------------------------------------------------------------------------------------------- analysis
def _stat(arrays: Mapping[str, np.ndarray], index: int, name: str) -> np.ndarray | None:
    value = arrays.get(f"{index}.{name}")
    return None if value is None else np.asarray(value)


def _readers(manifest: Mapping) -> dict[int, list[dict]]:
    """Input index -> the manifest's layer entries that read that tensor (graph order)."""
    readers: dict[int, list[dict]] = {index: [] for index in range(len(manifest.get("inputs", [])))}
    for layer in manifest.get("layers", []):
        readers.setdefault(int(layer["input_index"]), []).append(layer)
    return readers


def short_label(tensor: str, nodes: Sequence[str]) -> str:
    """A compact name for a layer input: ``L3 q/k/v_proj`` from the nodes reading it, else the tensor name."""
    if not nodes:
        return tensor if len(tensor) <= 28 else "…" + tensor[-27:]
    names = []
    for node in nodes:
        segments = [segment for segment in node.split("/") if segment]
        names.append(segments[-2] if len(segments) >= 2 else (segments[-1] if segments else node))
    suffixes = {name.rsplit("_", 1)[-1] for name in names}
    if len(names) > 1 and len(suffixes) == 1 and all("_" in name for name in names):
        joined = "/".join(name.rsplit("_", 1)[0] for name in names) + "_" + suffixes.pop()
    else:
        joined = "/".join(dict.fromkeys(names))
    layer = re.search(r"layers?[._](\d+)", nodes[0])
    return f"L{layer.group(1)} {joined}" if layer else joined


def _labels(manifest: Mapping) -> list[str]:
    readers = _readers(manifest)
    return [short_label(entry["name"], [layer["node"] for layer in readers.get(index, [])])
            for index, entry in enumerate(manifest.get("inputs", []))]


def top_outlier_channels(manifest: Mapping, arrays: Mapping[str, np.ndarray], top: int = 10) -> list[dict]:
    """The (input tensor, channel) pairs with the largest absmax relative to their tensor's median absmax.

    Args:
        manifest: the profile manifest.
        arrays: the profile arrays.
        top: how many to return.

    Returns:
        Dicts, ratio descending: ``input`` (tensor name), ``input_index``, ``label``, ``layers`` (the linear
        layers reading it), ``channel``, ``absmax``, ``median``, ``ratio``, ``p999`` and ``sink_absmax``
        (None when not measured). A tensor whose median absmax is 0 has ratio 0, as in the ``ratio`` policy.
    """
    readers, labels = _readers(manifest), _labels(manifest)
    candidates = []
    for index, entry in enumerate(manifest.get("inputs", [])):
        absmax = _stat(arrays, index, "absmax")
        if absmax is None or absmax.size == 0:
            continue
        median = float(np.median(absmax))
        ratio = absmax / median if median > 0 else np.zeros(absmax.shape)
        keep = min(top, ratio.size)
        for channel in np.argpartition(-ratio, keep - 1)[:keep] if keep else []:
            candidates.append((-float(ratio[channel]), index, int(channel), median))
    rows = []
    for negative_ratio, index, channel, median in sorted(candidates)[:top]:
        extra = {name: _stat(arrays, index, name) for name in ("p999", "sink_absmax")}
        rows.append({
            "input": manifest["inputs"][index]["name"], "input_index": index, "label": labels[index],
            "layers": [layer["node"] for layer in readers.get(index, [])], "channel": channel,
            "absmax": float(arrays[f"{index}.absmax"][channel]), "median": median, "ratio": -negative_ratio,
            **{name: (float(value[channel]) if value is not None else None) for name, value in extra.items()}})
    return rows


def pool_channel_max(rows: Sequence[np.ndarray], max_columns: int = HEATMAP_COLUMNS) -> tuple[np.ndarray, int]:
    """Max-pool per-channel rows (possibly of different lengths) into at most ``max_columns`` columns.

    Every row is pooled with the same stride, so a column covers the same channels in every row; a shorter
    row is padded with NaN (drawn grey).

    Returns:
        The pooled matrix [rows, columns] and the stride (channels per column).
    """
    widest = max((len(row) for row in rows), default=0)
    stride = max(1, math.ceil(widest / max_columns))
    columns = math.ceil(widest / stride)
    pooled = np.full((len(rows), columns), np.nan)
    for index, row in enumerate(rows):
        padded = np.full(columns * stride, np.nan)
        padded[:len(row)] = np.asarray(row, dtype=np.float64)
        pooled[index] = np.fmax.reduce(padded.reshape(columns, stride), axis=1)  # fmax: NaN only if all are
    return pooled, stride


def policy_counts(manifest: Mapping) -> dict[str, list[int]]:
    """Policy -> per input tensor, how many channels it picks (the union over the layers reading it)."""
    readers = _readers(manifest)
    policies = list(dict.fromkeys(name for layer in manifest.get("layers", []) for name in layer["candidates"]))
    return {policy: [len({channel for layer in readers.get(index, []) for channel in layer["candidates"][policy]})
                     for index in range(len(manifest.get("inputs", [])))] for policy in policies}


def _policy_totals(manifest: Mapping) -> dict[str, int]:
    """Policy -> outlier channels summed over all linear layers."""
    totals: dict[str, int] = {}
    for layer in manifest.get("layers", []):
        for policy, channels in layer["candidates"].items():
            totals[policy] = totals.get(policy, 0) + len(channels)
    return totals


# ----------------------------------------------------------------------------------------------- terminal
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _policy_parameters(manifest: Mapping) -> str:
    policy = manifest.get("policy", {})
    return ", ".join(f"{key}={_fmt(value)}" for key, value in policy.items()
                     if key not in ("name", "version") and value is not None)


def _describe_source(source: Mapping) -> str:
    """The data source on one line: lists are counted and long strings shortened (a source may list its pages)."""
    parts = []
    for key, value in source.items():
        if isinstance(value, (list, tuple, dict)):
            parts.append(f"{key}: {len(value)} items")
        else:
            text = _fmt(value)
            parts.append(f"{key}: {text if len(text) <= 90 else text[:89] + '…'}")
    return ", ".join(parts)


def _geometry(manifest: Mapping) -> str:
    config = manifest.get("config", {})
    if manifest.get("source", {}).get("kind") == "script":
        return f"{_fmt(manifest.get('batches'))} batches from a load_data() script"
    return f"{_fmt(config.get('samples'))} samples x {_fmt(config.get('seq_len'))} tokens"


def format_calibration_summary(manifest: Mapping, arrays: Mapping[str, np.ndarray], top: int = 10) -> str:
    """A short plain-text summary: header, the top outlier channels, outlier totals per policy.

    Args:
        manifest: the profile manifest.
        arrays: the profile arrays.
        top: how many outlier channels to list.

    Returns:
        The summary (``top`` + 4 lines), without a trailing newline.
    """
    chosen = manifest.get("policy", {}).get("name")
    lines = [f"calibrated {manifest.get('model', {}).get('path')}: {_geometry(manifest)}, "
             f"{len(manifest.get('inputs', []))} layer inputs, policy {chosen} ({_policy_parameters(manifest)})",
             f"  {'layer input':<28} {'channel':>7} {'absmax':>10} {'x median':>9}"]
    for row in top_outlier_channels(manifest, arrays, top):
        lines.append(f"  {row['label'][:28]:<28} {row['channel']:>7} {_fmt(row['absmax']):>10} "
                     f"{_fmt(row['ratio'], 3):>9}")
    totals = _policy_totals(manifest)
    counts = ", ".join(f"{policy} {count}" + (" (chosen)" if policy == chosen else "")
                       for policy, count in totals.items())
    lines.append(f"outlier channels per policy, summed over {len(manifest.get('layers', []))} layers: {counts}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- HTML helpers
def _esc(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    return f'<td class="num">{html.escape(_fmt(value, digits))}</td>'


def _td(value: Any) -> str:
    return f"<td>{_esc(value)}</td>"


def _input_cell(label: str, tensor: str, compact: bool = False) -> str:
    """A layer input's short label with its tensor name below it (or, ``compact``, as a tooltip)."""
    if compact:
        return f'<td title="{html.escape(tensor, quote=True)}">{html.escape(label)}</td>'
    return f"<td>{html.escape(label)}<br><code>{html.escape(tensor)}</code></td>"


# ----------------------------------------------------------------------------------------------- HTML sections
def _header_html(manifest: Mapping) -> str:
    model, source = manifest.get("model", {}), manifest.get("source", {})
    described = _describe_source(source)
    inputs = manifest.get("inputs", [])
    inexact = sum(not entry.get("p999_exact", True) for entry in inputs)
    lines = ["<h1>Calibration report</h1>",
             f"<div>model: <code>{_esc(model.get('path'))}</code> "
             f'<span class="muted">sha256 {_esc(str(model.get("sha256", ""))[:16])}…</span></div>',
             f"<div>source: {html.escape(described)}</div>",
             f"<div>data: {html.escape(_geometry(manifest))}, {_esc(manifest.get('batches'))} batches, "
             f"{_esc(inputs[0]['rows'] if inputs else 0)} rows per tensor</div>",
             f"<div>outlier policy: <b>{_esc(manifest.get('policy', {}).get('name'))}</b> "
             f'<span class="muted">({html.escape(_policy_parameters(manifest))})</span></div>',
             f'<div class="muted">{len(inputs)} layer inputs read by {len(manifest.get("layers", []))} linear layers'
             + (f"; p99.9 approximate for {inexact} tensors" if inexact else "") + "</div>"]
    return f'<header><div class="inner">{"".join(lines)}</div></header>'


def _heatmap_html(manifest: Mapping, arrays: Mapping[str, np.ndarray], labels: Sequence[str]) -> str:
    rows = []
    for index in range(len(manifest.get("inputs", []))):
        absmax = _stat(arrays, index, "absmax")
        rows.append(np.log10(np.maximum(absmax.astype(np.float64), 1e-30)) if absmax is not None else np.zeros(0))
    pooled, stride = pool_channel_max(rows)
    pooled[pooled < -29] = np.nan  # all-zero channels have no logarithm
    note = f"max over {stride} neighbouring channels per column" if stride > 1 else "one column per channel"
    plot = svg.heatmap_svg(pooled.tolist(), title="Channel absmax per layer input", ylabel="layer input",
                           xlabel=f"channel ({note})", row_labels=labels, value_label="log10 absmax",
                           column_width=stride)
    text = ('<p class="muted">Rows are the linear layers\' input tensors in graph order (rows sharing one input '
            "appear once); grey: no such channel.</p>")
    return html_page.section("Channel magnitudes", "heatmap", text + html_page.figure(plot))


def _outliers_html(manifest: Mapping, labels: Sequence[str]) -> str:
    counts = policy_counts(manifest)
    chosen = manifest.get("policy", {}).get("name")
    inputs = manifest.get("inputs", [])
    plot = svg.bar_svg(labels, [float(c) for c in counts.get(chosen, [])],
                       title=f"Outlier channels per layer input (policy {chosen})", ylabel="channels")
    policies = list(counts)
    rows = [[_input_cell(labels[index], entry["name"], compact=True), _num(entry.get("channels")),
             *(_num(counts[policy][index]) for policy in policies)] for index, entry in enumerate(inputs)]
    totals = _policy_totals(manifest)
    summary = ", ".join(f"{policy}: {total}" for policy, total in totals.items())
    table = html_page.table(["layer input", "channels", *policies], rows)
    text = (f'<p class="muted">A tensor read by several layers counts the channels any of them keeps. '
            f"Summed over the {len(manifest.get('layers', []))} linear layers: {html.escape(summary)}.</p>")
    return html_page.section("Outlier channels", "outliers",
                    html_page.figure(plot) + text
                    + html_page.details("channels picked by each policy, per layer input", table))


def _top_html(manifest: Mapping, arrays: Mapping[str, np.ndarray]) -> str:
    top = top_outlier_channels(manifest, arrays, _TOP_TABLE)
    if not top:
        return html_page.section("Top outlier channels", "top", '<p class="muted">no channel statistics</p>')
    policy = manifest.get("policy", {})
    chosen = {(int(layer["input_index"]), channel) for layer in manifest.get("layers", [])
              for channel in layer.get("outliers", [])}
    rows = [[_num(rank + 1), _input_cell(row["label"], row["input"]), _num(row["channel"]), _num(row["absmax"]),
             _num(row["median"]), _num(row["ratio"], 3), _num(row["p999"]), _num(row["sink_absmax"]),
             _td("yes" if (row["input_index"], row["channel"]) in chosen else "no")]
            for rank, row in enumerate(top)]
    table = html_page.table(["#", "layer input", "channel", "absmax", "median absmax", "ratio", "p99.9",
                             "first-token absmax", f"kept ({policy.get('name')})"], rows)
    ratio = policy.get("ratio") if policy.get("name") == "ratio" else None
    threshold = math.log10(ratio) if ratio else None  # ratios span decades: a log scale keeps all 20 visible
    plot = svg.bar_svg([f"{row['label']} c{row['channel']}" for row in top],
                       [math.log10(row["ratio"]) if row["ratio"] > 0 else math.nan for row in top],
                       title="Top outlier channels: absmax over their tensor's median absmax",
                       ylabel="log10(absmax / median)", threshold=threshold)
    return html_page.section("Top outlier channels", "top", html_page.figure(plot) + table)


def _cdf(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|x| at every upper bin edge, fraction of elements <= it) from a MagnitudeHistogram's counts."""
    cumulative = np.cumsum(counts[1:-1]) + counts[0]
    return MagnitudeHistogram.edges()[1:], cumulative / max(int(counts.sum()), 1)


def _representatives(count: int) -> list[int]:
    """Indices of a few layers spread over ``count`` (all of them when they fit the palette)."""
    if count <= len(svg.SERIES_COLOURS):
        return list(range(count))
    return sorted({round(q * (count - 1)) for q in np.linspace(0.0, 1.0, _CDF_SERIES)})


def _cdf_plot(curves: Sequence[tuple[str, np.ndarray]]) -> str:
    """The CDF plot of the given (label, counts), over the magnitudes where any curve moves."""
    edges, _ = _cdf(curves[0][1])
    fractions = {label: _cdf(counts)[1] for label, counts in curves}
    moving = np.zeros(edges.size, dtype=bool)
    for values in fractions.values():
        moving |= (values > 0.0005) & (values < 0.9995)
    span = np.flatnonzero(moving)
    lo, hi = (span[0], span[-1] + 1) if span.size else (0, edges.size)
    lo, hi = max(lo - 20, 0), min(hi + 20, edges.size)  # a margin of 0.1 decade either side
    chosen = np.unique(np.linspace(lo, hi - 1, _CDF_POINTS).astype(int))
    series = {label: values[chosen].tolist() for label, values in fractions.items()}
    return svg.line_svg(np.log10(edges[chosen]).tolist(), series, title="Magnitude CDF of MLP down-projection inputs",
                        xlabel="log10 |x|", ylabel="fraction of elements <= |x|")


def _sparsity_html(manifest: Mapping, arrays: Mapping[str, np.ndarray], labels: Sequence[str]) -> str:
    sparsity = manifest.get("sparsity") or {}
    entries = [(layer["node"], layer) for layer in manifest.get("layers", []) if layer["node"] in sparsity]
    if not entries:
        return html_page.section("Activation sparsity", "sparsity", '<p class="muted">no MLP down-projection found</p>')
    curves = []
    for position in _representatives(len(entries)):
        node, layer = entries[position]
        counts = _stat(arrays, int(layer["input_index"]), "magnitude_histogram")
        if counts is not None and counts.sum() > 0:
            curves.append((labels[int(layer["input_index"])], counts))
    plot = html_page.figure(_cdf_plot(curves)) if curves else ""
    levels = sparsity[entries[0][0]]["levels"]
    rows = [[_input_cell(labels[int(layer["input_index"])], node),
             *(_num(value) for value in sparsity[node]["thresholds"])] for node, layer in entries]
    table = html_page.table(["down projection", *(f"{100 * level:.0f}% sparse" for level in levels)], rows)
    shown = "" if len(curves) == len(entries) else f" (shown: {len(curves)} of {len(entries)} layers)"
    text = (f'<p class="muted">|x| under which each fraction of the down-projection inputs falls{shown}; '
            "zeroing the values under a threshold gives at least that sparsity.</p>")
    return html_page.section("Activation sparsity", "sparsity",
                             plot + text + html_page.details("thresholds per layer", table))


def _sink_html(manifest: Mapping, arrays: Mapping[str, np.ndarray], labels: Sequence[str]) -> str:
    rows, ratios = [], []
    for index, entry in enumerate(manifest.get("inputs", [])):
        absmax, sink = _stat(arrays, index, "absmax"), _stat(arrays, index, "sink_absmax")
        if absmax is None or sink is None or absmax.size == 0:
            continue
        main_max, sink_max = float(absmax.max()), float(sink.max())
        ratio = sink_max / main_max if main_max > 0 else math.nan
        ratios.append((labels[index], ratio))
        rows.append([_input_cell(labels[index], entry["name"], compact=True), _num(main_max), _num(sink_max),
                     _num(ratio, 3), _num(int(sink.argmax()))])
    if not ratios or all(not value for _, value in ratios):
        return html_page.section("First token (attention sink)", "sink",
                        '<p class="muted">no first-token statistics (not a decoder, or never measured)</p>')
    over = sum(value > 1 for _, value in ratios)
    label, largest = max(ratios, key=lambda item: item[1] if math.isfinite(item[1]) else -1.0)
    plot = svg.bar_svg([name for name, _ in ratios], [value for _, value in ratios], threshold=1.0,
                       title="First token's max |x| / the other tokens' max |x|", ylabel="ratio")
    text = (f'<p class="muted">Position 0 is measured apart from the rest (its activations are left out of '
            f"every other statistic). Its max exceeds the others' in {over} of {len(ratios)} tensors; "
            f"largest: {largest:.3g}x at {html.escape(label)}.</p>")
    table = html_page.table(["layer input", "max absmax", "max first-token absmax", "ratio", "its channel"], rows)
    return html_page.section("First token (attention sink)", "sink",
                             html_page.figure(plot) + text + html_page.details("per layer input", table))


def _versions_html(manifest: Mapping) -> str:
    versions = ", ".join(f"{name} {value}" for name, value in (manifest.get("versions") or {}).items())
    return f'<p class="muted">{html.escape(versions)}</p>'


def render_calibration_html(manifest: Mapping, arrays: Mapping[str, np.ndarray]) -> str:
    """The whole report page as one self-contained HTML string."""
    labels = _labels(manifest)
    sections = [_heatmap_html(manifest, arrays, labels), _outliers_html(manifest, labels),
                _top_html(manifest, arrays), _sparsity_html(manifest, arrays, labels),
                _sink_html(manifest, arrays, labels), _versions_html(manifest)]
    title = f"Calibration report: {_fmt(manifest.get('model', {}).get('path'))}"
    return html_page.page(title, _header_html(manifest), "".join(sections))


def write_calibration_report(manifest: Mapping, arrays: Mapping[str, np.ndarray], folder: Path) -> Path:
    """Write ``folder/report.html`` atomically and return its path.

    Args:
        manifest: the profile manifest.
        arrays: the profile arrays (``<input index>.<statistic>``).
        folder: an existing folder (the profile's).
    """
    path = Path(folder) / "report.html"
    atomic_write_text(path, render_calibration_html(manifest, arrays))
    return path
