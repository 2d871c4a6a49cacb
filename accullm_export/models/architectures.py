"""The decoder architectures the exporter supports, read from a Hugging Face ``config.json``.

All of them are Llama-family decoders: RMSNorm, rotary position embedding, grouped-query attention and a
SwiGLU MLP. They differ in small traits (biases, per-head q/k norms, sliding windows), recorded here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from accullm_export.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchitectureTraits:
    """What distinguishes one supported architecture from plain Llama."""

    model_type: str
    genai_type: str  # the "type" onnxruntime-genai expects in genai_config.json
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window_key: str | None = None  # config key holding the attention window, if any


SUPPORTED_ARCHITECTURES: dict[str, ArchitectureTraits] = {
    traits.model_type: traits
    for traits in (
        ArchitectureTraits(model_type="llama", genai_type="llama"),
        ArchitectureTraits(model_type="mistral", genai_type="mistral", sliding_window_key="sliding_window"),
        ArchitectureTraits(model_type="qwen2", genai_type="qwen2"),
        ArchitectureTraits(model_type="qwen3", genai_type="qwen3", qk_norm=True),
    )
}

# SmolLM and SmolLM2 checkpoints are Llama models (model_type "llama"); listed for the error message.
SUPPORTED_NAMES = "Llama, SmolLM/SmolLM2 (llama), Mistral, Qwen2, Qwen3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Everything the ONNX builder needs to know about a decoder, independent of transformers."""

    traits: ArchitectureTraits
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_parameters: Mapping[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    @property
    def model_type(self) -> str:
        return self.traits.model_type

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies, float64, shape [head_dim // 2], with the configured scaling."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_parameters)


def decoder_config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """Read a Hugging Face ``config.json`` dict into a DecoderConfig.

    Raises:
        UserError: the architecture or one of its options is not supported, or a value has the wrong type or range.
    """
    model_type = config.get("model_type")
    traits = SUPPORTED_ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if traits is None:
        archs = config.get("architectures")
        shown = archs[0] if isinstance(archs, list) and archs else model_type
        raise UserError(
            f"unsupported architecture {shown!r} (model_type {model_type!r}); supported: {SUPPORTED_NAMES}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act {config['hidden_act']!r}; only silu (SwiGLU) is supported")
    if config.get("use_sliding_window") and model_type != "mistral":
        raise UserError(f"{model_type} with use_sliding_window=true (per-layer windows) is not supported")
    hidden, heads = _count(config, "hidden_size"), _count(config, "num_attention_heads")
    kv_heads = _count(config, "num_key_value_heads", heads)
    if config.get("head_dim") is None and hidden % heads:
        raise UserError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    head_dim = _count(config, "head_dim", hidden // heads)
    if heads % kv_heads:
        raise UserError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    rope_parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope_parameters, Mapping):
        raise UserError(f"rope_parameters must be a JSON object, got {rope_parameters!r}")
    rope_parameters = dict(rope_parameters)
    window = _count(config, traits.sliding_window_key, None) if traits.sliding_window_key else None
    return DecoderConfig(
        traits=traits,
        vocab_size=_count(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_count(config, "intermediate_size"),
        num_layers=_count(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_number(config, "rms_norm_eps", 1e-6),
        rope_theta=_positive_number(rope_parameters, "rope_theta", _positive_number(config, "rope_theta", 10000.0)),
        rope_parameters=rope_parameters,
        max_position_embeddings=_count(config, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=window,
        bos_token_id=_token_ids(config, "bos_token_id"),
        eos_token_id=_token_ids(config, "eos_token_id"),
        pad_token_id=_token_ids(config, "pad_token_id"),
    )


_REQUIRED = object()


def _count(config: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """A positive integer entry of a config (``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"no {key} entry; it is needed to build the graph")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")
    return value


def _positive_number(config: Mapping[str, Any], key: str, default: float) -> float:
    """A finite positive number entry of a config (``default`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key} must be a finite positive number, got {value!r}")
    return float(value)


def _token_ids(config: Mapping[str, Any], key: str) -> int | list[int] | None:
    """A special-token id entry: absent, a token id, or a list of them."""
    value = config.get(key)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise UserError(f"{key} must be a token id or a list of token ids, got {value!r}")
    return value


def rope_inv_freq(head_dim: int, theta: float, parameters: Mapping[str, Any]) -> np.ndarray:
    """Rotary inverse frequencies for the rope types whose frequencies do not depend on sequence length.

    Raises:
        UserError: for rope types that change with the sequence length (dynamic, yarn, longrope).
    """
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaler = _ROPE_SCALERS.get(rope_type) if isinstance(rope_type, str) else None
    if scaler is None:
        raise UserError(f"unsupported rope type {rope_type!r}; supported: {', '.join(sorted(_ROPE_SCALERS))}")
    try:
        with np.errstate(all="ignore"):
            inv_freq = scaler(base, parameters)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise UserError(f"rope_parameters of rope type {rope_type!r} are incomplete or not numbers "
                        f"({type(exc).__name__}: {exc})") from None
    if not np.all(np.isfinite(inv_freq)) or not np.all(inv_freq > 0):
        raise UserError(f"rope_parameters of rope type {rope_type!r} give non-finite or non-positive frequencies")
    return inv_freq


def _rope_default(inv_freq: np.ndarray, parameters: Mapping[str, Any]) -> np.ndarray:
    return inv_freq


def _rope_linear(inv_freq: np.ndarray, parameters: Mapping[str, Any]) -> np.ndarray:
    return inv_freq / float(parameters["factor"])


def _rope_llama3(inv_freq: np.ndarray, parameters: Mapping[str, Any]) -> np.ndarray:
    # Llama 3.1's frequency-dependent scaling: long wavelengths are divided by `factor`, short ones kept,
    # and the band between them interpolated smoothly.
    factor = float(parameters["factor"])
    low_freq_factor = float(parameters["low_freq_factor"])
    high_freq_factor = float(parameters["high_freq_factor"])
    old_context = float(parameters["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


_ROPE_SCALERS = {"default": _rope_default, "linear": _rope_linear, "llama3": _rope_llama3}
