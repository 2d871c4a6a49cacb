"""Loading ONNX files with clear errors for missing, truncated or foreign files."""

from __future__ import annotations

from pathlib import Path

import onnx

from accullm_export.errors import UserError


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
    _check_external_data(model, path.parent)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} is not a valid ONNX model (truncated or corrupt: {first})") from None
    if load_external_data:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        data_path = base / location
        if location not in sizes:
            if not data_path.is_file():
                raise UserError(f"external data file {data_path} (for {tensor.name}) is missing")
            sizes[location] = data_path.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            raise UserError(f"external data file {data_path} is truncated: {tensor.name} ends at byte {end}, "
                            f"the file has {sizes[location]}")
