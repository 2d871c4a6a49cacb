"""Shared pieces of the kit's self-contained HTML reports: one stylesheet, tables, figures, sections, page.

Pages carry inline CSS and inline SVG only: no scripts, fonts, links or images to fetch, so they open offline.
"""

from __future__ import annotations

import html
from typing import Sequence

_SVG_NAMESPACE = ' xmlns="http://www.w3.org/2000/svg"'
STYLE = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:980px;margin:0 auto;padding:16px 24px 48px}
header{background:#fff;border-bottom:1px solid #ddd;padding:16px 24px}
header .inner{max-width:980px;margin:0 auto}
h1{font-size:22px;margin:0 0 8px}
h2{font-size:17px;margin:12px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:4px 16px 16px;margin-top:16px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#fde4e4}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;font-weight:bold;color:#fff}
.badge.pass{background:#2e8540}.badge.fail{background:#c62828}
.verdict{font-size:20px;padding:4px 16px;margin-left:8px;vertical-align:middle}
.muted{color:#666;font-size:13px}
code,pre{font-family:Menlo,Consolas,monospace;font-size:12px}
pre{background:#f3f3f3;border:1px solid #ddd;padding:8px;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
figure{margin:8px 0}
figure svg{max-width:100%;height:auto;border:1px solid #eee}
details summary{cursor:pointer;margin:8px 0}
td code{color:#555;font-size:11px}
"""


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], failed: Sequence[bool] = ()) -> str:
    """An HTML table; cells are already-rendered ``<td>`` strings, ``failed`` rows are highlighted."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = []
    for index, cells in enumerate(rows):
        css = ' class="fail"' if index < len(failed) and failed[index] else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(svg_text: str) -> str:
    """Inline an SVG in HTML5, where the SVG namespace is implied (so no URL appears in the page)."""
    return f"<figure>{svg_text.replace(_SVG_NAMESPACE, '', 1)}</figure>"


def section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{body}</details>"


def page(title: str, header: str, body: str) -> str:
    """A complete HTML document: ``header`` and ``body`` are rendered HTML, ``title`` is plain text."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f"{header}\n<main>\n{body}\n</main>\n</body></html>\n")
