"""Loading ONNX files with clear errors for missing, truncated or foreign files."""

from __future__ import annotations

from pathlib import Path

import onnx

from accullm_export.errors import UserError
from accullm_export.safe_paths import inside


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (a file, or an exported folder's model.onnx) and check it.

    Raises:
        UserError: missing, not ONNX, truncated, or external data that is missing or too short.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not a valid ONNX model (truncated or not ONNX: {type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path} is not a valid ONNX model (it parses to an empty graph)")
    _check_external_data(model, path.parent, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} is not a valid ONNX model (truncated or corrupt: {first})") from None
    if load_external_data:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def external_data_files(model: onnx.ModelProto, base: Path, named_by: Path | None = None) -> dict[str, Path]:
    """Every external-data location of ``model`` (initializers and tensors in attributes, subgraphs included),
    checked to name a regular file inside ``base`` before anything reads it: location -> resolved path.

    Raises:
        UserError: a location that is absolute, climbs out with ``..``, is a symlink leaving ``base``, is missing,
            or is not a regular file (a device, FIFO or socket).
    """
    files: dict[str, Path] = {}
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if location not in files:
            files[location] = inside(base, location, named_by=named_by or base,
                                     what=f"external data of tensor {tensor.name!r} at")
    return files


def all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_tensors(subgraph)


def _check_external_data(model: onnx.ModelProto, base: Path, named_by: Path) -> None:
    files = external_data_files(model, base, named_by)
    sizes = {location: path.stat().st_size for location, path in files.items()}
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise UserError(f"{named_by}: external data of tensor {tensor.name!r} has a non-integer offset or "
                            "length") from None
        if end > sizes[location]:
            raise UserError(f"external data file {files[location]} is truncated: {tensor.name} ends at byte {end}, "
                            f"the file has {sizes[location]}")
