"""A small, memory-mapped reader of ``.safetensors`` checkpoints that needs neither torch nor safetensors.

Tensors are NumPy views into a memory map, so exporting reads each weight once and never holds a second
copy of the checkpoint. BF16 and FP8 tensors are exposed through ml_dtypes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from accullm_export.errors import UserError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """All tensors of a checkpoint folder (one file or shards), by name, as read-only memory-mapped arrays."""

    def __init__(self, folder: Path):
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no .safetensors weights")
        self._index: dict[str, tuple[Path, str, list[int], int, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for path in files:
            for name, entry in _read_header(path).items():
                self._index[name] = (path, *entry)

    def __getitem__(self, name: str) -> np.ndarray:
        path, dtype, shape, begin, end = self._index[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        raw = self._maps[path][begin:end]
        return raw.view(_DTYPES[dtype]).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _read_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """Parse one file's JSON header into name -> (dtype, shape, absolute begin, absolute end)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid safetensors file ({exc})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
        entries[name] = (info["dtype"], list(info["shape"]), data_start + begin, data_start + end)
    return entries
