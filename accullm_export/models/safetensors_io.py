"""A small, memory-mapped reader of ``.safetensors`` checkpoints that needs neither torch nor safetensors.

Tensors are NumPy views into memory maps, one per tensor read, so exporting reads each weight once and never holds a
second copy of the checkpoint. BF16 and FP8 tensors are exposed through ml_dtypes.
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
        for path in files:
            for name, entry in _read_header(path).items():
                self._index[name] = (path, *entry)

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a read-only array over its own memory map, unmapped once the last view of it is dropped:
        one map of the whole file would keep every weight read so far resident until the export ends."""
        path, dtype, shape, begin, end = self._index[name]
        if begin == end:  # mmap refuses an empty range
            empty = np.empty(shape, dtype=_DTYPES[dtype])
            empty.flags.writeable = False
            return empty
        return np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=begin, shape=tuple(shape))

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _read_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """Parse one file's JSON header into name -> (dtype, shape, absolute begin, absolute end), every entry checked
    against the file: a known dtype, a shape of non-negative integers, and offsets that stay in the file and hold
    exactly that shape's bytes.

    Raises:
        UserError: naming the file (and the tensor) and what is wrong.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} out of range for a file of {size} bytes")
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info, size - data_start)
        entries[name] = (dtype, shape, data_start + begin, data_start + end)
    return entries


def _entry(path: Path, name: str, info, data_size: int) -> tuple[str, list[int], int, int]:
    """One header entry, checked: (dtype, shape, begin, end) relative to the data section."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: tensor {name} has a header entry that is not a JSON object")
    if info.get("dtype") not in _DTYPES:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise UserError(f"{path}: tensor {name} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{path}: tensor {name} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
    expected = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if end - begin != expected:
        raise UserError(f"{path}: tensor {name} spans {end - begin} bytes, but {info['dtype']} {shape} needs "
                        f"{expected}")
    return info["dtype"], shape, begin, end
