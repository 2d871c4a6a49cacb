"""ONNX Runtime sessions with the kit's error handling and execution-provider choice."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from accullm_export.errors import BackendError, UserError

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def create_session(model_path: str | Path | bytes, *, device: str = "auto", optimization: str = "all",
                   threads: int | None = None, profile_prefix: str | None = None,
                   external_data_folder: str | Path | None = None,
                   shared_initializers: Mapping[str, np.ndarray] | None = None,
                   config_entries: Mapping[str, str] | None = None, prepack: bool = True,
                   memory_pattern: bool = True):
    """An InferenceSession on CPU or CUDA.

    Args:
        model_path: the .onnx file (external data beside it), or a serialized model (its external data, if any, in
            ``external_data_folder``).
        device: "cpu", "cuda" or "auto" (CUDA when onnxruntime-gpu and a GPU are present).
        optimization: graph optimization level; "basic" keeps numerics exact (no MatMulNBits fusion).
        threads: intra-op threads; None lets ONNX Runtime choose.
        profile_prefix: write ONNX Runtime's per-node profile (JSON) to files starting with this; the session's
            ``end_profiling()`` returns the file's name.
        external_data_folder: where a serialized model's external data lives (ONNX Runtime still refuses
            locations that leave it); nothing is written anywhere.
        shared_initializers: arrays (C-contiguous, of the initializers' names, shapes and types) that the
            session uses in place of those initializers, without a copy: a process that already holds the
            weights does not load them twice. Weight prepacking is then off (it would copy them again).
        config_entries: ONNX Runtime session configuration entries (key -> value).
        prepack: let ONNX Runtime keep prepacked copies of MatMul weights (off with ``shared_initializers``).
            Without them, weights in external data stay in the file's mapped pages.
        memory_pattern: let ONNX Runtime plan each input shape's buffers as one block, which its memory arena keeps
            beside the blocks of the runs before (off: each buffer is taken from the arena as the run goes).

    Raises:
        UserError: the file is not a loadable model, or the option values are unknown.
        BackendError: CUDA was asked for but is not available.
    """
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise UserError(f"unknown optimization level {optimization!r}; choose from {', '.join(OPTIMIZATION_LEVELS)}")
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise BackendError("CUDA execution provider not available: install onnxruntime-gpu "
                           "(pip install 'accullm-export[gpu]') on a machine with an NVIDIA GPU")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")
    use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(external_data_folder).resolve()))
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    options.enable_mem_pattern = memory_pattern
    if shared_initializers or not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    shared = {}
    if shared_initializers:
        for name, array in shared_initializers.items():
            shared[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            options.add_initializer(name, shared[name])
    path = "<in-memory model>" if isinstance(model_path, bytes) else Path(model_path)
    if isinstance(path, Path) and not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        source = model_path if isinstance(model_path, bytes) else str(path)
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot load {path}: {message}") from None
    session.shared_initializers = shared  # the buffers must outlive the session
    log.debug("session for %s on %s", path, session.get_providers()[0])
    return session
