"""The TensorRT engine step (TensorRT 10/11 Python API), for machines where TensorRT and a GPU are present.

TensorRT cannot be installed on the machines this kit is developed on: this module is written against the
real API (``tensorrt`` is imported only inside these functions) and ``tensorrt_available`` tells the build
pipeline to write a deployment bundle instead. Engines are written atomically beside a manifest that records
the TensorRT version and the device (:mod:`accullm_export.runtime.engine_file`), so a foreign or corrupted
engine is refused with a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from accullm_export.atomic import atomic_write_bytes, atomic_write_text
from accullm_export.errors import BackendError, UserError
from accullm_export.runtime.engine_file import ENGINE_RECORD, engine_record
from accullm_export.runtime.speculative import MAX_DRAFT_TOKENS

log = logging.getLogger(__name__)

ENGINE_FILE, TIMING_CACHE = "model.engine", "timing.cache"


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when ``tensorrt`` imports and a CUDA device is visible, else (False, why not)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 -- any import failure (stub wheel, missing libnvinfer) means "absent"
        return False, f"the tensorrt module does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        import ctypes

        cudart = ctypes.CDLL("libcudart.so")
        count = ctypes.c_int(0)
        if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            return False, "no CUDA device is visible"
    except OSError:
        return False, "the CUDA runtime (libcudart.so) is not found"
    return True, trt.__version__


# tokens one pass with a KV cache may take: a golden verifier's pass over the most draft tokens it can be given
VERIFY_TOKENS = MAX_DRAFT_TOKENS + 1


def shape_profiles(model_path: Path, max_batch: int, max_seq_len: int) -> list[dict[str, tuple]]:
    """Two optimization profiles for an exported decoder: prefill (many tokens, empty cache) and decode (one
    token, a growing cache, tuned for one token but taking up to ``VERIFY_TOKENS``: golden mode's verifier checks
    a draft's tokens in one pass on its cache). Each maps an input name to (min, opt, max) shapes."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    past = [value for value in graph.input if value.name.startswith("past_key_values.")]
    if not past:
        raise UserError(f"{model_path} has no KV-cache inputs: engine profiles are built for exported decoders")
    dims = past[0].type.tensor_type.shape.dim
    heads, head_dim = dims[1].dim_value, dims[3].dim_value
    half = max_seq_len // 2

    def shapes(batch, seq, cache):
        out = {"input_ids": tuple((b, s) for b, s in zip(batch, seq)),
               "position_ids": tuple((b, s) for b, s in zip(batch, seq)),
               "attention_mask": tuple((b, c + s) for b, s, c in zip(batch, seq, cache))}
        for value in past:
            out[value.name] = tuple((b, heads, c, head_dim) for b, c in zip(batch, cache))
        names = {value.name for value in graph.input}
        return {name: value for name, value in out.items() if name in names}

    prefill = shapes((1, 1, max_batch), (1, half, max_seq_len), (0, 0, 0))
    decode = shapes((1, 1, max_batch), (1, 1, VERIFY_TOKENS), (0, half, max_seq_len - 1))
    return [prefill, decode]


def build_engine(model_dir: Path, staging: Path, target, recipe: str, options, is_llm: bool,
                 plugin_library: Path | None = None) -> dict:
    """Build ``model.engine`` (+ ``timing.cache``) into ``staging`` with the TensorRT Python API."""
    import tensorrt as trt

    model_path = model_dir / "model.onnx"
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    if plugin_library is not None:
        builder.get_plugin_registry().load_library(str(plugin_library))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected {model_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if recipe == "w8a8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ: the scales come from the graph
    if is_llm:
        for shapes in shape_profiles(model_path, options.max_batch, options.max_seq_len):
            profile = builder.create_optimization_profile()
            for name, (low, best, high) in shapes.items():
                profile.set_shape(name, low, best, high)
            config.add_optimization_profile(profile)
    cache_path = staging / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {model_path} (see its log above)")
    engine_bytes = bytes(serialized)
    atomic_write_bytes(staging / ENGINE_FILE, engine_bytes)
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    from accullm_export.build.quantize import copy_side_files

    copy_side_files(model_dir, staging)  # the tokenizer beside the engine, for `generate` and the samples
    record = engine_record(engine_bytes, trt.__version__, target, plugin_library)
    atomic_write_text(staging / ENGINE_RECORD, json.dumps(record, indent=2))
    return {"kind": "tensorrt-engine", "path": ENGINE_FILE, **record}
