"""GGUF files: checked with the ``gguf`` reader, dequantized once by transformers, cached as fp32 safetensors.

transformers' GGUF loader dequantizes every tensor with ``gguf.quants.dequantize`` into float32 and only undoes
llama.cpp's q/k row permutation for Llama, so the cached weights are bit for bit what the ``gguf`` package
computes (tests/unit/test_gguf_types.py checks each type in ``READABLE_TYPES``). Before that, the metadata is
checked here: the architecture, the tensor types, the head counts and widths against the projections' shapes,
the rope parameters, the tokenizer and the output weight, so a file the conversion would misread is refused with
one line instead of giving a wrong model.

transformers' loader reads the weights of Gemma 2, Gemma 3 and Phi-3 files correctly (it subtracts the 1 that
llama.cpp adds to Gemma's norm gains, and Phi-3's fused ``attn_qkv`` and ``ffn_up`` are Hugging Face's own fused
layers), but not all of their config: the config entries it drops or misreads are rebuilt here from the metadata,
as llama.cpp reads them (see ``_ARCHITECTURES``).

Conversion is the slow step, so later exports of the same file (same SHA-256) reuse the cached Hugging Face
folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable

from accullm_export.atomic import OutputAppeared, atomic_dir
from accullm_export.hashing import sha256_file
from accullm_export.errors import BackendError, UserError, require
from accullm_export.models.architectures import FULL, SLIDING

log = logging.getLogger(__name__)

# GGML tensor types read bit for bit as gguf.quants.dequantize computes them; each is tested
READABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K")
# GGUF rope.scaling.type values the Hugging Face config can carry (transformers' loader drops the key)
_ROPE_SCALING_TYPES = ("none", "linear")
_SPECIAL_TOKENS = ("bos", "eos", "unknown", "padding")
# tensors of rope factors that no Hugging Face config the export reads can carry: what they are, what to do instead
_ROPE_FACTOR_TENSORS = {
    "rope_freqs.weight": ("per-frequency rope factors, as Llama 3.1 files do",
                          "export the Hugging Face checkpoint instead"),
    "rope_factors_long.weight": ("LongRoPE factors, as Phi-3 128k and Phi-3.5 files do",
                                 "rope whose frequencies change with the sequence length is not supported"),
    "rope_factors_short.weight": ("LongRoPE factors, as Phi-3 128k and Phi-3.5 files do",
                                  "rope whose frequencies change with the sequence length is not supported"),
}
# the metadata sizes the config is built from; llama.cpp needs each of them too
_REQUIRED_SIZES = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_BLOCK_WEIGHT = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# llama.cpp tells the 27B Gemma models by their layer count and scales their queries by 1/sqrt(hidden / heads),
# every other Gemma model's by 1/sqrt(head width); no metadata key holds the scale
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's rope base for Gemma 3's windowed layers, and the one it takes when a file has no rope.freq_base
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_LLAMA_CPP_ROPE_BASE = 10000.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GgufSummary:
    """What the checks learned that the conversion needs."""

    architecture: str
    vocab_rows: int  # rows of token_embd.weight: the model's vocab_size, whatever the tokenizer counts
    tied: bool  # no output.weight: the output head reuses the embedding
    rope_scaling: dict  # Hugging Face rope_parameters entries for the file's rope scaling, or {}
    config: dict  # config.json entries that transformers' loader drops or misreads, rebuilt from the metadata


def gguf_architecture(path: Path) -> str:
    """Validate a GGUF file and return its general.architecture (see :func:`check_gguf`)."""
    return check_gguf(path).architecture


def check_gguf(path: Path) -> GgufSummary:
    """Validate a GGUF file's layout and metadata.

    Raises:
        UserError: not a readable GGUF file, no tensors, an unsupported architecture, a tensor type the kit cannot
            dequantize, rope parameters the conversion would drop, a missing or inconsistent tokenizer, or an
            output weight that does not fit the embedding.
    """
    gguf = require("gguf", "export")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises many types on a corrupt file
        raise UserError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from None
    _check_layout(path, reader)
    architecture = _check_architecture(path, reader)
    _check_tensor_types(path, reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    _check_attention(path, reader, architecture, tensors)
    rope_scaling = _check_rope(path, reader, architecture, tensors)
    vocab_rows = _check_vocabulary(path, reader, architecture, tensors)
    return GgufSummary(architecture=architecture, vocab_rows=vocab_rows, tied="output.weight" not in tensors,
                       rope_scaling=rope_scaling, config=_ARCHITECTURES[architecture].config_entries(reader))


def _check_layout(path: Path, reader) -> None:
    if len(reader.tensors) == 0:
        raise UserError(f"{path} is a GGUF file with no tensors; it holds no model weights")
    size = path.stat().st_size
    for tensor in reader.tensors:
        if (tensor.data_offset - reader.data_offset) % reader.alignment:
            raise UserError(f"{path} is not a valid GGUF file (tensor {tensor.name} is not aligned to "
                            f"{reader.alignment} bytes)")
        if tensor.data_offset + int(tensor.n_bytes) > size:
            raise UserError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")


def _check_architecture(path: Path, reader) -> str:
    architecture = _metadata(reader, "general.architecture")
    if architecture is None:
        raise UserError(f"{path} has no general.architecture field")
    if architecture not in _ARCHITECTURES:
        supported = ", ".join(_ARCHITECTURES)
        raise UserError(f"{path}: unsupported GGUF architecture {architecture!r}; supported: {supported}")
    return architecture


def _check_tensor_types(path: Path, reader) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in READABLE_TYPES:
            raise UserError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the kit cannot "
                            f"dequantize; readable types: {', '.join(READABLE_TYPES)}")


def _check_attention(path: Path, reader, architecture: str, tensors: dict) -> None:
    """The sizes the config is built from are positive integers that agree with each other and with the shape of
    every block's projections, and the window and soft-caps, where given, are positive."""
    sizes = {key: _size(path, reader, f"{architecture}.{key}") for key in _REQUIRED_SIZES}
    layers, hidden, inner, heads = (sizes[key] for key in _REQUIRED_SIZES)
    kv_heads = _size(path, reader, f"{architecture}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise UserError(f"{path}: {architecture}.attention.head_count ({heads}) is not a multiple of "
                        f"{architecture}.attention.head_count_kv ({kv_heads})")
    key_length = _size(path, reader, f"{architecture}.attention.key_length", None)
    if key_length is None and hidden % heads:
        raise UserError(f"{path}: {architecture}.embedding_length ({hidden}) is not a multiple of "
                        f"{architecture}.attention.head_count ({heads}) and no {architecture}.attention.key_length "
                        "gives the head width")
    head_dim = key_length if key_length is not None else hidden // heads
    value_length = _size(path, reader, f"{architecture}.attention.value_length", head_dim)
    if value_length != head_dim:
        raise UserError(f"{path}: {architecture}.attention.value_length ({value_length}) differs from the key "
                        f"width ({head_dim}); the Hugging Face models have one head width")
    _size(path, reader, f"{architecture}.attention.sliding_window", None)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = _metadata(reader, f"{architecture}.{key}")
        if reader.get_field(f"{architecture}.{key}") is not None and not _positive(value):
            raise UserError(f"{path}: {architecture}.{key} must be a finite positive number, got {value!r}")
    up_rows = 2 * inner if _ARCHITECTURES[architecture].fused_gate_up else inner
    expected = {"attn_q": [heads * head_dim, hidden], "attn_k": [kv_heads * head_dim, hidden],
                "attn_v": [kv_heads * head_dim, hidden], "attn_qkv": [(heads + 2 * kv_heads) * head_dim, hidden],
                "attn_output": [hidden, heads * head_dim], "ffn_gate": [inner, hidden], "ffn_up": [up_rows, hidden],
                "ffn_down": [hidden, inner]}
    for name, tensor in tensors.items():
        match = _BLOCK_WEIGHT.fullmatch(name)
        if match is None:
            continue
        if int(match[1]) >= layers:
            raise UserError(f"{path}: tensor {name} belongs to no block; {architecture}.block_count is {layers}")
        shape = expected.get(match[2])
        if shape is not None and _hf_shape(tensor) != shape:
            raise UserError(f"{path}: {name} has shape {_hf_shape(tensor)}, but the metadata calls for {shape} "
                            f"({heads} heads, {kv_heads} kv heads of width {head_dim}, embedding {hidden}, "
                            f"feed-forward {inner})")


_REQUIRED = object()


def _size(path: Path, reader, key: str, default=_REQUIRED):
    """A positive integer metadata value; ``default`` when the key is absent (none: the key is required)."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise UserError(f"{path} has no {key} field; the conversion needs it")
        return default
    value = field.contents()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _check_rope(path: Path, reader, architecture: str, tensors: dict) -> dict:
    """Refuse rope metadata that transformers' loader would drop or misread: a non-positive base, rotation of part
    of each head, scaling other than linear, and tables of rope factors (``_ROPE_FACTOR_TENSORS``). Returns the
    rope_parameters entries of a linear scaling, which the loader drops."""
    base = _metadata(reader, f"{architecture}.rope.freq_base")
    if base is not None and not _positive(base):
        raise UserError(f"{path}: {architecture}.rope.freq_base must be a finite positive number, got {base!r}")
    rotated = _metadata(reader, f"{architecture}.rope.dimension_count")
    head_dim = _head_dim(reader, architecture)
    if rotated is not None and head_dim is not None and rotated != head_dim:
        raise UserError(f"{path}: rope rotates {rotated!r} of the {head_dim} dimensions of each head "
                        f"({architecture}.rope.dimension_count); only full-head rope is supported")
    scaling = _metadata(reader, f"{architecture}.rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise UserError(f"{path}: unsupported rope scaling {scaling!r} ({architecture}.rope.scaling.type); "
                        f"supported: {', '.join(_ROPE_SCALING_TYPES)}")
    factor = _metadata(reader, f"{architecture}.rope.scaling.factor")
    if scaling == "linear" and not _positive(factor):
        raise UserError(f"{path}: linear rope scaling needs a finite positive {architecture}.rope.scaling.factor, "
                        f"got {factor!r}")
    for name, (what, instead) in _ROPE_FACTOR_TENSORS.items():
        if name in tensors:
            raise UserError(f"{path} holds {name} ({what}), which the conversion cannot carry over; {instead}")
    return {"rope_type": "linear", "factor": float(factor)} if scaling == "linear" else {}


def _check_vocabulary(path: Path, reader, architecture: str, tensors: dict) -> int:
    """The tokenizer is present and fits the embedding; an ``output.weight`` (untied head) has the embedding's
    shape, and a missing one means the head is tied to the embedding. Returns the embedding's row count."""
    if not isinstance(_metadata(reader, "tokenizer.ggml.model"), str):
        raise UserError(f"{path} has no tokenizer (no tokenizer.ggml.model); the export needs one")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    count = len(tokens.data) if tokens is not None else 0
    if count == 0:
        raise UserError(f"{path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise UserError(f"{path} has no two-dimensional token_embd.weight (the token embedding)")
    rows = int(embedding.shape[1])  # GGUF lists dimensions innermost first
    declared = _metadata(reader, f"{architecture}.vocab_size")
    if declared is not None and declared != rows:
        raise UserError(f"{path}: {architecture}.vocab_size is {declared!r}, but token_embd.weight has {rows} rows")
    if count > rows:
        raise UserError(f"{path}: the tokenizer has {count} tokens, but token_embd.weight has only {rows} rows")
    for role in _SPECIAL_TOKENS:
        token_id = _metadata(reader, f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < count):
            raise UserError(f"{path}: tokenizer.ggml.{role}_token_id is {token_id}, outside the {count} tokens")
    output = tensors.get("output.weight")
    if output is not None and list(output.shape) != list(embedding.shape):
        raise UserError(f"{path}: output.weight has shape {_hf_shape(output)}, but token_embd.weight has "
                        f"{_hf_shape(embedding)}; an untied output weight must match the embedding")
    return rows


def _metadata(reader, key: str):
    """A scalar or string metadata value, or None when the key is absent or holds an array."""
    field = reader.get_field(key)
    if field is None or len(field.data) != 1 or len(field.types) != 1:
        return None
    return field.contents()


def _head_dim(reader, architecture: str) -> int | None:
    key_length = _metadata(reader, f"{architecture}.attention.key_length")
    if key_length is not None:
        return key_length
    width, heads = (_metadata(reader, f"{architecture}.{key}") for key in ("embedding_length", "attention.head_count"))
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads == 0:
        return width // heads  # a width the heads do not divide is left to the loader, which names it
    return None


def _gemma_query_scalar(reader, architecture: str) -> int:
    """Gemma's query_pre_attn_scalar as llama.cpp sets it (see ``_GEMMA_27B_LAYERS``)."""
    hidden, heads, layers = (_metadata(reader, f"{architecture}.{key}")
                             for key in ("embedding_length", "attention.head_count", "block_count"))
    return hidden // heads if layers == _GEMMA_27B_LAYERS[architecture] else _head_dim(reader, architecture)


def _layer_types(layers: int, global_every: int) -> list[str]:
    """llama.cpp's window pattern: every ``global_every``-th layer global, the others windowed."""
    return [FULL if (i + 1) % global_every == 0 else SLIDING for i in range(layers)]


def _no_config_entries(reader) -> dict:
    return {}


def _gemma2_config(reader) -> dict:
    """The soft-caps (llama.cpp's defaults, 50 and 30, where the file has none; transformers' loader drops the
    file's), the query scale, and the window (4096 where the file has none) on every other layer."""
    window = _metadata(reader, "gemma2.attention.sliding_window")
    attention_cap, final_cap = (_metadata(reader, f"gemma2.{key}")
                                for key in ("attn_logit_softcapping", "final_logit_softcapping"))
    return {"attn_logit_softcapping": float(50.0 if attention_cap is None else attention_cap),
            "final_logit_softcapping": float(30.0 if final_cap is None else final_cap),
            "query_pre_attn_scalar": _gemma_query_scalar(reader, "gemma2"),
            "sliding_window": 4096 if window is None else window,
            "layer_types": _layer_types(_metadata(reader, "gemma2.block_count"), 2)}


def _gemma3_config(reader) -> dict:
    """The query scale, the final soft-cap where the file has one, the window on five layers of every six (no
    window at all where the file has none), and each layer type's rope: the file's base on the global layers (the
    rope scaling is added to them later), a fixed, unscaled base on the windowed ones."""
    window = _metadata(reader, "gemma3.attention.sliding_window")
    base = _metadata(reader, "gemma3.rope.freq_base")
    layers = _metadata(reader, "gemma3.block_count")
    final_cap = _metadata(reader, "gemma3.final_logit_softcapping")
    return {"query_pre_attn_scalar": _gemma_query_scalar(reader, "gemma3"),
            "final_logit_softcapping": None if final_cap is None else float(final_cap),
            "sliding_window": window,
            "layer_types": _layer_types(layers, 6 if window is not None else 1),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_BASE},
                FULL: {"rope_type": "default", "rope_theta": float(_LLAMA_CPP_ROPE_BASE if base is None else base)}}}


def _phi3_config(reader) -> dict:
    """The window, which transformers' loader drops. llama.cpp ignores it too (it distrusts the value its converter
    writes), but the Hugging Face model the file was converted from applies it."""
    return {"sliding_window": _metadata(reader, "phi3.attention.sliding_window")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Architecture:
    """A GGUF general.architecture the kit converts."""

    hf_class: str  # the Hugging Face class its conversion is
    config_entries: Callable[..., dict] = _no_config_entries  # reader -> config.json entries the loader gets wrong
    fused_gate_up: bool = False  # ffn_up holds the gate's rows, then the up projection's (no ffn_gate)


# GGUF general.architecture values whose transformers conversion gives a supported decoder, in the order the error
# message lists them
_ARCHITECTURES = {
    "llama": _Architecture(hf_class="LlamaForCausalLM"),
    "mistral": _Architecture(hf_class="MistralForCausalLM"),
    "qwen2": _Architecture(hf_class="Qwen2ForCausalLM"),
    "qwen3": _Architecture(hf_class="Qwen3ForCausalLM"),
    "gemma2": _Architecture(hf_class="Gemma2ForCausalLM", config_entries=_gemma2_config),
    "gemma3": _Architecture(hf_class="Gemma3ForCausalLM", config_entries=_gemma3_config),
    "phi3": _Architecture(hf_class="Phi3ForCausalLM", config_entries=_phi3_config, fused_gate_up=True),
}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _hf_shape(tensor) -> list[int]:
    return [int(dim) for dim in reversed(tensor.shape)]


def gguf_checkpoint_folder(path: Path) -> Path:
    """Return the cached fp32 Hugging Face folder for a GGUF file, converting it on first use."""
    from accullm_export.models.checkpoint import cache_dir

    summary = check_gguf(path)
    digest = sha256_file(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (folder / "config.json").is_file():
        log.info("using cached conversion of %s in %s", path.name, folder)
        return folder
    log.info("dequantizing %s to fp32 (once; cached in %s)", path.name, folder)
    try:
        with atomic_dir(folder, overwrite=True, kind=None) as staging:  # the cache's own folder: no manifest
            _convert(path, summary, digest, staging)
    except OutputAppeared:  # another run converted the same file meanwhile: use its result
        if not (folder / "config.json").is_file():
            raise
    return folder


def _convert(path: Path, summary: GgufSummary, digest: str, out: Path) -> None:
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    safetensors_torch = require("safetensors.torch", "export")
    with _transformers_quiet(transformers):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True,
                vocab_size=summary.vocab_rows)  # the loader takes the tokenizer's count when the key is absent
        except ImportError as exc:
            raise BackendError(f"loading GGUF needs an optional package: {exc}") from exc
        except Exception as exc:  # the GGUF passed the reader's checks: what transformers refuses is its content
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"transformers could not load {path} ({type(exc).__name__}: {reason})") from None
    tied = summary.tied
    if bool(model.config.tie_word_embeddings) != tied:  # the loader decides from the same output.weight test
        raise RuntimeError(f"transformers read tie_word_embeddings={model.config.tie_word_embeddings} from {path}")
    missing = sorted(set(loading.get("missing_keys", ())) - ({"lm_head.weight"} if tied else set()))
    if missing:  # transformers would fill them with random values
        raise UserError(f"{path} lacks {len(missing)} weight(s) its metadata calls for, e.g. {missing[0]}")
    state = model.state_dict()
    tensors = {name: value.detach().to(torch.float32).contiguous()
               for name, value in state.items() if not (tied and name == "lm_head.weight")}
    safetensors_torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config.pop(key, None)
    config.update(summary.config)
    config["architectures"] = [_ARCHITECTURES[summary.architecture].hf_class]
    config["dtype"] = "float32"
    config["tie_word_embeddings"] = tied
    if summary.rope_scaling:
        rope = dict(config.get("rope_parameters") or {})
        if FULL in rope:  # a rope per layer type (Gemma 3): the scaling is the global layers'
            rope[FULL] = {**rope[FULL], **summary.rope_scaling}
        else:
            rope.update(summary.rope_scaling)
        config["rope_parameters"] = rope
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    (out / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}, indent=2))


@contextlib.contextmanager
def _transformers_quiet(transformers):
    """transformers' warnings and its converter's raw tqdm bars kept off the command's stderr (shown with -v), so a
    failed conversion still ends with one error line."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if captured.getvalue().strip():
            log.debug("transformers: %s", captured.getvalue().strip())
