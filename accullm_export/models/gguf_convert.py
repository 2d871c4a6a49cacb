"""GGUF files: checked with the ``gguf`` reader, dequantized once by transformers, cached as fp32 safetensors.

Conversion is the slow step, so later exports of the same file (same SHA-256) reuse the cached Hugging Face
folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from accullm_export.atomic import OutputAppeared, atomic_dir
from accullm_export.hashing import sha256_file
from accullm_export.errors import BackendError, UserError, require

log = logging.getLogger(__name__)

# GGUF general.architecture values whose transformers conversion gives a supported decoder.
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_architecture(path: Path) -> str:
    """Validate a GGUF file and return its general.architecture.

    Raises:
        UserError: not a readable GGUF file, no tensors, or an unsupported architecture.
    """
    gguf = require("gguf", "export")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises many types on a corrupt file
        raise UserError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from None
    if len(reader.tensors) == 0:
        raise UserError(f"{path} is a GGUF file with no tensors; it holds no model weights")
    size = path.stat().st_size
    for tensor in reader.tensors:
        if (tensor.data_offset - reader.data_offset) % reader.alignment:
            raise UserError(f"{path} is not a valid GGUF file (tensor {tensor.name} is not aligned to "
                            f"{reader.alignment} bytes)")
        if tensor.data_offset + int(tensor.n_bytes) > size:
            raise UserError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    field = reader.get_field("general.architecture")
    if field is None:
        raise UserError(f"{path} has no general.architecture field")
    architecture = field.contents()
    if architecture not in _GGUF_ARCHITECTURES:
        supported = ", ".join(sorted(_GGUF_ARCHITECTURES))
        raise UserError(f"{path}: unsupported GGUF architecture {architecture!r}; supported: {supported}")
    return architecture


def gguf_checkpoint_folder(path: Path) -> Path:
    """Return the cached fp32 Hugging Face folder for a GGUF file, converting it on first use."""
    from accullm_export.models.checkpoint import cache_dir

    architecture = gguf_architecture(path)
    digest = sha256_file(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (folder / "config.json").is_file():
        log.info("using cached conversion of %s in %s", path.name, folder)
        return folder
    log.info("dequantizing %s to fp32 (once; cached in %s)", path.name, folder)
    try:
        with atomic_dir(folder, overwrite=True, kind=None) as staging:  # the cache's own folder: no manifest
            _convert(path, architecture, digest, staging)
    except OutputAppeared:  # another run converted the same file meanwhile: use its result
        if not (folder / "config.json").is_file():
            raise
    return folder


def _convert(path: Path, architecture: str, digest: str, out: Path) -> None:
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    safetensors_torch = require("safetensors.torch", "export")
    with _transformers_quiet(transformers):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
        except ImportError as exc:
            raise BackendError(f"loading GGUF needs an optional package: {exc}") from exc
        except Exception as exc:  # the GGUF passed the reader's checks: what transformers refuses is its content
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"transformers could not load {path} ({type(exc).__name__}: {reason})") from None
    tied = bool(model.config.tie_word_embeddings)
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
    config["architectures"] = [_GGUF_ARCHITECTURES[architecture]]
    config["dtype"] = "float32"
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
