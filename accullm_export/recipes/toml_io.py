"""Reading recipe files (tomllib, or tomli before Python 3.11) and writing a resolved recipe back as TOML."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping

from accullm_export.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dependency pyproject.toml declares for older Pythons
    import tomli as tomllib


def read_toml(path: Path) -> dict:
    """A TOML file as nested dicts; UserError for a file that is not UTF-8 TOML."""
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid TOML file: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


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
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)  # a TOML basic string is a JSON string for the characters recipes hold
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML recipe values are finite, not {value}")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
