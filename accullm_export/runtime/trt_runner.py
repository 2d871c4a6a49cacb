"""The TensorRT runner: an engine built by ``accullm-export build`` (plus the accullm plugin library, when the
engine uses its ops), behind the same ``CausalLMRunner`` interface as the ONNX Runtime runner.

Device buffers are torch CUDA tensors. TensorRT and torch are imported when a runner is made; without them,
or without a GPU, a BackendError says what to install. Not exercised on the development machines (no GPU,
no TensorRT): the code follows the TensorRT 10 name-based I/O API (set_input_shape, set_tensor_address,
execute_async_v3) and the engine's two optimization profiles (0: prefill on an empty cache, 1: any pass on a
cache, up to a golden verifier's few tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from accullm_export.errors import BackendError, UserError
from accullm_export.runtime.base import CausalLMRunner, KVCache, ModelLayout, max_positions

PREFILL_PROFILE, DECODE_PROFILE = 0, 1


class TrtCausalLM(CausalLMRunner):
    """A decoder engine with a KV cache, run by TensorRT on the GPU."""

    def __init__(self, engine_path: str | Path, plugin_library: str | Path | None = None):
        from accullm_export.runtime.engine_file import load_engine
        from accullm_export.errors import require

        torch = require("torch", "export")
        if not torch.cuda.is_available():
            raise BackendError(f"running the TensorRT engine {engine_path} needs a CUDA GPU; none is visible")
        import tensorrt as trt

        self.torch, self.trt = torch, trt
        self.engine_path = Path(engine_path)
        self.folder = self.engine_path.parent
        self.engine = load_engine(self.engine_path, Path(plugin_library) if plugin_library else None)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.layout = self._layout()

    @classmethod
    def from_path(cls, path: str | Path, **options) -> "TrtCausalLM":
        path = Path(path)
        return cls(path / "model.engine" if path.is_dir() else path, **options)

    def input_names(self) -> set[str]:
        return set(self.inputs)

    def _layout(self) -> ModelLayout:
        if "past_key_values.0.key" not in self.inputs or "logits" not in self.outputs:
            raise UserError(f"{self.engine_path} is not a causal LM engine (no past_key_values.0.key / logits)")
        shape = self.engine.get_tensor_shape("past_key_values.0.key")
        layers = sum(name.startswith("past_key_values.") and name.endswith(".key") for name in self.inputs)
        dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype("past_key_values.0.key")))
        vocab = self.engine.get_tensor_shape("logits")[-1]
        return ModelLayout(num_layers=layers, num_kv_heads=int(shape[1]), head_dim=int(shape[3]), kv_dtype=dtype,
                           vocab_size=int(vocab) if vocab > 0 else None, has_position_ids="position_ids" in self.inputs,
                           max_positions=max_positions(self.folder))

    def _device(self, array: np.ndarray):
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        if tensor.numel() == 0:  # TensorRT wants a valid address even for an empty cache
            return tensor.to("cuda"), self.torch.empty(1, dtype=tensor.dtype, device="cuda")
        tensor = tensor.to("cuda")
        return tensor, tensor

    def forward(self, input_ids, attention_mask, position_ids, past: KVCache):
        feed = self.input_feed(input_ids, attention_mask, position_ids, past)
        # a pass on a cache (one token, or a golden verifier's few) runs in the decode profile where there is one
        on_cache = bool(past) and past[0][0].shape[2] > 0
        profile = DECODE_PROFILE if on_cache and self.engine.num_optimization_profiles > 1 else PREFILL_PROFILE
        handle = self.stream.cuda_stream
        self.context.set_optimization_profile_async(profile, handle)
        keep = []
        for name in self.inputs:
            tensor, address = self._device(feed[name].astype(self.trt.nptype(self.engine.get_tensor_dtype(name))))
            keep.append((tensor, address))
            self.context.set_input_shape(name, tuple(feed[name].shape))
            self.context.set_tensor_address(name, address.data_ptr())
        results = {}
        for name in self.outputs:
            dtype = getattr(self.torch, np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).name)
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = self.torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr() if results[name].numel() else
                                            self.torch.empty(1, dtype=dtype, device="cuda").data_ptr())
        if not self.context.execute_async_v3(handle):
            raise BackendError(f"TensorRT failed to run {self.engine_path}")
        self.stream.synchronize()
        present = [(results[f"present.{i}.key"].cpu().numpy(), results[f"present.{i}.value"].cpu().numpy())
                   for i in range(self.layout.num_layers)]
        return results["logits"].float().cpu().numpy(), present


def load_runner(path: str | Path, **ort_options) -> CausalLMRunner:
    """A TensorRT runner for an ``.engine`` file, else the ONNX Runtime runner for a folder or .onnx file."""
    path = Path(path)
    if path.suffix == ".engine":
        return TrtCausalLM.from_path(path)
    from accullm_export.runtime.ort_runner import OrtCausalLM

    return OrtCausalLM.from_path(path, **ort_options)
