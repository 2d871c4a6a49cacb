"""JSON side files (config.json, genai_config.json, tokenizer configs) read with one clear error each.

A truncated, binary or foreign file beside a model must end the command with a line naming the file, not with a
traceback from ``json`` or a ``.get`` on a list.
"""

from __future__ import annotations

import json
from pathlib import Path

from accullm_export.errors import UserError


def read_json_object(path: str | Path, what: str = "file") -> dict:
    """The JSON object stored in ``path``.

    Raises:
        UserError: the file cannot be read, is not UTF-8 JSON, or holds something other than a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        document = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise UserError(f"{what} {path} is not readable JSON ({reason})") from None
    if not isinstance(document, dict):
        raise UserError(f"{what} {path} is not a JSON object (it holds a {type(document).__name__})")
    return document


def optional_int(document: dict, keys: tuple[str, ...], path: Path, *, minimum: int = 1) -> int | None:
    """The integer at ``document[keys[0]][keys[1]]...``, None when a key is absent or its value null.

    Raises:
        UserError: the value is present but not an integer of at least ``minimum``.
    """
    value: object = document
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{path}: {'.'.join(keys)} must be an integer of at least {minimum}, got {value!r}")
    return value
