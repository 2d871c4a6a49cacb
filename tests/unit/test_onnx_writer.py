"""The export's streaming pieces: OnnxWriter converts and writes large initializers block by block, and
SafetensorsCheckpoint maps each tensor only while an array views it."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from accullm_export.models import onnx_writer
from accullm_export.models.onnx_writer import OnnxWriter, save_model
from accullm_export.models.safetensors_io import SafetensorsCheckpoint


def _write_model(tmp_path: Path, tensors: dict[str, tuple[np.ndarray, np.dtype | None]]) -> Path:
    with open(tmp_path / "model.onnx.data", "wb") as data_file:
        writer = OnnxWriter(data_file, "model.onnx.data")
        names = [writer.initializer(name, array, dtype) for name, (array, dtype) in tensors.items()]
    writer.node("Identity", [names[0]], "/identity")
    output = helper.make_tensor_value_info("/identity/output_0", onnx.TensorProto.FLOAT, [300, 37])
    save_model(writer, [], [output], tmp_path / "model.onnx", 21, producer="test", metadata={})
    return tmp_path / "model.onnx"


def test_streamed_initializers_hold_the_bytes_onnx_would_save(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_writer, "_BLOCK_BYTES", 1000)  # several blocks per tensor, the last one short
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((37, 300)).astype(np.float32)
    bf16 = rng.standard_normal((300, 41)).astype(ml_dtypes.bfloat16)
    wide = rng.standard_normal((29, 50))  # float64: rounded once to fp32, then to fp16
    tensors = {"transposed": (weight.T, np.float32), "transposed_fp16": (weight.T, np.float16),
               "bf16_fp16": (bf16, np.float16), "fp64_fp16": (wide, np.float16), "as_is": (weight, None),
               "small": (weight[:2, :3], np.float16)}
    expected = {"transposed": weight.T.copy(), "transposed_fp16": weight.T.astype(np.float16),
                "bf16_fp16": bf16.astype(np.float32).astype(np.float16),
                "fp64_fp16": wide.astype(np.float32).astype(np.float16), "as_is": weight,
                "small": weight[:2, :3].astype(np.float16)}
    path = _write_model(tmp_path, tensors)

    model = onnx.load(str(path), load_external_data=False)
    data = (tmp_path / "model.onnx.data").read_bytes()
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    for name, reference in expected.items():
        tensor = stored[name]
        assert list(tensor.dims) == list(reference.shape), name
        assert tensor.data_type == helper.np_dtype_to_tensor_dtype(reference.dtype), name
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            offset, length = int(entries["offset"]), int(entries["length"])
            assert offset % 4096 == 0, name
            raw = data[offset:offset + length]
        else:
            raw = tensor.raw_data
        assert raw == numpy_helper.from_array(reference).raw_data, name
    assert stored["small"].data_location != onnx.TensorProto.EXTERNAL
    onnx.checker.check_model(str(path))


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _mappings_of(path: Path) -> int:
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path)))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="counting memory maps needs Linux's /proc")
def test_a_checkpoint_tensor_is_mapped_only_while_an_array_views_it(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((64, 300)).astype(np.float32), "empty": np.zeros((0, 4), np.float32),
               "b": rng.standard_normal((5,)).astype(np.float32)}
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, tensors)
    checkpoint = SafetensorsCheckpoint(tmp_path)
    for name, reference in tensors.items():
        array = checkpoint[name]
        np.testing.assert_array_equal(array, reference)
        assert not array.flags.writeable, name
    del array
    gc.collect()
    assert _mappings_of(path) == 0

    view = checkpoint["a"].T[::2]  # a view keeps the map alive; dropping it releases it
    assert _mappings_of(path) == 1
    np.testing.assert_array_equal(view, tensors["a"].T[::2])
    del view
    gc.collect()
    assert _mappings_of(path) == 0
