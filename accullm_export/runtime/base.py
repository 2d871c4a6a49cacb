"""The runner interface every backend implements (ONNX Runtime today, TensorRT later)."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

import numpy as np

from accullm_export.data.json_files import optional_int, read_json_object

KVCache = list[tuple[np.ndarray, np.ndarray]]  # per layer: (key, value), each [batch, kv_heads, seq, head_dim]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelLayout:
    """What a runner learns from a model's inputs: layer count and the KV-cache geometry."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: np.dtype
    vocab_size: int | None
    has_position_ids: bool
    max_positions: int | None = None  # from the folder's config; None when unknown


class CausalLMRunner(abc.ABC):
    """One forward pass of a decoder with a KV cache; generation is built on top of this."""

    layout: ModelLayout
    folder: Path | None

    @abc.abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run the model. Returns logits [batch, seq, vocab] (fp32) and the new cache (past + these tokens)."""

    def input_feed(self, input_ids, attention_mask, position_ids, past: KVCache) -> dict[str, np.ndarray]:
        """The model's inputs by name: token ids, mask and positions as int64, and the cache per layer."""
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if self.layout.has_position_ids:
            feed["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        for i, (key, value) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = key
            feed[f"past_key_values.{i}.value"] = value
        return feed

    def empty_cache(self, batch_size: int) -> KVCache:
        shape = (batch_size, self.layout.num_kv_heads, 0, self.layout.head_dim)
        return [(np.zeros(shape, self.layout.kv_dtype), np.zeros(shape, self.layout.kv_dtype))
                for _ in range(self.layout.num_layers)]

    def full_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits of every position in one pass from an empty cache (teacher forcing)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        positions = position_ids_from_mask(attention_mask)
        logits, _ = self.forward(input_ids, attention_mask, positions, self.empty_cache(input_ids.shape[0]))
        return logits


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Hugging Face's convention: positions count real tokens; left-padding slots get position 1."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


def max_positions(folder: Path) -> int | None:
    """The model's maximum sequence length from config.json or genai_config.json, if stated."""
    for name, keys in (("config.json", ("max_position_embeddings",)), ("genai_config.json", ("model", "context_length"))):
        path = folder / name
        if path.is_file():
            value = optional_int(read_json_object(path), keys, path)
            if value is not None:
                return value
    return None
