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

from accullm_export.graph.io import load_onnx
from accullm_export.quant.storage import storage_bytes

IR_VERSION = 10  # onnx >= 1.23 writes 14, which ONNX Runtime rejects
DATA_FILE = "model.onnx.data"
_INLINE_LIMIT = 1024  # bytes; smaller constants stay inside model.onnx


def load_graph(path: str | Path) -> tuple[gs.Graph, onnx.ModelProto]:
    """The graph (weights loaded) and the original model proto (for opsets and metadata)."""
    model = load_onnx(path, load_external_data=True)
    return gs.import_onnx(model), model


def constant(name: str, values: np.ndarray) -> gs.Constant:
    """A graphsurgeon constant; int4/uint4 arrays (ml_dtypes) are stored packed."""
    values = np.ascontiguousarray(values)
    if values.dtype.name in ("int4", "uint4"):
        return gs.Constant(name, gs.ir.tensor.LazyValues(numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


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
