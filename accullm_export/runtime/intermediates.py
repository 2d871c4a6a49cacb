"""Read intermediate tensors of an ONNX model by marking a few of them as outputs at a time.

Marking every tensor at once runs out of memory on real models, so callers ask for small groups. The modified
graph (a few hundred kB, no weights) is handed to ONNX Runtime serialized in memory, with the model's folder as
the place of its external data: no temporary file is written, beside the input or anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from accullm_export.runtime.session import create_session


class IntermediateReader:
    """Runs one model with extra outputs; the graph proto (without weights) is loaded once."""

    def __init__(self, model_path: str | Path, optimization: str = "basic",
                 shared_initializers: Mapping[str, np.ndarray] | None = None, device: str = "cpu"):
        """``shared_initializers``: the model's weights as arrays the caller already holds, used by the sessions
        in place of loading them again; ``device``: "cpu" or "cuda" (``create_session``)."""
        path = Path(model_path)
        self.model_path = path / "model.onnx" if path.is_dir() else path
        self.optimization = optimization
        self.shared_initializers = shared_initializers
        self.device = device
        self.model = onnx.load(str(self.model_path), load_external_data=False)
        self.nodes_by_output = {out: node for node in self.model.graph.node for out in node.output}

    def tensor_names(self) -> list[str]:
        """Every node output, in the graph's (topological) order."""
        return [out for node in self.model.graph.node for out in node.output if out]

    def open(self, names: Sequence[str]) -> "Tap":
        """A session that returns ``names``; reuse it for many feeds (one session per group of tensors)."""
        outputs = self.model.graph.output
        original = len(outputs)
        existing = {output.name for output in outputs}
        outputs.extend(helper.make_empty_tensor_value_info(name) for name in names if name not in existing)
        try:
            session = self._session(self.model)
        finally:
            del outputs[original:]  # the graph is shared between calls: put it back as it was
        return Tap(session, list(names))

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Values of ``names`` for one input feed."""
        return self.open(names).run(feed)

    def _session(self, model: onnx.ModelProto):
        # no weight prepacking: it keeps a second copy of every MatMul weight, and a statistics pass over long
        # windows gains next to nothing from it
        return create_session(model.SerializeToString(), device=self.device, optimization=self.optimization,
                              external_data_folder=self.model_path.parent,
                              shared_initializers=self.shared_initializers, prepack=False)

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


class Tap:
    """A session with extra outputs: ``run(feed)`` returns the tapped tensors by name."""

    def __init__(self, session, names: list[str]):
        self.session, self.names = session, names

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, _feed_for(self.session, feed))))


_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _feed_for(session, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed restricted to the session's inputs, float arrays cast to each input's float type.

    Both sides get the same values even when, say, the candidate keeps its KV cache in fp16.
    """
    out = {}
    for spec in session.get_inputs():
        if spec.name not in feed:
            continue
        value = np.asarray(feed[spec.name])
        target = _ORT_FLOAT_TYPES.get(spec.type)
        out[spec.name] = value.astype(target) if target is not None and value.dtype.kind == "f" else value
    return out
