"""Read intermediate tensors of an ONNX model by marking a few of them as outputs at a time.

Marking every tensor at once runs out of memory on real models, so callers ask for small groups. ONNX
Runtime refuses external data outside the model's folder (symlinks included), so a model under 2 GB is
handed over serialized in memory; a larger one is written as a hidden temporary file beside the original,
whose external data it then shares, and removed as soon as its session exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from accullm_export.runtime.session import create_session

_PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights below which the model is passed in memory


class IntermediateReader:
    """Runs one model with extra outputs; the graph proto (without weights) is loaded once."""

    def __init__(self, model_path: str | Path, optimization: str = "basic"):
        path = Path(model_path)
        self.model_path = path / "model.onnx" if path.is_dir() else path
        self.optimization = optimization
        self.model = onnx.load(str(self.model_path), load_external_data=False)
        self.nodes_by_output = {out: node for node in self.model.graph.node for out in node.output}
        external = sum(int(entry.value) for tensor in self.model.graph.initializer
                       for entry in tensor.external_data if entry.key == "length")
        self._in_memory = external < _PROTOBUF_LIMIT
        if self._in_memory:
            onnx.load_external_data_for_model(self.model, str(self.model_path.parent))

    def tensor_names(self) -> list[str]:
        """Every node output, in the graph's (topological) order."""
        return [out for node in self.model.graph.node for out in node.output if out]

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Values of ``names`` for one input feed."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        existing = {output.name for output in model.graph.output}
        for name in names:
            if name not in existing:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
        session = self._session(model)
        inputs = {i.name for i in session.get_inputs()}
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        return dict(zip(names, values))

    def _session(self, model: onnx.ModelProto):
        if self._in_memory:
            return create_session(model.SerializeToString(), device="cpu", optimization=self.optimization)
        handle, temporary = tempfile.mkstemp(prefix=".accullm-intermediates-", suffix=".onnx",
                                             dir=self.model_path.parent)
        os.close(handle)
        try:
            onnx.save_model(model, temporary)
            return create_session(temporary, device="cpu", optimization=self.optimization)
        finally:
            os.unlink(temporary)

    def precision_of(self, tensor: str) -> str:
        """The precision a node runs in: its quantized weights' dtype, else its weight's or its output's dtype."""
        node = self.nodes_by_output.get(tensor)
        if node is None:
            return "unknown"
        initializers = {t.name: t for t in self.model.graph.initializer}
        for name in node.input:
            producer = self.nodes_by_output.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
                dtype = helper.tensor_dtype_to_np_dtype(initializers[producer.input[0]].data_type)
                return f"{dtype.name} weights (DequantizeLinear)"
            if name in initializers and node.op_type in ("MatMul", "Gemm", "Conv", "Mul", "Add"):
                return helper.tensor_dtype_to_np_dtype(initializers[name].data_type).name
        if node.op_type in ("MatMulNBits",):
            return f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)} weights (MatMulNBits)"
        return "float32 (activations)" if node.op_type != "Cast" else "cast"
