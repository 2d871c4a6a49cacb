"""Runners that load a built model and generate text: ONNX Runtime now, TensorRT behind the same interface.

Example:
    >>> from accullm_export.runtime import OrtCausalLM, GenerationConfig, generate_text
    >>> model = OrtCausalLM.from_path("out/smollm2")
    >>> for piece in generate_text(model, "The capital of France is", GenerationConfig(max_new_tokens=16)):
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from accullm_export.runtime.base import CausalLMRunner, KVCache
from accullm_export.runtime.generation import GenerationConfig, GenerationResult, generate, generate_text, text_stream
from accullm_export.runtime.ort_runner import OrtCausalLM

__all__ = ["CausalLMRunner", "GenerationConfig", "GenerationResult", "KVCache", "OrtCausalLM", "generate",
           "generate_text", "text_stream"]
