"""Turn whatever the user names as MODEL into a Hugging Face checkpoint folder and read it.

MODEL is a Hugging Face folder (config.json plus safetensors), a ``.gguf`` file (converted once into the
cache), or the built-in sample name ``smollm2-135m``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from accullm_export.errors import UserError
from accullm_export.models.architectures import DecoderConfig, decoder_config_from_hf
from accullm_export.models.safetensors_io import SafetensorsCheckpoint
from accullm_export.safe_paths import hf_cache_roots, inside

SAMPLE_MODELS = ("smollm2-135m",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face checkpoint folder, its parsed config and its memory-mapped tensors."""

    folder: Path
    hf_config: dict
    config: DecoderConfig
    tensors: SafetensorsCheckpoint

    def tokenizer_files(self) -> dict[str, Path]:
        """The ``TOKENIZER_FILES`` present: name -> resolved path, each a regular file inside the folder (or, for a
        Hugging Face hub cache snapshot, its ``blobs``); a symlink leaving it, a device or a FIFO is a UserError."""
        roots = hf_cache_roots(self.folder)
        return {name: inside(self.folder, name, what="tokenizer file", roots=roots) for name in TOKENIZER_FILES
                if os.path.lexists(self.folder / name)}


def cache_dir() -> Path:
    """The user's cache folder for converted checkpoints: $ACCULLM_CACHE, else $XDG_CACHE_HOME/accullm-export."""
    if os.environ.get("ACCULLM_CACHE"):
        return Path(os.environ["ACCULLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "accullm-export"


def resolve_checkpoint_folder(model: str) -> Path:
    """Map MODEL (sample name, .gguf file or folder) to a Hugging Face checkpoint folder.

    Raises:
        UserError: the path is missing or is not a model this kit can read.
    """
    if model in SAMPLE_MODELS:
        from accullm_export.models.sample import sample_checkpoint_folder

        return sample_checkpoint_folder(model)
    path = Path(model)
    if not path.exists():
        raise UserError(f"{model}: no such file or folder (expected a Hugging Face folder, a .gguf file "
                        f"or one of the samples: {', '.join(SAMPLE_MODELS)})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a Hugging Face checkpoint folder: it has no config.json")
        return path
    if _is_gguf(path):
        from accullm_export.models.gguf_convert import gguf_checkpoint_folder

        return gguf_checkpoint_folder(path)
    if path.suffix == ".onnx":
        raise UserError(f"{model} is already an ONNX model; export takes a Hugging Face folder, a .gguf file "
                        "or a sample name")
    raise UserError(f"{model} is not a model: expected a Hugging Face folder, a .gguf file or a sample name")


def load_checkpoint(model: str) -> Checkpoint:
    """Resolve MODEL and read its config and tensors (memory-mapped, nothing copied yet)."""
    folder = resolve_checkpoint_folder(model)
    try:
        hf_config = json.loads(inside(folder, "config.json", roots=hf_cache_roots(folder)).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object")
    config = decoder_config_from_hf(hf_config)
    return Checkpoint(folder=folder, hf_config=hf_config, config=config, tensors=SafetensorsCheckpoint(folder))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"
