"""onnx-graphsurgeon IR: load a model into a ``gs.Graph``, make constants, save with external data.

int4 constants are built as ONNX TensorProtos (packed two values per byte by ``onnx.numpy_helper``) and handed
to graphsurgeon as lazy values, which it exports unchanged; its own exporter would store one byte per value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from accullm_export.errors import UserError
from accullm_export.graph.io import all_tensors, external_data_files, load_onnx
from accullm_export.quant.storage import storage_bytes

IR_VERSION = 10  # onnx >= 1.23 writes 14, which ONNX Runtime rejects
DATA_FILE = "model.onnx.data"
_INLINE_LIMIT = 1024  # bytes; smaller constants stay inside model.onnx


# external initializers load_graph reads straight into the graph's arrays: the float weights the passes read
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}


def load_graph(path: str | Path) -> tuple[gs.Graph, onnx.ModelProto]:
    """The graph (weights loaded) and the original model proto, for its opsets and metadata only.

    Float weights in external data are read from the file straight into the graph's arrays, never into the
    proto as well, so the weights are held once; other external tensors (integers, packed INT4) are loaded
    into the proto, from which the graph reads them when asked.
    """
    path = Path(path)
    path = path / "model.onnx" if path.is_dir() else path
    model = load_onnx(path, load_external_data=False)
    files = external_data_files(model, path.parent, path)
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type in _FLOAT_TYPES:
            arrays[tensor.name] = _read_external(tensor, files)
    for tensor in all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name not in arrays:
            _load_inline(tensor, path.parent)
    graph = gs.import_onnx(model)
    for name, tensor in graph.tensors().items():
        if name in arrays and isinstance(tensor, gs.Constant):
            tensor.values = arrays.pop(name)
    return graph, model


def _read_external(tensor: onnx.TensorProto, files: dict[str, Path]) -> np.ndarray:
    """A float tensor's external bytes as an array of its shape, read with one copy (load_onnx has checked
    that the file holds them)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(_FLOAT_TYPES[tensor.data_type])
    count = int(np.prod(tensor.dims, dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize))
    if length != count * dtype.itemsize:
        raise UserError(f"external data of tensor {tensor.name!r} holds {length} bytes, its shape "
                        f"{list(tensor.dims)} needs {count * dtype.itemsize}")
    values = np.fromfile(files[info["location"]], dtype=dtype.newbyteorder("<"), count=count,
                         offset=int(info.get("offset", 0)))
    return values.astype(dtype, copy=False).reshape(tuple(tensor.dims))


def initializer_array(tensor: onnx.TensorProto, files: dict[str, Path], base: Path) -> np.ndarray:
    """One initializer of a model loaded without its external data (``files``: ``external_data_files``' map,
    ``base``: the folder its locations are relative to), read on its own: a float tensor straight from its file,
    any other from its bytes, so a model's weights can be visited one at a time without the proto holding them."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if tensor.data_type in _FLOAT_TYPES:
        return _read_external(tensor, files)
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    _load_inline(loaded, base)
    return numpy_helper.to_array(loaded)


def _load_inline(tensor: onnx.TensorProto, base: Path) -> None:
    """Move an external tensor's bytes (located relative to ``base``) into the tensor itself."""
    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def constant(name: str, values: np.ndarray) -> gs.Constant:
    """A graphsurgeon constant; int4/uint4 arrays (ml_dtypes) are stored packed."""
    values = np.ascontiguousarray(values)
    if values.dtype.name in ("int4", "uint4"):
        return gs.Constant(name, gs.ir.tensor.LazyValues(numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


class LazyArray(gs.ir.tensor.LazyValues):
    """A constant's values made only when read (``make()``, of a known shape and dtype): a derived copy of a
    large weight is not held from the pass that makes the constant to the pass that reads and replaces it."""

    def __init__(self, make, shape: tuple[int, ...], dtype: np.dtype, description: str):
        # no proto behind it: LazyValues' own is unused
        self._make, self._description = make, description
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return self._make()

    @property
    def tensor(self) -> onnx.TensorProto:  # what the exporter writes for a constant still lazy at save time
        return numpy_helper.from_array(self.load())

    def __str__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, {self._description})"


class ZeroedRows(LazyArray):
    """A weight with some rows set to zero, made only when read: the zeroed copies of every layer a pass
    rewrites are not all held at once when a later pass reads and replaces each in turn."""

    def __init__(self, source: np.ndarray, rows: tuple[int, ...]):
        super().__init__(self._zeroed, source.shape, source.dtype, f"rows={len(rows)}")
        self._source, self._rows = source, list(rows)

    def _zeroed(self) -> np.ndarray:
        values = self._source.copy()
        values[self._rows] = 0
        return values


def constant_array(tensor: gs.Constant) -> np.ndarray:
    """A constant's values without caching them in the graph: reading ``.values`` of a packed int4 constant
    would replace it by an unpacked array that the exporter then writes at twice its size."""
    if isinstance(tensor._values, gs.ir.tensor.LazyValues):
        return tensor._values.load()
    return tensor.values


def stored_bytes(tensor: gs.Constant) -> int:
    """Bytes the constant takes in the file (int4 packs two values per byte)."""
    values = tensor._values if isinstance(tensor._values, gs.ir.tensor.LazyValues) else tensor.values
    return storage_bytes(np.dtype(values.dtype), int(np.prod(values.shape, dtype=np.int64)))


def save_graph(graph: gs.Graph, source: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """Write ``path`` plus ``model.onnx.data`` beside it; keeps the source's opsets and producer, except the
    default domain's version where a pass set ``graph.opset`` (a lowering to an older opset).

    ``metadata`` entries are added to (or replace) the source's metadata_props.
    """
    model = gs.export_onnx(graph.cleanup().toposort(), do_type_check=True)
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and graph.opset is not None:
            entry.version = int(graph.opset)
    known = {entry.domain or "ai.onnx" for entry in model.opset_import}
    for domain in sorted({node.domain for node in model.graph.node} - known - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # a contrib or plugin op's domain
    model.producer_name, model.producer_version = source.producer_name, source.producer_version
    merged = {entry.key: entry.value for entry in source.metadata_props} | metadata
    for key, value in merged.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=_INLINE_LIMIT)
    return model
