"""The ONNX Runtime runner for exported decoders (any ONNX file that follows the export's I/O names)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from accullm_export.errors import UserError
from accullm_export.runtime.base import CausalLMRunner, KVCache, ModelLayout, max_positions
from accullm_export.runtime.session import create_session

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PAST = re.compile(r"past_key_values\.(\d+)\.key")


EXACT_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"  # the accuracy level of fused DQ + MatMul


class OrtCausalLM(CausalLMRunner):
    """A decoder with a KV cache, run by ONNX Runtime."""

    def __init__(self, model_path: Path, *, device: str = "auto", optimization: str = "all",
                 threads: int | None = None, profile_prefix: str | None = None, exact: bool = False,
                 lean: bool = False):
        """``exact``: the INT4 layers ONNX Runtime fuses into MatMulNBits multiply float32 activations (accuracy
        level 0) instead of 8-bit ones (its default, level 4, quantizes each pass's activations its own way), so
        that a pass over several tokens computes each token as a one-token pass does: golden mode's verifier.

        ``lean``: for a model run beside another (validation): no prepacked weight copies (the weights stay in the
        model file's pages) and no per-shape memory pattern (``create_session``); the results are the same."""
        self.model_path = Path(model_path)
        self.folder = self.model_path.parent
        self.session = create_session(self.model_path, device=device, optimization=optimization, threads=threads,
                                      profile_prefix=profile_prefix,
                                      config_entries={EXACT_ACCURACY_KEY: "0"} if exact else None,
                                      prepack=not lean, memory_pattern=not lean)
        self.layout = _layout(self.session, self.model_path)
        self._output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(self.layout.num_layers)
                                           for kind in ("key", "value")]

    @classmethod
    def from_path(cls, path: str | Path, **options) -> "OrtCausalLM":
        """Load an exported folder (its model.onnx) or an .onnx file."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise UserError(f"{path}: no such model (expected an exported folder or an .onnx file)")
        return cls(path, **options)

    def input_names(self) -> set[str]:
        return {value.name for value in self.session.get_inputs()}

    def forward(self, input_ids, attention_mask, position_ids, past: KVCache):
        limit = self.layout.max_positions
        if limit is not None and attention_mask.shape[1] > limit:
            raise UserError(f"{attention_mask.shape[1]} tokens exceed the model's maximum of {limit} positions")
        outputs = self.session.run(self._output_names, self.input_feed(input_ids, attention_mask, position_ids, past))
        present = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.layout.num_layers)]
        return np.asarray(outputs[0], dtype=np.float32), present


def _layout(session, path: Path) -> ModelLayout:
    inputs = {value.name: value for value in session.get_inputs()}
    outputs = {value.name: value for value in session.get_outputs()}
    missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
    if missing or "logits" not in outputs:
        raise UserError(f"{path} is not a causal LM export: it lacks {', '.join(missing or ['logits'])} "
                        "(expected inputs input_ids/attention_mask/past_key_values.* and outputs logits/present.*)")
    layers = sorted(int(match.group(1)) for name in inputs if (match := _PAST.fullmatch(name)))
    if not layers or layers != list(range(len(layers))):
        raise UserError(f"{path} has no past_key_values.{{i}}.key inputs numbered from 0")
    first = inputs["past_key_values.0.key"]
    kv_heads, head_dim = first.shape[1], first.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        kv_heads, head_dim = _geometry_from_genai_config(path.parent, kv_heads, head_dim)
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise UserError(f"{path}: past_key_values.0.key must have static head count and head size, got {first.shape}")
    vocab = outputs["logits"].shape[-1]
    return ModelLayout(num_layers=len(layers), num_kv_heads=kv_heads, head_dim=head_dim,
                       kv_dtype=np.dtype(_ORT_TYPES.get(first.type, np.float32)),
                       vocab_size=vocab if isinstance(vocab, int) else None,
                       has_position_ids="position_ids" in inputs, max_positions=max_positions(path.parent))


def _geometry_from_genai_config(folder: Path, kv_heads, head_dim):
    """onnxruntime-genai's own builds leave the head size symbolic; their genai_config.json states it."""
    from accullm_export.data.json_files import optional_int, read_json_object

    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        return kv_heads, head_dim
    config = read_json_object(config_path)
    stated = (optional_int(config, ("model", "decoder", key), config_path)
              for key in ("num_key_value_heads", "head_size"))
    return tuple(value if value is not None else fallback for value, fallback in zip(stated, (kv_heads, head_dim)))
