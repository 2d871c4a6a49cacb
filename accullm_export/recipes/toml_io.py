"""Reading recipe files (tomllib, or tomli before Python 3.11) and writing a resolved recipe back as TOML."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Mapping

from accullm_export.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dependency pyproject.toml declares for older Pythons
    import tomli as tomllib


MAX_BYTES = 1 << 20  # a recipe is a few dozen lines; anything this large is not one


def read_toml(path: Path) -> dict:
    """A TOML file as nested dicts; UserError for a file that is not UTF-8 TOML of a recipe's size."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path} is not a recipe file: it is over {MAX_BYTES >> 20} MiB")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid TOML file: {exc}") from None
    except ValueError:  # Python's limit on the digits of an integer it reads
        raise UserError(f"{path} is not a valid TOML file: a number in it has too many digits") from None
    except RecursionError:
        raise UserError(f"{path} is not a valid TOML file: its arrays or tables nest too deeply") from None


def dump_toml(data: Mapping[str, Any]) -> str:
    """Nested dicts of scalars and lists as TOML: top-level scalars first, then one table per nested dict."""
    lines: list[str] = []
    _write_table(data, (), lines)
    return "\n".join(lines).strip() + "\n"


def _write_table(data: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]"]
    lines += [f"{_key(key)} = {_value(value)}" for key, value in scalars.items()]
    for key, value in tables.items():
        _write_table(value, path + (key,), lines)


def _key(key: str) -> str:
    return key if key.isascii() and key.replace("_", "").replace("-", "").isalnum() else _string(key)


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(text: str) -> str:
    """A TOML basic string in ASCII: what JSON writes, but DEL escaped and characters past U+FFFF as \\UXXXXXXXX
    (TOML refuses JSON's surrogate pairs)."""
    out = []
    for char in text:
        code = ord(char)
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML recipe values are finite, not {value}")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
