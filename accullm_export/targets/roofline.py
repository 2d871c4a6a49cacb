"""The batch-1 decode roofline: weight bytes one decode step reads, and the memory bandwidth that reads them.

A target's decode ceiling is bytes per token / bandwidth (``TargetProfile.decode_ceiling``). GPU targets carry
their vendor bandwidth; the CPU target has none, so it is measured on the machine that builds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from accullm_export.quant.storage import storage_bytes

GATHER_OPS = ("Gather", "GatherBlockQuantized")  # a decode step reads one row of the tables these index


def bytes_per_token(model_path: Path) -> int:
    """Weight bytes one decode step reads: every initializer, but only one row of an embedding table.

    Args:
        model_path: An ONNX file, or a model folder holding ``model.onnx``.
    """
    path = model_path / "model.onnx" if model_path.is_dir() else model_path
    model = onnx.load(str(path), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node if node.op_type in GATHER_OPS}
    total = 0
    for tensor in model.graph.initializer:
        size = storage_bytes(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), int(np.prod(tensor.dims)))
        if tensor.name in gathered and len(tensor.dims) == 2:
            size //= max(tensor.dims[0], 1)  # one row per token
        total += size
    return total


def measure_cpu_bandwidth(megabytes: int = 256) -> float:
    """GB/s of a large copy on this machine (read + write), the CPU target's roofline.

    The best of three copies: the others pay for page faults and whatever else shares the machine.
    """
    source = np.ones(megabytes << 18, dtype=np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9
