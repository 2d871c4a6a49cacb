"""TensorRT engine files on disk: the record that identifies an engine, its checks, and deserializing it.

``build`` writes an engine with :func:`engine_record` beside it (``engine.json``); ``validate`` and the TensorRT
runner refuse a missing, corrupted or foreign engine with :func:`check_engine_file` before TensorRT sees it.
``tensorrt`` is imported only inside :func:`load_engine`, so checking a file needs nothing beyond the core.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accullm_export.errors import BackendError, UserError

ENGINE_RECORD = "engine.json"  # written beside every engine this kit builds
INSTALL_HINT = "install TensorRT 10+ for your CUDA (pip install tensorrt, or JetPack 6 on Jetson)"


def engine_record(engine_bytes: bytes, trt_version: str, target, plugin_library: Path | None) -> dict:
    """What identifies an engine: its hash, the TensorRT version and the target it was built for.

    Args:
        engine_bytes: The serialized engine.
        trt_version: The TensorRT version that built it.
        target: The ``TargetProfile`` it was built for.
        plugin_library: The plugin library the engine needs, if any.

    Returns:
        The JSON-ready record to write as ``engine.json`` beside the engine.
    """
    return {"sha256": hashlib.sha256(engine_bytes).hexdigest(), "tensorrt": trt_version, "target": target.name,
            "compute_capability": target.compute_capability,
            "plugin_library": str(plugin_library) if plugin_library else None}


def check_engine_file(path: Path) -> dict:
    """Refuse a missing, corrupted or foreign engine before TensorRT sees it; returns its record.

    An engine built by this kit sits beside ``engine.json``; its SHA-256 must match (a truncated or edited file
    does not), and TensorRT must be the version that built it (engines do not move between versions).

    Raises:
        UserError: The file is missing, has no record, or does not match its record.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such engine file")
    record_path = path.parent / ENGINE_RECORD
    if not record_path.is_file():
        raise UserError(f"{path} was not built by accullm-export (no {ENGINE_RECORD} beside it); build it with "
                        "`accullm-export build --target ...` or pass the ONNX model instead")
    record = json.loads(record_path.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record.get("sha256"):
        raise UserError(f"{path} is corrupted or is not the engine {ENGINE_RECORD} describes (SHA-256 "
                        f"{digest[:12]}... != {str(record.get('sha256'))[:12]}...); rebuild it")
    return record


def load_engine(path: Path, plugin_library: Path | None = None):
    """Deserialize a checked engine.

    Raises:
        BackendError: TensorRT does not import.
        UserError: The engine is foreign (another TensorRT version, device or plugin library) or corrupted.
    """
    record = check_engine_file(path)
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 -- any import failure (stub wheel, missing libnvinfer) means "absent"
        raise BackendError(f"running {path} needs TensorRT: {INSTALL_HINT} ({type(exc).__name__})") from None
    if record.get("tensorrt") != trt.__version__:
        raise UserError(f"{path} was built with TensorRT {record.get('tensorrt')}; this is TensorRT "
                        f"{trt.__version__}: engines do not move between versions, rebuild it here")
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = False  # an engine file is data: host code embedded in one is never run
    if plugin_library is not None:
        runtime.get_plugin_registry().load_library(str(plugin_library))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not deserialize {path} (built for another device or plugin library?)")
    return engine
