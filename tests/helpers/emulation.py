"""Independent NumPy emulations of the quantizers, the rotation and the KL metric, written without the package's
own code so that the tests compare against something other than the code under test."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from accullm_export.graph.layer_plan import LayerPlan


def np_symmetric_scales(weight: np.ndarray, bits: int, block: int | None) -> np.ndarray:
    """Independent emulation's scale of every row [in, out]: absmax / qmax per (block, column), 1 where that is 0;
    blocked scales are stored in FP16, so they are rounded to FP16 values."""
    limit = 2 ** (bits - 1) - 1
    scales = np.empty_like(weight, dtype=np.float32)
    step = weight.shape[0] if block is None else block
    for start in range(0, weight.shape[0], step):
        scale = np.abs(weight[start:start + step].astype(np.float32)).max(axis=0) / np.float32(limit)
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        if block is not None:
            scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)
        scales[start:start + step] = scale
    return scales


def np_round_symmetric(weight: np.ndarray, bits: int, block: int | None) -> np.ndarray:
    """Independent emulation: absmax scales per (block, column), round half to even, clip, dequantize."""
    limit = 2 ** (bits - 1) - 1
    scales = np_symmetric_scales(weight, bits, block)
    return np.clip(np.rint(weight.astype(np.float32) / scales), -limit, limit) * scales


def np_asymmetric_parts(weight: np.ndarray, block: int, low_ratio: float = 1.0, high_ratio: float = 1.0):
    """Independent emulation, one block at a time: the block's [min(w, 0), max(w, 0)] (each end shrunk by its
    ratio) onto 0..15, the scale rounded to FP16 first, zero point round(-low / s) in [0, 15], each weight
    rounded half to even and clipped to [0, 15]. Returns (v = q - z, scales [blocks, out], zero points)."""
    values = np.empty(weight.shape, dtype=np.float32)
    scales, zeros = [], []
    for start in range(0, weight.shape[0], block):
        chunk = weight[start:start + block].astype(np.float32)
        low = np.minimum(chunk.min(axis=0), 0) * np.float32(low_ratio)
        high = np.maximum(chunk.max(axis=0), 0) * np.float32(high_ratio)
        span = high - low
        scale = np.where(span == 0, np.float32(1), span / np.float32(15))
        scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)
        zero = np.clip(np.rint(-low / scale), 0, 15)
        values[start:start + block] = np.clip(np.rint(chunk / scale) + zero, 0, 15) - zero
        scales.append(scale)
        zeros.append(zero)
    return values, np.stack(scales), np.stack(zeros).astype(np.uint8)


def np_round_asymmetric(weight: np.ndarray, block: int, low_ratio: float = 1.0, high_ratio: float = 1.0):
    """``np_asymmetric_parts`` dequantized: (the weight it gives, zero points)."""
    values, scales, zeros = np_asymmetric_parts(weight, block, low_ratio, high_ratio)
    return values * np.repeat(scales, block, axis=0)[:weight.shape[0]], zeros


def emulate_weight(weight: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """emulate(weight, plan) for builds_equal_emulation: symmetric rounding of the rest, FP16 outlier rows."""
    if plan.precision == "fp32":
        return weight
    if plan.precision == "fp16":
        return weight.astype(np.float16).astype(np.float32)
    rest = weight.copy()
    rest[list(plan.outliers)] = 0
    out = np_round_symmetric(rest, plan.bits, plan.block_size)
    out[list(plan.outliers)] = weight[list(plan.outliers)].astype(np.float16).astype(np.float32)
    return out


def np_hadamard(size: int) -> np.ndarray:
    """Sylvester's construction, entry by entry: H[i, j] = (-1)^popcount(i & j) / sqrt(size)."""
    index = np.arange(size)
    parity = np.vectorize(lambda value: bin(value).count("1") % 2)(index[:, None] & index[None, :])
    return (1.0 - 2.0 * parity) / np.sqrt(size)


def rotation_signs(folder, layer: str) -> np.ndarray:
    """The signs the rotation in front of ``layer`` (possibly shared with the other readers of its input)
    multiplies by, read from the file."""
    model = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    node = next(node for node in model.graph.node if node.name == layer)
    tensor = node.input[0]
    while producers[tensor].op_type != "Mul":  # Reshape <- MatMul <- Reshape <- Mul(x, signs)
        tensor = producers[tensor].input[0]
    return numpy_helper.to_array(initializers[producers[tensor].input[1]])


def emulate_rotated(folder):
    """emulate(weight, plan) for builds_equal_emulation: the rotated rest rounded, rotated back, FP16 rows."""

    def emulate(weight, plan):
        outliers = list(plan.outliers)
        rest = weight.astype(np.float64).copy()
        rest[outliers] = 0
        if not plan.rotation:
            out = np_round_symmetric(rest.astype(np.float32), plan.bits, plan.block_size)
        else:
            signs = rotation_signs(folder, plan.node).astype(np.float64)
            rotation = np.zeros((weight.shape[0], weight.shape[0]))
            for start in range(0, weight.shape[0], plan.rotation):
                block = slice(start, start + plan.rotation)
                rotation[block, block] = np_hadamard(plan.rotation)
            rotation *= signs[:, None]
            rounded = np_round_symmetric((rotation.T @ rest).astype(np.float32), plan.bits, plan.block_size)
            out = (rotation @ rounded.astype(np.float64)).astype(np.float32)
        out[outliers] = weight[outliers].astype(np.float16).astype(np.float32)
        return out

    return emulate


def hand_kl(ref_logits, cand_logits):
    """KL(ref || cand) per position with an explicit softmax (no log-softmax shortcut)."""
    out = []
    for r, c in zip(ref_logits.astype(np.float64), cand_logits.astype(np.float64)):
        p = np.exp(r - r.max()) / np.exp(r - r.max()).sum()
        q = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
        out.append(float(np.sum(p * np.log(p / q))))
    return np.array(out)


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL over the positions of one sequence's logits [1, seq, vocab]."""
    return float(hand_kl(reference[0], candidate[0]).mean())
