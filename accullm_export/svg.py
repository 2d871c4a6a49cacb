"""Tiny dependency-free SVG plots (histogram, bars, lines) for the self-contained HTML reports.

Every function returns a complete ``<svg>`` string of a fixed size that a browser renders offline: no
scripts, fonts or external references. Non-finite values are skipped; when nothing is left to draw the
plot says "no data" instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

WIDTH = 640
HEIGHT = 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 66, 18, 36, 52
_PLOT_X0, _PLOT_X1 = _LEFT, WIDTH - _RIGHT
_PLOT_Y0, _PLOT_Y1 = _TOP, HEIGHT - _BOTTOM

BAR_COLOUR = "#4c78a8"
WARNING_COLOUR = "#d62728"
THRESHOLD_COLOUR = "#e45756"
GRID_COLOUR = "#e3e3e3"
AXIS_COLOUR = "#555555"
SERIES_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#9d755d")
_MAX_CATEGORY_LABELS = 20


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Maps data values in [lo, hi] (log10 space when ``log``) to pixels in [pixel_lo, pixel_hi]."""

    lo: float
    hi: float
    pixel_lo: float
    pixel_hi: float
    log: bool = False

    def __call__(self, value: float) -> float:
        if self.log:
            value = math.log10(max(value, 10.0**self.lo))
        fraction = (value - self.lo) / (self.hi - self.lo)
        return self.pixel_lo + fraction * (self.pixel_hi - self.pixel_lo)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(x: float, y: float, content: str, **attributes: object) -> str:
    """One escaped <text> element; attribute names use '_' for '-' (text_anchor -> text-anchor)."""
    rendered = "".join(f" {name.replace('_', '-')}={quoteattr(str(value))}" for name, value in attributes.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{rendered}>{escape(content)}</text>'


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.3g}"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi].

    Args:
        lo: the smallest value to cover.
        hi: the largest value to cover.
        target: about how many intervals to produce.

    Returns:
        Ascending ticks; the first is <= lo and the last is >= hi.
    """
    if not hi > lo:
        spread = abs(lo) * 0.1 or 1.0
        lo, hi = lo - spread, hi + spread
    magnitude = 10.0 ** math.floor(math.log10((hi - lo) / target))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (m * magnitude) <= target)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _log_ticks(lo_exponent: float, hi_exponent: float) -> list[float]:
    """Powers of ten inside [10**lo_exponent, 10**hi_exponent], thinned to at most ~7."""
    exponents = list(range(math.ceil(lo_exponent), math.floor(hi_exponent) + 1))
    stride = max(1, math.ceil(len(exponents) / 7))
    return [10.0**exponent for exponent in exponents[::stride]]


def _frame(title: str, xlabel: str, ylabel: str, body: Sequence[str]) -> str:
    """Wrap plot elements in an <svg> with a white background, title and axis labels."""
    middle_y = (_PLOT_Y0 + _PLOT_Y1) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label={quoteattr(title)} '
        'font-family="Helvetica, Arial, sans-serif" font-size="11" fill="#222">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        _text(WIDTH / 2, 22, title, text_anchor="middle", font_size=14, font_weight="bold"),
        *body,
    ]
    if xlabel:
        parts.append(_text((_PLOT_X0 + _PLOT_X1) / 2, HEIGHT - 8, xlabel, text_anchor="middle", font_size=12))
    if ylabel:
        parts.append(_text(16, middle_y, ylabel, text_anchor="middle", font_size=12,
                           transform=f"rotate(-90 16 {middle_y:.1f})"))
    parts.append("</svg>")
    return "\n".join(parts)


def no_data_svg(title: str) -> str:
    """A plot frame that says "no data" (empty input or only NaN/inf values)."""
    message = _text(WIDTH / 2, HEIGHT / 2, "no data", text_anchor="middle", font_size=16, fill="#999999")
    return _frame(title, "", "", [message])


def _y_axis(lo: float, hi: float) -> tuple[_Axis, list[str]]:
    """A linear y axis over nice ticks covering [lo, hi], with its grid lines and labels."""
    ticks = nice_ticks(lo, hi)
    axis = _Axis(ticks[0], ticks[-1], _PLOT_Y1, _PLOT_Y0)
    parts = []
    for tick in ticks:
        y = axis(tick)
        parts.append(f'<line x1="{_PLOT_X0}" y1="{y:.1f}" x2="{_PLOT_X1}" y2="{y:.1f}" stroke="{GRID_COLOUR}"/>')
        parts.append(_text(_PLOT_X0 - 6, y + 4, _tick_label(tick), text_anchor="end"))
    return axis, parts


def _x_ticks(axis: _Axis, ticks: Sequence[float]) -> list[str]:
    """Tick marks and labels under the plot for a numeric x axis."""
    parts = []
    for tick in ticks:
        x = axis(tick)
        if _PLOT_X0 - 0.5 <= x <= _PLOT_X1 + 0.5:
            parts.append(f'<line x1="{x:.1f}" y1="{_PLOT_Y1}" x2="{x:.1f}" y2="{_PLOT_Y1 + 5}" '
                         f'stroke="{AXIS_COLOUR}"/>')
            parts.append(_text(x, _PLOT_Y1 + 17, _tick_label(tick), text_anchor="middle"))
    return parts


def _axes_lines() -> str:
    return (f'<path d="M{_PLOT_X0},{_PLOT_Y0} V{_PLOT_Y1} H{_PLOT_X1}" fill="none" '
            f'stroke="{AXIS_COLOUR}" stroke-width="1"/>')


def _x_axis(lo: float, hi: float, log: bool) -> tuple[_Axis, list[float]]:
    """A numeric x axis over [lo, hi] (values, not exponents) and the ticks to label it with."""
    if log:
        lo_exponent, hi_exponent = math.log10(lo), math.log10(hi)
        if not hi_exponent > lo_exponent:
            lo_exponent, hi_exponent = lo_exponent - 1, hi_exponent + 1
        ticks = _log_ticks(lo_exponent, hi_exponent)
        if len(ticks) < 2:  # less than a decade: linear-style round ticks still read fine
            ticks = [t for t in nice_ticks(lo, hi) if t > 0]
        return _Axis(lo_exponent, hi_exponent, _PLOT_X0, _PLOT_X1, log=True), ticks
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return _Axis(lo, hi, _PLOT_X0, _PLOT_X1), nice_ticks(lo, hi)


def histogram_svg(bin_edges: Sequence[float], counts: Sequence[float], *, title: str, xlabel: str,
                  ylabel: str, log_x: bool = False) -> str:
    """A histogram of pre-binned counts.

    Args:
        bin_edges: ``len(counts) + 1`` ascending edges.
        counts: the count in each bin.
        title: the plot title.
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        log_x: a logarithmic x axis; bins with a non-positive edge are then left out.

    Returns:
        The SVG document as a string ("no data" when no bin is finite).
    """
    if len(bin_edges) != len(counts) + 1:
        return no_data_svg(title)
    bins = [(left, right, count) for left, right, count in zip(bin_edges[:-1], bin_edges[1:], counts)
            if _is_finite(left) and _is_finite(right) and _is_finite(count) and right > left
            and (not log_x or left > 0)]
    if not bins:
        return no_data_svg(title)
    x_axis, x_ticks = _x_axis(bins[0][0], max(right for _, right, _ in bins), log_x)
    y_axis, parts = _y_axis(0.0, max(max(count for *_, count in bins), 1))
    for left, right, count in bins:
        x0, x1, y = x_axis(left), x_axis(right), y_axis(max(count, 0))
        parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                     f'height="{_PLOT_Y1 - y:.1f}" fill="{BAR_COLOUR}">'
                     f'<title>{escape(f"[{left:.3g}, {right:.3g}): {count:g}")}</title></rect>')
    parts.extend(_x_ticks(x_axis, x_ticks))
    parts.append(_axes_lines())
    return _frame(title, xlabel, ylabel, parts)


def _category_labels(labels: Sequence[str], centres: Sequence[float]) -> list[str]:
    """Labels under bars: thinned to about 20, truncated, slanted when there are many."""
    stride = max(1, math.ceil(len(labels) / _MAX_CATEGORY_LABELS))
    slanted = len(labels) > 8 or any(len(label) > 8 for label in labels)
    parts = []
    for label, x in list(zip(labels, centres))[::stride]:
        short = label if len(label) <= 14 else label[:13] + "…"
        if slanted:
            y = _PLOT_Y1 + 12
            parts.append(_text(x, y, short, text_anchor="end", transform=f"rotate(-35 {x:.1f} {y:.1f})"))
        else:
            parts.append(_text(x, _PLOT_Y1 + 16, short, text_anchor="middle"))
    return parts


def _threshold_line(y_axis: _Axis, threshold: float) -> list[str]:
    y = y_axis(threshold)
    return [
        f'<line x1="{_PLOT_X0}" y1="{y:.1f}" x2="{_PLOT_X1}" y2="{y:.1f}" stroke="{THRESHOLD_COLOUR}" '
        'stroke-width="1.5" stroke-dasharray="6 4"/>',
        _text(_PLOT_X1 - 2, y - 4, f"threshold {threshold:.3g}", text_anchor="end", fill=THRESHOLD_COLOUR,
              stroke="#ffffff", stroke_width=3, paint_order="stroke"),  # a halo keeps it legible over bars
    ]


def bar_svg(labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
            threshold: float | None = None, highlight: int | None = None) -> str:
    """A bar chart, one bar per label.

    Args:
        labels: the category under each bar (missing labels are numbered).
        values: the bar heights; NaN/inf bars are marked "n/a".
        title: the plot title.
        ylabel: the y-axis label.
        threshold: draw a dashed horizontal line at this value.
        highlight: index of a bar to draw in the warning colour.

    Returns:
        The SVG document as a string ("no data" when no value is finite).
    """
    finite = [value for value in values if _is_finite(value)]
    if not finite:
        return no_data_svg(title)
    labels = [str(label) for label in labels[:len(values)]] + [str(i) for i in range(len(labels), len(values))]
    has_threshold = threshold is not None and _is_finite(threshold)
    lo = min([0.0, *finite, *([threshold] if has_threshold else [])])
    hi = max([*finite, *([threshold] if has_threshold else [])])
    y_axis, parts = _y_axis(lo, hi)
    slot = (_PLOT_X1 - _PLOT_X0) / len(values)
    width = max(slot * 0.8, 1.0)
    baseline = y_axis(min(max(0.0, y_axis.lo), y_axis.hi))
    centres = [_PLOT_X0 + slot * (i + 0.5) for i in range(len(values))]
    for index, (label, value, centre) in enumerate(zip(labels, values, centres)):
        if not _is_finite(value):
            parts.append(_text(centre, baseline - 4, "n/a", text_anchor="middle", fill="#999999", font_size=9))
            continue
        top, bottom = sorted((y_axis(value), baseline))
        colour = WARNING_COLOUR if index == highlight else BAR_COLOUR
        parts.append(f'<rect x="{centre - width / 2:.1f}" y="{top:.1f}" width="{width:.1f}" '
                     f'height="{max(bottom - top, 0.5):.1f}" fill="{colour}">'
                     f'<title>{escape(f"{label}: {value:.4g}")}</title></rect>')
    if has_threshold:
        parts.extend(_threshold_line(y_axis, threshold))
    parts.extend(_category_labels(labels, centres))
    parts.append(_axes_lines())
    return _frame(title, "", ylabel, parts)


def _polylines(x_axis: _Axis, y_axis: _Axis, xs: Sequence[float], ys: Sequence[float], colour: str) -> list[str]:
    """One series: polylines broken at non-finite points, plus dots when there are few points."""
    runs: list[list[str]] = [[]]
    for x, y in zip(xs, ys):
        if _is_finite(x) and _is_finite(y):
            runs[-1].append(f"{x_axis(x):.1f},{y_axis(y):.1f}")
        elif runs[-1]:
            runs.append([])
    parts = [f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="2"/>'
             for run in runs if len(run) > 1]
    points = [point for run in runs for point in run]
    if len(points) <= 40:
        parts.extend(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{colour}"/>'
                     for p in points)
    return parts


def _legend(names: Sequence[str]) -> list[str]:
    parts = []
    for row, name in enumerate(names):
        y = _PLOT_Y0 + 12 + 15 * row
        colour = SERIES_COLOURS[row % len(SERIES_COLOURS)]
        parts.append(f'<line x1="{_PLOT_X1 - 150}" y1="{y - 4}" x2="{_PLOT_X1 - 132}" y2="{y - 4}" '
                     f'stroke="{colour}" stroke-width="3"/>')
        parts.append(_text(_PLOT_X1 - 128, y, name if len(name) <= 22 else name[:21] + "…"))
    return parts


def line_svg(xs: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str,
             ylabel: str) -> str:
    """Line plot of one or more series sharing the same x values (e.g. accuracy against sparsity).

    Args:
        xs: the x values.
        series: series name -> y values (same length as ``xs``); NaN/inf points break the line.
        title: the plot title.
        xlabel: the x-axis label.
        ylabel: the y-axis label.

    Returns:
        The SVG document as a string ("no data" when no point is finite).
    """
    points = [(x, y) for ys in series.values() for x, y in zip(xs, ys) if _is_finite(x) and _is_finite(y)]
    if not points:
        return no_data_svg(title)
    x_axis, x_ticks = _x_axis(min(x for x, _ in points), max(x for x, _ in points), log=False)
    x_axis = _Axis(x_ticks[0], x_ticks[-1], _PLOT_X0, _PLOT_X1)
    y_axis, parts = _y_axis(min(y for _, y in points), max(y for _, y in points))
    for row, ys in enumerate(series.values()):
        parts.extend(_polylines(x_axis, y_axis, xs, ys, SERIES_COLOURS[row % len(SERIES_COLOURS)]))
    parts.extend(_x_ticks(x_axis, x_ticks))
    parts.append(_axes_lines())
    if len(series) > 1:
        parts.extend(_legend([str(name) for name in series]))
    return _frame(title, xlabel, ylabel, parts)


HEATMAP_NAN_COLOUR = "#c8c8c8"
_HEATMAP_STOPS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
                  (1.0, (253, 231, 37)))  # viridis: sequential, readable in grey scale and by most colour-blind eyes
_HEATMAP_LEVELS = 64  # colours are quantized so equal neighbours merge into one <rect>


def _heatmap_colour(fraction: float) -> str:
    """The viridis colour at ``fraction`` in [0, 1], as #rrggbb."""
    fraction = min(max(fraction, 0.0), 1.0)
    for (lo, lo_rgb), (hi, hi_rgb) in zip(_HEATMAP_STOPS[:-1], _HEATMAP_STOPS[1:]):
        if fraction <= hi:
            t = (fraction - lo) / (hi - lo)
            return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(lo_rgb, hi_rgb))
    return "#fde725"


def _heatmap_legend(lo: float, hi: float, x: float, y0: float, y1: float, label: str) -> list[str]:
    """A vertical colour bar from ``lo`` (bottom) to ``hi`` (top) with round ticks and a caption."""
    steps = 32
    height = (y1 - y0) / steps
    parts = [f'<rect x="{x:.1f}" y="{y1 - (i + 1) * height:.2f}" width="12" height="{height + 0.3:.2f}" '
             f'fill="{_heatmap_colour((i + 0.5) / steps)}"/>' for i in range(steps)]
    axis = _Axis(lo, hi, y1, y0)
    for tick in nice_ticks(lo, hi):
        if lo - 1e-9 <= tick <= hi + 1e-9:
            parts.append(f'<line x1="{x + 12}" y1="{axis(tick):.1f}" x2="{x + 16}" y2="{axis(tick):.1f}" '
                         f'stroke="{AXIS_COLOUR}"/>')
            parts.append(_text(x + 18, axis(tick) + 4, _tick_label(tick)))
    if label:
        parts.append(_text(x, y0 - 8, label, font_size=10))
    return parts


def _heatmap_row_labels(labels: Sequence[str], y0: float, row_height: float, x: float) -> list[str]:
    """Row labels left of the cells, thinned so they stay at least 11 pixels apart."""
    stride = max(1, math.ceil(11.0 / row_height))
    parts = []
    for index in range(0, len(labels), stride):
        label = labels[index]
        short = label if len(label) <= 24 else label[:23] + "…"
        y = y0 + (index + 0.5) * row_height
        parts.append(_text(x - 4, y + 3.5, short, text_anchor="end", font_size=10))
        if stride > 1:  # a tick shows which of the thin rows the label names
            parts.append(f'<line x1="{x - 2}" y1="{y:.2f}" x2="{x + 5}" y2="{y:.2f}" stroke="{AXIS_COLOUR}"/>')
    return parts


def _heatmap_cells(rows: Sequence[Sequence[float]], lo: float, hi: float, x0: float, y0: float,
                   cell_width: float, row_height: float) -> list[str]:
    """One <rect> per run of equally coloured neighbouring cells in a row (NaN cells grey)."""
    parts = ['<g shape-rendering="crispEdges">']
    for row_index, row in enumerate(rows):
        colours = [_heatmap_colour(round((value - lo) / (hi - lo) * (_HEATMAP_LEVELS - 1)) / (_HEATMAP_LEVELS - 1))
                   if _is_finite(value) else HEATMAP_NAN_COLOUR for value in row]
        y = y0 + row_index * row_height
        start = 0
        for column in range(1, len(colours) + 1):
            if column == len(colours) or colours[column] != colours[start]:
                parts.append(f'<rect x="{x0 + start * cell_width:.2f}" y="{y:.2f}" '
                             f'width="{(column - start) * cell_width:.2f}" height="{row_height:.2f}" '
                             f'fill="{colours[start]}"/>')
                start = column
    parts.append("</g>")
    return parts


def _heatmap_x_ticks(span: float, x0: float, x1: float, y: float) -> list[str]:
    """Round ticks from 0 to ``span`` under the cells (whole numbers written out: 1500, not 1.5e+03)."""
    axis, parts = _Axis(0.0, span, x0, x1), []
    for tick in nice_ticks(0.0, span):
        if tick <= span + 1e-9:
            x = axis(tick)
            parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 5:.1f}" stroke="{AXIS_COLOUR}"/>')
            label = f"{tick:.0f}" if float(tick).is_integer() and abs(tick) < 1e7 else _tick_label(tick)
            parts.append(_text(x, y + 17, label, text_anchor="middle"))
    return parts


def heatmap_svg(matrix: Sequence[Sequence[float]], *, title: str, xlabel: str, ylabel: str,
                row_labels: Sequence[str] | None = None, value_label: str = "", column_width: float = 1.0) -> str:
    """A heatmap: one row per entry of ``matrix``, one cell per value, on a sequential colour scale.

    Rows may differ in length (the missing cells are grey, like NaN). The plot grows taller with the row
    count (thin rows when there are many); downsample wide matrices before calling (one rect per cell).

    Args:
        matrix: the rows of values; NaN/inf cells are drawn grey.
        title: the plot title.
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        row_labels: a label per row (thinned when rows are thin); row numbers when omitted.
        value_label: a caption above the colour legend (what the colour means).
        column_width: the x units one column spans (e.g. channels per max-pooled column), for the x ticks.

    Returns:
        The SVG document as a string ("no data" when no value is finite).
    """
    columns = max((len(row) for row in matrix), default=0)
    rows = [list(row) + [math.nan] * (columns - len(row)) for row in matrix]
    finite = [value for row in rows for value in row if _is_finite(value)]
    if not finite or columns == 0:
        return no_data_svg(title)
    lo, hi = min(finite), max(finite)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    labels = [str(label) for label in row_labels] if row_labels is not None else [str(i) for i in range(len(rows))]
    labels += [""] * (len(rows) - len(labels))
    longest = max((min(len(label), 24) for label in labels), default=1)
    x0, x1 = max(_LEFT, 34 + 6 * longest), WIDTH - 96
    plot_height = min(max(len(rows) * 4.0, 160.0), 640.0)
    height = _TOP + plot_height + _BOTTOM
    row_height, cell_width = plot_height / len(rows), (x1 - x0) / columns
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
             f'viewBox="0 0 {WIDTH} {height:.0f}" role="img" aria-label={quoteattr(title)} '
             'font-family="Helvetica, Arial, sans-serif" font-size="11" fill="#222">',
             f'<rect width="{WIDTH}" height="{height:.0f}" fill="#ffffff"/>',
             _text(WIDTH / 2, 22, title, text_anchor="middle", font_size=14, font_weight="bold")]
    parts += _heatmap_cells(rows, lo, hi, x0, _TOP, cell_width, row_height)
    parts += _heatmap_row_labels(labels, _TOP, row_height, x0 - 5)
    parts += _heatmap_x_ticks(columns * column_width, x0, x1, _TOP + plot_height)
    parts.append(f'<rect x="{x0}" y="{_TOP}" width="{x1 - x0}" height="{plot_height:.1f}" fill="none" '
                 f'stroke="{AXIS_COLOUR}"/>')
    parts += _heatmap_legend(lo, hi, x1 + 14, _TOP + 14, _TOP + min(plot_height, 260.0), value_label)
    if xlabel:
        parts.append(_text((x0 + x1) / 2, height - 8, xlabel, text_anchor="middle", font_size=12))
    if ylabel:
        middle_y = _TOP + plot_height / 2
        parts.append(_text(12, middle_y, ylabel, text_anchor="middle", font_size=12,
                           transform=f"rotate(-90 12 {middle_y:.1f})"))
    parts.append("</svg>")
    return "\n".join(parts)
