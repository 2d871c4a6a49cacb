"""The built-in English Wikipedia extract: 97 articles as plain prose (about 2.8M characters,
620k SmolLM2 tokens once cleaned).

The extract ships inside the ``gensim`` wheel as a bz2 MediaWiki XML dump. The package is located without
importing it (gensim is heavy and none of its code is needed): install it with ``pip install --no-deps gensim``.

Pages are split deterministically into two parts that never overlap:

* every article (namespace 0, not a redirect) gets an *article index*, its position among the articles of the
  dump in dump order;
* the article with index ``i`` belongs to the **evaluation** split when ``i % 5 == 4`` (every 5th article) and to
  the **calibration** split otherwise (see :func:`split_of`);
* disambiguation pages and pages shorter than ``MIN_PAGE_CHARS`` characters once cleaned are then dropped.

Counting before these filters keeps every page's split stable when the markup cleaner changes.
"""

from __future__ import annotations

import bz2
import functools
import html
import logging
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from accullm_export.errors import UserError
from accullm_export.packaged_files import packaged_file

logger = logging.getLogger(__name__)

DUMP_PACKAGE = "gensim"
DUMP_RELATIVE_PATH = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SPLITS = ("calibration", "evaluation", "all")
EVALUATION_EVERY = 5
MIN_PAGE_CHARS = 500

# Trailing sections that hold references and link lists rather than prose; the text is cut at the first one.
_BACK_MATTER = frozenset({
    "see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes",
})
# Link namespaces whose links are not text (images, categories); interwiki prefixes keep their label.
_DROPPED_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
# Tags whose whole content is dropped; any other tag is removed but its content kept.
_DROPPED_ELEMENTS = ("ref", "math", "gallery", "source", "syntaxhighlight", "timeline", "score", "imagemap",
                     "references", "chem", "ce", "hiero", "graph")

_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig\w*|dab|[a-z]*dis|set index article)\s*[|}]", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SELF_CLOSING_ELEMENT = re.compile(rf"<(?:{'|'.join(_DROPPED_ELEMENTS)})\b[^>]*/>", re.IGNORECASE)
_DROPPED_ELEMENT = re.compile(rf"<({'|'.join(_DROPPED_ELEMENTS)})\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_BLOCK_TOKEN = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE)
# A link holding no other link; single brackets (captions such as "Bicyclo[1.1.0]butane") are allowed inside.
_INNERMOST_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
# Removed pronunciation and language templates leave "(; born ...)", "(;, Greek,)" or "()" behind.
_PARENTHESIS_LEADING_PUNCTUATION = re.compile(r"\([ \t,;:]+")
_PARENTHESIS_TRAILING_PUNCTUATION = re.compile(r"[ \t,;:]+\)")
_EMPTY_PARENTHESES = re.compile(r" ?\(\)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([,.;:!?)])")  # left behind where a reference was removed
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Page:
    """One cleaned Wikipedia article.

    Attributes:
        title: the article title, as in the dump.
        text: plain prose: markup removed, headings on their own lines, paragraphs separated by one blank line.
    """

    title: str
    text: str


def split_of(article_index: int) -> str:
    """The split an article belongs to: ``"evaluation"`` for every 5th article (index % 5 == 4), else calibration.

    Args:
        article_index: the article's position among the dump's articles (namespace 0, not redirects), in dump
            order, counted before short pages are dropped.
    """
    return "evaluation" if article_index % EVALUATION_EVERY == EVALUATION_EVERY - 1 else "calibration"


def wikipedia_dump_path() -> Path:
    """Path of the bz2 MediaWiki dump inside the installed gensim package (gensim is not imported).

    Raises:
        UserError: gensim is not installed, or its copy lacks the dump.
    """
    return packaged_file(DUMP_PACKAGE, DUMP_RELATIVE_PATH, "gensim", "the built-in Wikipedia text")


def wikipedia_pages(split: str = "all") -> tuple[Page, ...]:
    """The cleaned articles of one split, in dump order (parsed once per process, then cached).

    Args:
        split: ``"calibration"``, ``"evaluation"`` or ``"all"``.

    Raises:
        UserError: an unknown split, or gensim is not installed.
    """
    if split not in SPLITS:
        raise UserError(f"unknown Wikipedia split {split!r}: expected one of {', '.join(SPLITS)}")
    indexed = _parsed_dump(str(wikipedia_dump_path()))
    return tuple(page for index, page in indexed if split == "all" or split_of(index) == split)


def wikipedia_titles(split: str = "all") -> tuple[str, ...]:
    """Titles of the articles in one split, in dump order, for manifests that record which pages were used."""
    return tuple(page.title for page in wikipedia_pages(split))


@functools.lru_cache(maxsize=2)
def _parsed_dump(path: str) -> tuple[tuple[int, Page], ...]:
    """(article index, page) of the dump's prose articles: no disambiguation page, at least MIN_PAGE_CHARS chars."""
    kept = []
    for article_index, (title, wikitext) in enumerate(_iter_articles(Path(path))):
        if _is_disambiguation(title, wikitext):
            continue
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_PAGE_CHARS:
            kept.append((article_index, Page(title=title, text=text)))
    logger.debug("parsed %d Wikipedia articles from %s", len(kept), path)
    return tuple(kept)


def _iter_articles(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) of the dump's articles: namespace 0, redirects skipped; streams the XML."""
    root = None
    with bz2.open(path, "rb") as stream:
        for event, element in ElementTree.iterparse(stream, events=("start", "end")):
            if root is None:
                root = element
            if event != "end" or _local_name(element.tag) != "page":
                continue
            namespace = element.findtext("{*}ns", default="0").strip()
            is_redirect = element.find("{*}redirect") is not None
            title = element.findtext("{*}title", default="")
            wikitext = element.findtext("{*}revision/{*}text", default="")
            root.clear()  # pages are processed one at a time; keeping them would hold the whole dump
            if namespace == "0" and not is_redirect:
                yield title, wikitext


def _is_disambiguation(title: str, wikitext: str) -> bool:
    """Disambiguation pages are lists of links, not prose."""
    return title.endswith("(disambiguation)") or _DISAMBIGUATION.search(wikitext) is not None


def _local_name(tag: str) -> str:
    """The tag without its ``{namespace}`` prefix."""
    return tag.rsplit("}", 1)[-1]


def clean_wikitext(wikitext: str) -> str:
    """Turn MediaWiki markup into plain prose.

    Drops comments, references and other non-prose elements, templates (nested), tables, file/image/category
    links and the back matter (References, External links, ...); keeps link labels, heading titles (on their own
    line) and the text inside formatting tags. Paragraphs end up separated by exactly one blank line.
    """
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING_ELEMENT.sub("", text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _remove_blocks(text)
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(lambda match: match.group(1) or "", text)
    text = _LINE_BREAK_TAG.sub(" ", text)
    text = _ANY_TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _cut_back_matter(text)
    text = _HEADING.sub(lambda match: f"\n{match.group(2)}\n", text)
    text = _LIST_MARKER.sub("", text)
    text = html.unescape(text)
    text = _tidy_parentheses(text)
    # Leftovers of unbalanced markup are dropped rather than left as noise.
    text = text.replace("{{", "").replace("}}", "").replace("[[", "").replace("]]", "")
    return _normalise_whitespace(text)


def _remove_blocks(text: str) -> str:
    """Remove templates ``{{...}}`` and tables ``{| ... |}`` (line-anchored), nested in any combination.

    An opener that is never closed is kept as literal text (as MediaWiki does) and the scan resumes after it.
    """
    pieces = []
    position = 0
    while True:
        span = _next_block(text, position)
        if span is None:
            pieces.append(text[position:])
            return "".join(pieces)
        start, end = span
        pieces.append(text[position:start])
        position = end


def _next_block(text: str, position: int) -> tuple[int, int] | None:
    """(start, end) of the next balanced template or table at or after ``position``, or None."""
    while True:
        stack: list[str] = []
        outer_start = -1
        for match in _BLOCK_TOKEN.finditer(text, position):
            token = match.group().strip()
            if token in ("{{", "{|"):
                if not stack:
                    outer_start = match.start()
                stack.append("}}" if token == "{{" else "|}")
            elif stack and stack[-1] == token:
                stack.pop()
                if not stack:
                    return outer_start, match.end()
        if not stack:
            return None
        # The outermost opener is never closed: treat it as text and look again just after it.
        literal = _BLOCK_TOKEN.match(text, outer_start)
        position = literal.end() if literal else outer_start + 2


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; file, image and category links are dropped.

    Innermost links go first so that links inside image captions are resolved before the image is dropped.
    """
    def replace(match: re.Match) -> str:
        target, _, label = match.group(1).partition("|")
        if target.strip().lower().startswith(_DROPPED_LINK_PREFIXES):
            return ""
        if label:
            return label
        return target.lstrip(":")

    while True:
        replaced = _INNERMOST_LINK.sub(replace, text)
        if replaced == text:
            return replaced
        text = replaced


def _cut_back_matter(text: str) -> str:
    """Cut the text at the first back-matter heading (References, External links, See also, ...)."""
    for match in _HEADING.finditer(text):
        if match.group(2).strip().lower() in _BACK_MATTER:
            return text[:match.start()]
    return text


def _tidy_parentheses(text: str) -> str:
    """Drop the separators a removed template leaves at either end of parentheses, then empty parentheses."""
    text = _PARENTHESIS_LEADING_PUNCTUATION.sub("(", text)
    text = _PARENTHESIS_TRAILING_PUNCTUATION.sub(")", text)
    return _EMPTY_PARENTHESES.sub("", text)


def _normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces, strip every line and leave at most one blank line between paragraphs."""
    lines = [_SPACE_BEFORE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", line)).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
