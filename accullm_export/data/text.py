"""Text sources for calibration and validation, and their cutting into fixed-length token windows.

A source is named by a spec string:

* ``wiki`` or ``wiki:evaluation`` -- the evaluation split of the built-in Wikipedia extract;
* ``wiki:calibration`` -- its calibration split (the two never share a page, see
  :mod:`accullm_export.data.wikipedia`);
* ``PATH.txt`` -- a UTF-8 text file; documents are separated by blank lines (one document if there are none);
* ``PATH.jsonl`` -- one JSON object per line, its ``"text"`` field a document; blank lines are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accullm_export.data import wikipedia
from accullm_export.errors import UserError
from accullm_export.hashing import sha256_file

# Windows are cut from at most this many times the tokens they need (see token_windows).
TOKEN_BUDGET_FACTOR = 4

_WIKI_SPECS = {"wiki": "evaluation", "wiki:evaluation": "evaluation", "wiki:calibration": "calibration"}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class TextSource:
    """Documents to calibrate or evaluate on, with what a manifest needs to identify them.

    Attributes:
        name: the spec the source was loaded from, e.g. ``"wiki:evaluation"`` or the file's name.
        documents: the non-empty documents, in source order.
        description: JSON-ready identification for manifests, e.g.
            ``{"kind": "wikipedia", "split": "evaluation", "pages": [...]}`` or
            ``{"kind": "file", "format": "jsonl", "path": ..., "sha256": ...}``.
    """

    name: str
    documents: tuple[str, ...]
    description: dict


def load_text_source(spec: str) -> TextSource:
    """Load the text source named by ``spec`` (see the module docstring for the accepted forms).

    Raises:
        UserError: an unknown spec, a missing or unreadable file, a bad JSONL line, or no non-empty documents.
    """
    if spec in _WIKI_SPECS:
        source = _wikipedia_source(_WIKI_SPECS[spec])
    elif spec.startswith("wiki:"):
        raise UserError(f"unknown Wikipedia split in {spec!r}: expected {', '.join(_WIKI_SPECS)}")
    else:
        source = _file_source(Path(spec))
    if not source.documents:
        raise UserError(f"empty text source {spec}: it holds no non-empty document")
    return source


def _wikipedia_source(split: str) -> TextSource:
    """One split of the built-in Wikipedia extract."""
    pages = wikipedia.wikipedia_pages(split)
    description = {
        "kind": "wikipedia",
        "split": split,
        "dump": wikipedia.DUMP_RELATIVE_PATH.rsplit("/", 1)[-1],
        "split_rule": f"article index % {wikipedia.EVALUATION_EVERY} == {wikipedia.EVALUATION_EVERY - 1} "
                      "is evaluation, the rest calibration",
        "pages": [page.title for page in pages],
    }
    return TextSource(name=f"wiki:{split}", documents=tuple(page.text for page in pages), description=description)


def _file_source(path: Path) -> TextSource:
    """A .txt or .jsonl file, read by the loader registered for its extension."""
    loader = _FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UserError(f"unknown text source {path}: expected wiki, wiki:calibration, wiki:evaluation, "
                        f"or a {' or '.join(_FILE_LOADERS)} file")
    if not path.is_file():
        raise UserError(f"text source {path}: no such file")
    content = read_text_file(path, "text source")
    description = {"kind": "file", "format": path.suffix.lower().lstrip("."), "path": str(path.resolve()),
                   "sha256": sha256_file(path)}
    return TextSource(name=path.name, documents=loader(content, path), description=description)


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """The text of a UTF-8 file, refused when it is unreadable, not UTF-8, or binary (a NUL byte: no text file
    holds one, and a tokenizer would turn it into tokens silently).

    Raises:
        UserError: one line naming ``what``, the file and the problem.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{what} {path} is a binary file, not text (it holds a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path}: cannot read it as UTF-8 text ({exc})") from None


def _txt_documents(content: str, path: Path) -> tuple[str, ...]:
    """Documents of a text file: blocks separated by blank lines, stripped, empty ones dropped."""
    return tuple(block.strip() for block in _PARAGRAPH_BREAK.split(content) if block.strip())


def _jsonl_documents(content: str, path: Path) -> tuple[str, ...]:
    """The ``"text"`` fields of a JSONL file; blank lines are skipped, empty texts dropped."""
    documents = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {line_number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path} line {line_number}: expected a JSON object with a string \"text\" field")
        if "\x00" in record["text"]:
            raise UserError(f"{path} line {line_number}: the \"text\" field holds a NUL character; it is not text")
        if record["text"].strip():
            documents.append(record["text"])
    return tuple(documents)


_FILE_LOADERS: dict[str, Callable[[str, Path], tuple[str, ...]]] = {
    ".txt": _txt_documents,
    ".jsonl": _jsonl_documents,
}


def token_windows(
    documents: Iterable[str],
    encode: Callable[[str], Sequence[int]],
    *,
    num_windows: int,
    seq_len: int,
    seed: int = 0,
    separator_ids: Sequence[int] = (),
) -> np.ndarray:
    """Cut documents into ``num_windows`` non-overlapping windows of ``seq_len`` tokens.

    The documents are tokenized in order and concatenated, ``separator_ids`` (e.g. the EOS id) between two
    documents, and the stream is cut into consecutive windows of ``seq_len`` tokens (the remainder is dropped).
    When there are more windows than asked for, ``num_windows`` of them are drawn without replacement with
    ``np.random.default_rng(seed)`` and returned in stream order, so the same seed gives the same windows.

    Tokenization is lazy: it stops once ``TOKEN_BUDGET_FACTOR`` (4) times the needed token count is reached,
    so on a big corpus the windows come from its first documents only.

    Args:
        documents: the texts, in order.
        encode: text -> token ids, e.g. ``lambda text: tokenizer.encode(text).ids``.
        num_windows: how many windows to return (at least 1).
        seq_len: tokens per window (at least 2).
        seed: seed of the draw among the available windows.
        separator_ids: token ids inserted between two documents.

    Returns:
        int64 array of shape [num_windows, seq_len].

    Raises:
        UserError: num_windows < 1, seq_len < 2, or too few tokens for num_windows windows.
    """
    if num_windows < 1:
        raise UserError(f"the number of windows must be at least 1, got {num_windows}")
    if seq_len < 2:
        raise UserError(f"the window length must be at least 2 tokens, got {seq_len}")
    needed = num_windows * seq_len
    stream = _token_stream(documents, encode, separator_ids, budget=TOKEN_BUDGET_FACTOR * needed)
    available_windows = stream.size // seq_len
    if available_windows < num_windows:
        raise UserError(f"text source too short: {stream.size} tokens available, {needed} needed "
                        f"for {num_windows} windows of {seq_len} tokens")
    windows = stream[: available_windows * seq_len].reshape(available_windows, seq_len)
    if available_windows > num_windows:
        chosen = np.random.default_rng(seed).choice(available_windows, size=num_windows, replace=False)
        windows = windows[np.sort(chosen)]
    return np.ascontiguousarray(windows, dtype=np.int64)


def _token_stream(documents: Iterable[str], encode: Callable[[str], Sequence[int]], separator_ids: Sequence[int],
                  *, budget: int) -> np.ndarray:
    """Token ids of the documents joined by the separator, tokenizing until at least ``budget`` tokens."""
    separator = np.asarray(separator_ids, dtype=np.int64)
    chunks: list[np.ndarray] = []
    count = 0
    for document in documents:
        if count >= budget:
            break
        if chunks:
            chunks.append(separator)
            count += separator.size
        ids = np.asarray(encode(document), dtype=np.int64).reshape(-1)
        chunks.append(ids)
        count += ids.size
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
