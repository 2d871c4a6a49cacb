"""The decoder architectures the exporter supports, read from a Hugging Face ``config.json``.

All of them are pre-norm decoders with RMSNorm, rotary position embedding, grouped-query attention and a gated
MLP. They differ in traits recorded here: biases, per-head q/k norms, fused projections (Phi-3), the Gemma
family's sandwich norms, (1 + w) norm gains, scaled embeddings, GELU gate and logit soft-capping, and attention
windows and rotary bases that change from layer to layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from accullm_export.errors import UserError

SLIDING, FULL = "sliding_attention", "full_attention"
# hidden_act / hidden_activation values -> the gate's activation in the exported MLP
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchitectureTraits:
    """What distinguishes one supported architecture from plain Llama."""

    model_type: str
    genai_type: str  # the "type" onnxruntime-genai expects in genai_config.json
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    sliding_window_key: str | None = None  # config key holding the attention window, if any
    # layers alternate between windowed and global attention: config "layer_types", else every Nth layer is global
    per_layer_windows: bool = False
    global_layer_every: int = 0  # that N when config.json has no layer_types
    global_layer_every_key: str | None = None  # config key overriding N (Gemma 3's sliding_window_pattern)
    local_rope_theta_key: str | None = None  # windowed layers' own rope base (Gemma 3's rope_local_base_freq)
    default_rope_theta: float = 10000.0
    activation_key: str = "hidden_act"
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj, split into the usual layers at export
    norm_gain_offset: float = 0.0  # Gemma: the norms scale by (1 + weight)
    sandwich_norms: bool = False  # Gemma 2/3: extra norms after attention and around the MLP
    scaled_embeddings: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    query_scalar_key: str | None = None  # attention scale 1/sqrt(config[key]) instead of 1/sqrt(head_dim)
    attention_softcap_key: str | None = None  # scores -> c * tanh(scores / c)
    final_softcap_key: str | None = None  # logits -> c * tanh(logits / c)


_GEMMA = dict(activation_key="hidden_activation", norm_gain_offset=1.0, sandwich_norms=True, scaled_embeddings=True,
              query_scalar_key="query_pre_attn_scalar", sliding_window_key="sliding_window", per_layer_windows=True,
              final_softcap_key="final_logit_softcapping")

SUPPORTED_ARCHITECTURES: dict[str, ArchitectureTraits] = {
    traits.model_type: traits
    for traits in (
        ArchitectureTraits(model_type="llama", genai_type="llama"),
        ArchitectureTraits(model_type="mistral", genai_type="mistral", sliding_window_key="sliding_window"),
        ArchitectureTraits(model_type="qwen2", genai_type="qwen2"),
        ArchitectureTraits(model_type="qwen3", genai_type="qwen3", qk_norm=True),
        ArchitectureTraits(model_type="gemma2", genai_type="gemma2", global_layer_every=2,
                           attention_softcap_key="attn_logit_softcapping", **_GEMMA),
        # transformers' Gemma 3 attention ignores attn_logit_softcapping, so the export does too
        ArchitectureTraits(model_type="gemma3_text", genai_type="gemma3_text", qk_norm=True, global_layer_every=6,
                           global_layer_every_key="sliding_window_pattern", local_rope_theta_key="rope_local_base_freq",
                           default_rope_theta=1_000_000.0, **_GEMMA),
        ArchitectureTraits(model_type="phi3", genai_type="phi3", sliding_window_key="sliding_window",
                           fused_projections=True),
    )
}

# SmolLM and SmolLM2 checkpoints are Llama models (model_type "llama"); listed for the error message.
SUPPORTED_NAMES = ("Llama 1/2/3.x, SmolLM/SmolLM2 (llama), Mistral (mistral), Qwen2/2.5 (qwen2), Qwen3 (qwen3), "
                   "Gemma 2 (gemma2), Gemma 3 text (gemma3_text), Phi-3/3.5 (phi3)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerAttention:
    """The attention of one decoder layer: its window (None: global) and its rotary frequencies."""

    sliding_window: int | None
    rope_theta: float
    rope_parameters: Mapping[str, Any]

    def rope_key(self) -> tuple:
        """Equal for layers that share their rotary tables."""
        return self.rope_theta, tuple(sorted((k, repr(v)) for k, v in self.rope_parameters.items()))


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
    rope_theta: float  # of the global layers
    rope_parameters: Mapping[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None  # the window of the windowed layers, if any
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    layers: tuple[LayerAttention, ...] = ()  # one per layer; empty: every layer global with the rope above
    activation: str = "silu"  # a value of ACTIVATIONS
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    attention_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def model_type(self) -> str:
        return self.traits.model_type

    def layer(self, i: int) -> LayerAttention:
        if self.layers:
            return self.layers[i]
        return LayerAttention(sliding_window=self.sliding_window, rope_theta=self.rope_theta,
                              rope_parameters=self.rope_parameters)

    def inv_freq(self, layer: int | None = None) -> np.ndarray:
        """Rotary inverse frequencies, float64, shape [head_dim // 2], with the configured scaling (of the global
        layers, or of ``layer``)."""
        if layer is None:
            return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_parameters)
        attention = self.layer(layer)
        return rope_inv_freq(self.head_dim, attention.rope_theta, attention.rope_parameters)

    def check_rope(self) -> None:
        """Raise UserError now for rope parameters the export cannot build."""
        for i in range(self.num_layers):
            self.inv_freq(i)

    @property
    def query_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(self.head_dim)


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
    activation_name = config.get(traits.activation_key) or config.get("hidden_act") or "silu"
    activation = ACTIVATIONS.get(activation_name) if isinstance(activation_name, str) else None
    if activation is None:
        raise UserError(f"unsupported {traits.activation_key} {activation_name!r}; supported: "
                        f"{', '.join(ACTIVATIONS)}")
    if config.get("use_sliding_window") and traits.sliding_window_key is None:
        raise UserError(f"{model_type} with use_sliding_window=true (per-layer windows) is not supported")
    if config.get("use_bidirectional_attention"):
        raise UserError(f"{model_type} with use_bidirectional_attention=true is not a causal decoder; not supported")
    hidden, heads = _count(config, "hidden_size"), _count(config, "num_attention_heads")
    kv_heads = _count(config, "num_key_value_heads", heads)
    if config.get("head_dim") is None and hidden % heads:
        raise UserError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    head_dim = _count(config, "head_dim", hidden // heads)
    if heads % kv_heads:
        raise UserError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    num_layers = _count(config, "num_hidden_layers")
    window = _count(config, traits.sliding_window_key, None) if traits.sliding_window_key else None
    layers = _layer_attention(config, traits, num_layers, window)
    global_layer = next((layer for layer in layers if layer.sliding_window is None), layers[0])
    scalar = _positive_number(config, traits.query_scalar_key, None) if traits.query_scalar_key else None
    return DecoderConfig(
        traits=traits,
        vocab_size=_count(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_count(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_number(config, "rms_norm_eps", 1e-6),
        rope_theta=global_layer.rope_theta,
        rope_parameters=global_layer.rope_parameters,
        max_position_embeddings=_count(config, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=window if any(layer.sliding_window for layer in layers) else None,
        bos_token_id=_token_ids(config, "bos_token_id"),
        eos_token_id=_token_ids(config, "eos_token_id"),
        pad_token_id=_token_ids(config, "pad_token_id"),
        layers=tuple(layers),
        activation=activation,
        attention_scale=1.0 / math.sqrt(scalar) if scalar is not None else None,
        attention_softcap=_positive_number(config, traits.attention_softcap_key, None)
        if traits.attention_softcap_key else None,
        final_softcap=_positive_number(config, traits.final_softcap_key, None) if traits.final_softcap_key else None,
    )


def _layer_types(config: Mapping[str, Any], traits: ArchitectureTraits, num_layers: int,
                 window: int | None) -> list[str]:
    """"sliding_attention" or "full_attention" for each layer."""
    if not traits.per_layer_windows:
        return [SLIDING if window else FULL] * num_layers
    given = config.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != num_layers or not set(given) <= {SLIDING, FULL}:
            raise UserError(f"layer_types must list {num_layers} entries, each {SLIDING!r} or {FULL!r}; "
                            f"got {given!r}")
        return [kind if window else FULL for kind in given]
    every = traits.global_layer_every
    if traits.global_layer_every_key:
        every = _count(config, traits.global_layer_every_key, every)
    return [SLIDING if window and (i + 1) % every else FULL for i in range(num_layers)]


def _layer_attention(config: Mapping[str, Any], traits: ArchitectureTraits, num_layers: int,
                     window: int | None) -> list[LayerAttention]:
    """Each layer's window and rope, from flat rope parameters or ones keyed by layer type."""
    stored = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(stored, Mapping):
        raise UserError(f"rope_parameters must be a JSON object, got {stored!r}")
    by_type = {}
    for kind in (SLIDING, FULL):
        if set(stored) & {SLIDING, FULL}:  # transformers' per-layer-type form
            parameters = stored.get(kind) or {}
            if not isinstance(parameters, Mapping):
                raise UserError(f"rope_parameters[{kind!r}] must be a JSON object, got {parameters!r}")
            fallback = traits.default_rope_theta
        elif kind == SLIDING and traits.local_rope_theta_key:  # older form: local layers have a plain rope
            parameters, fallback = {}, _positive_number(config, traits.local_rope_theta_key, 10000.0)
        else:
            parameters, fallback = stored, _positive_number(config, "rope_theta", traits.default_rope_theta)
        parameters = dict(parameters)
        partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise UserError(f"partial_rotary_factor {partial!r} (rotary on part of each head) is not supported")
        theta = _positive_number(parameters, "rope_theta", fallback)
        by_type[kind] = LayerAttention(sliding_window=window if kind == SLIDING else None, rope_theta=theta,
                                       rope_parameters=parameters)
    return [by_type[kind] for kind in _layer_types(config, traits, num_layers, window)]


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


def _positive_number(config: Mapping[str, Any], key: str, default: float | None) -> float | None:
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
    if isinstance(rope_type, str) and rope_type in _LENGTH_DEPENDENT_ROPES:
        raise UserError(f"unsupported rope type {rope_type!r} ({_LENGTH_DEPENDENT_ROPES[rope_type]}): its frequencies "
                        f"change with the sequence length; supported: {', '.join(sorted(_ROPE_SCALERS))}")
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


_LENGTH_DEPENDENT_ROPES = {"longrope": "Phi-3 128k and Phi-3.5 checkpoints", "su": "Phi-3 128k checkpoints",
                           "yarn": "YaRN context extension", "dynamic": "dynamic NTK scaling"}
_ROPE_SCALERS = {"default": _rope_default, "linear": _rope_linear, "llama3": _rope_llama3}
