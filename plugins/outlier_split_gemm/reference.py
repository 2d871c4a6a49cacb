"""NumPy reference of ``accullm::OutlierSplitGemm`` (version 1): what the TensorRT plugin must compute.

Inputs (by position):
    0 x                 [..., K]  float (fp16 or fp32)
    1 weight            [K, N]    int4 (bits=4) or int8 (bits=8) values; symmetric, zero point 0
    2 scales            float16   bits=4: [ceil(K / block_size), N] (blocks along K); bits=8: [N] (per output channel)
    3 outlier_channels  [m]       int32 input channel indices
    4 outlier_weight    [m, N]    float16 rows of the original weight at those channels
Attributes: bits (4 | 8), block_size (64 | 128 for bits=4; 0 for bits=8).
Output: y [..., N] = x @ dequantize(weight) + x[..., outlier_channels] @ outlier_weight.

The low-bit weight's rows at the outlier channels are zero (``isolate_outliers`` zeroes them), so those channels
reach y through the float16 branch only; the formula above does not rely on it. Dequantization is
values * scale (the block's scale for int4, the column's for int8); the kernel accumulates in fp32.

Storage that the kernel and TensorRT see (ONNX's int4 layout): int4 [K, N] packed two values per byte, low
nibble first, row-major, element (k, n) at flat index k * N + n (``pack_int4`` / ``unpack_int4``).
"""

from __future__ import annotations

import numpy as np

OP_TYPE, DOMAIN, VERSION = "OutlierSplitGemm", "accullm", 1
BLOCK_SIZES = {4: (64, 128), 8: (0,)}


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed int4 values (any integer dtype, each in [-8, 7]) -> uint8 bytes, two per byte, low nibble first.

    The flat (row-major) order of ``values`` is kept: element i is the low nibble of byte i // 2 when i is even,
    the high nibble when odd. An odd count leaves the last high nibble 0.
    """
    flat = np.asarray(values).astype(np.int16).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes from ``pack_int4`` -> int8 values of ``shape`` (sign-extended nibbles)."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    nibbles[0::2] = packed & 0xF
    nibbles[1::2] = packed >> 4
    count = int(np.prod(shape))
    signed = nibbles[:count].astype(np.int8)
    return np.where(signed >= 8, signed - 16, signed).astype(np.int8).reshape(shape)


def dequantize(weight: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """int values [K, N] -> float64 [K, N]: each value times its block's (int4) or column's (int8) scale."""
    values = np.asarray(weight).astype(np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if bits == 4:
        if block_size <= 0:
            raise ValueError("bits=4 needs block_size > 0")
        return values * np.repeat(scales, block_size, axis=0)[: values.shape[0]]
    if bits == 8:
        if block_size != 0:
            raise ValueError("bits=8 is per output channel: block_size must be 0")
        return values * scales.reshape(1, -1)
    raise ValueError(f"bits must be 4 or 8, not {bits}")


def outlier_split_gemm(x, weight, scales, outlier_channels, outlier_weight, *, bits: int, block_size: int):
    """y for every row of x; computed in float64 and returned in x's dtype."""
    rows = np.asarray(x).reshape(-1, np.shape(x)[-1]).astype(np.float64)
    channels = np.asarray(outlier_channels, dtype=np.int64)
    branch = np.asarray(outlier_weight, dtype=np.float64).reshape(channels.size, np.shape(weight)[1])
    y = rows @ dequantize(weight, scales, bits, block_size) + rows[:, channels] @ branch
    return y.reshape(*np.shape(x)[:-1], y.shape[-1]).astype(np.asarray(x).dtype)
