"""GGUF files: checked with the ``gguf`` reader, dequantized once by transformers, cached as fp32 safetensors.

transformers' GGUF loader dequantizes every tensor with ``gguf.quants.dequantize`` into float32 and only undoes
llama.cpp's q/k row permutation for Llama, so the cached weights are bit for bit what the ``gguf`` package
computes (tests/unit/test_gguf_types.py checks each type in ``READABLE_TYPES``). Before that, the metadata is
checked here: the architecture, the tensor types, the rope parameters, the tokenizer and the output weight, so
a file the conversion would misread is refused with one line instead of giving a wrong model.

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
from pathlib import Path

from accullm_export.atomic import OutputAppeared, atomic_dir
from accullm_export.hashing import sha256_file
from accullm_export.errors import BackendError, UserError, require

log = logging.getLogger(__name__)

# GGUF general.architecture values whose transformers conversion gives a supported decoder.
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# GGML tensor types read bit for bit as gguf.quants.dequantize computes them; each is tested
READABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K")
# GGUF rope.scaling.type values the Hugging Face config can carry (transformers' loader drops the key)
_ROPE_SCALING_TYPES = ("none", "linear")
_SPECIAL_TOKENS = ("bos", "eos", "unknown", "padding")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GgufSummary:
    """What the checks learned that the conversion needs."""

    architecture: str
    vocab_rows: int  # rows of token_embd.weight: the model's vocab_size, whatever the tokenizer counts
    tied: bool  # no output.weight: the output head reuses the embedding
    rope_scaling: dict  # Hugging Face rope_parameters entries for the file's rope scaling, or {}


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
    rope_scaling = _check_rope(path, reader, architecture, tensors)
    vocab_rows = _check_vocabulary(path, reader, architecture, tensors)
    return GgufSummary(architecture=architecture, vocab_rows=vocab_rows, tied="output.weight" not in tensors,
                       rope_scaling=rope_scaling)


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
    if architecture not in _GGUF_ARCHITECTURES:
        supported = ", ".join(sorted(_GGUF_ARCHITECTURES))
        raise UserError(f"{path}: unsupported GGUF architecture {architecture!r}; supported: {supported}")
    return architecture


def _check_tensor_types(path: Path, reader) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in READABLE_TYPES:
            raise UserError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the kit cannot "
                            f"dequantize; readable types: {', '.join(READABLE_TYPES)}")


def _check_rope(path: Path, reader, architecture: str, tensors: dict) -> dict:
    """Refuse rope metadata that transformers' loader would drop or misread: a non-positive base, rotation of part
    of each head, scaling other than linear, and per-frequency factors (``rope_freqs.weight``). Returns the
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
    if "rope_freqs.weight" in tensors:
        raise UserError(f"{path} holds rope_freqs.weight (per-frequency rope factors, as Llama 3.1 files do), "
                        "which the conversion cannot carry over; export the Hugging Face checkpoint instead")
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
    config["architectures"] = [_GGUF_ARCHITECTURES[summary.architecture]]
    config["dtype"] = "float32"
    config["tie_word_embeddings"] = tied
    if summary.rope_scaling:
        config["rope_parameters"] = {**(config.get("rope_parameters") or {}), **summary.rope_scaling}
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
