"""A minimal ONNX graph writer that streams large initializers straight into an external-data file.

The exporter never holds the whole model twice: each weight is converted, appended to ``model.onnx.data``
and dropped, and the TensorProto only records its offset and length.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGNMENT = 4096  # page-aligned offsets let ONNX Runtime memory-map the weights
_INLINE_LIMIT = 1024  # tensors smaller than this many bytes stay inside model.onnx
_BLOCK_BYTES = 32 << 20  # a large initializer is converted and written this many bytes at a time


class OnnxWriter:
    """Collects nodes and initializers; names every node output ``<node name>/output_<k>``."""

    def __init__(self, data_file: BinaryIO, data_location: str):
        self._data_file = data_file
        self._data_location = data_location
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._constants: dict[tuple, str] = {}

    def initializer(self, name: str, array: np.ndarray, dtype: np.dtype | None = None) -> str:
        """Add a named initializer holding ``array`` as ``dtype`` (default: its own); large ones are appended to the
        external-data file.

        ``array`` may be any view, such as a transposed memory map: it is converted and written in blocks of rows,
        so a large weight is never copied whole.
        """
        self._claim(name)
        dtype = np.dtype(array.dtype if dtype is None else dtype)
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < _INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(_converted(array, dtype), name))
            return name
        padding = -self._offset % _ALIGNMENT
        self._data_file.write(b"\0" * padding)
        self._offset += padding
        row_bytes = nbytes // array.shape[0]
        rows_per_block = max(1, _BLOCK_BYTES // max(1, row_bytes))
        for start in range(0, array.shape[0], rows_per_block):
            block = _converted(array[start:start + rows_per_block], dtype)
            self._data_file.write(block.reshape(-1).view(np.uint8).data)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                             dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self._data_location), ("offset", str(self._offset)),
                           ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += nbytes
        self.initializers.append(tensor)
        return name

    def constant(self, value: np.ndarray | Sequence[int] | float, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars), deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            text = "_".join(str(v) for v in array.ravel()[:8]) or "empty"
            name = f"/model/constants/{array.dtype.name}/{list(array.shape)}/{text}"
            self._constants[key] = self.initializer(name, array)
        return self._constants[key]

    def node(self, op_type: str, inputs: Sequence[str], name: str, output_count: int = 1,
             outputs: Sequence[str] | None = None, **attributes) -> str | list[str]:
        """Add a node; returns its output name (or the list of names when output_count > 1)."""
        self._claim(name)
        if outputs is None:
            outputs = [f"{name}/output_{k}" for k in range(output_count)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attributes))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r} in the exported graph")
        self._names.add(name)


def _converted(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as a C-contiguous array of ``dtype`` (no copy when it already is one). Other dtypes (bf16, fp8,
    fp64) become fp32 first, so a fp16 export rounds from fp32 whatever the checkpoint's dtype, as it always has."""
    if dtype.kind != "f" or array.dtype in (dtype, np.float32, np.float16):
        return np.ascontiguousarray(array, dtype=dtype)
    return np.ascontiguousarray(array, dtype=np.float32).astype(dtype, copy=False)


def save_model(writer: OnnxWriter, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               path: Path, opset: int, producer: str, metadata: dict[str, str]) -> onnx.ModelProto:
    """Assemble the graph and write ``path`` (weights are already in the external-data file)."""
    graph = helper.make_graph(writer.nodes, "accullm_decoder", inputs, outputs, writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 10  # onnx >= 1.23 writes 14, which ONNX Runtime rejects
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    return model
