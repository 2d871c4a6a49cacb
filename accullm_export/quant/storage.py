"""How many bytes quantized values take when stored: the size every manifest, summary and roofline counts."""

from __future__ import annotations

import numpy as np

FOUR_BIT_TYPES = ("int4", "uint4", "float4_e2m1fn")  # stored packed, two values per byte


def storage_bytes(dtype: np.dtype, count: int) -> int:
    """Bytes ``count`` values of ``dtype`` take in an ONNX file (4-bit types pack two per byte)."""
    bits = 4 if dtype.name in FOUR_BIT_TYPES else dtype.itemsize * 8
    return (count * bits + 7) // 8
