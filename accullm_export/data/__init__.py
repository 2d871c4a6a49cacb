"""Text sources for calibration and validation: the built-in Wikipedia extract, .txt and .jsonl files,
and their cutting into fixed-length token windows."""

from __future__ import annotations

from accullm_export.data.text import TextSource, load_text_source, token_windows
from accullm_export.data.wikipedia import Page, split_of, wikipedia_dump_path, wikipedia_pages, wikipedia_titles

__all__ = [
    "Page",
    "TextSource",
    "load_text_source",
    "split_of",
    "token_windows",
    "wikipedia_dump_path",
    "wikipedia_pages",
    "wikipedia_titles",
]
