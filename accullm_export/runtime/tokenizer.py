"""Tokenizer of an exported folder (its tokenizer.json), with incremental decoding for streaming."""

from __future__ import annotations

from pathlib import Path

from accullm_export.data.json_files import read_json_object
from accullm_export.errors import UserError


class FolderTokenizer:
    """Wraps the ``tokenizers`` library; special-token ids come from the folder's configs."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{folder} has no tokenizer.json; export the model with its tokenizer")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for every malformed file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path} is not a readable tokenizer ({reason})") from None
        self.eos_token_ids = _eos_ids(folder)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns a growing token list into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: FolderTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self._emitted = text[len(self._emitted):], text
        return piece


def _eos_ids(folder: Path) -> list[int]:
    for name, keys in (("genai_config.json", ("model", "eos_token_id")), ("config.json", ("eos_token_id",))):
        path = folder / name
        if path.is_file():
            value: object = read_json_object(path)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                ids = value if isinstance(value, list) else [value]
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
                    raise UserError(f"{path}: {'.'.join(keys)} must be a token id or a list of them, got {value!r}")
                return list(ids)
    return []
