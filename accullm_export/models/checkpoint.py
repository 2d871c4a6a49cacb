"""Turn whatever the user names as MODEL into a Hugging Face checkpoint folder and read it.

MODEL is a Hugging Face folder (config.json plus safetensors), a ``.gguf`` file (converted once into the
cache), or the built-in sample name ``smollm2-135m``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from accullm_export.data.json_files import read_json_object
from accullm_export.errors import UserError
from accullm_export.models.architectures import DecoderConfig, decoder_config_from_hf
from accullm_export.models.safetensors_io import SafetensorsCheckpoint
from accullm_export.safe_paths import hf_cache_roots, inside

SAMPLE_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")  # models/sample.py SAMPLE_NAMES; resolved there
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
    tensors: Mapping[str, np.ndarray]

    def tokenizer_files(self) -> dict[str, Path]:
        """The ``TOKENIZER_FILES`` present: name -> resolved path, each a regular file inside the folder (or, for a
        Hugging Face hub cache snapshot, its ``blobs``); a symlink leaving it, a device or a FIFO is a UserError, and
        so is a JSON file that does not parse, since the export would pass it on to every runtime."""
        roots = hf_cache_roots(self.folder)
        files = {name: inside(self.folder, name, what="tokenizer file", roots=roots) for name in TOKENIZER_FILES
                 if os.path.lexists(self.folder / name)}
        for name, path in files.items():
            if name.endswith(".json"):
                read_json_object(path, what=f"tokenizer file {name!r} at")
        if "tokenizer.json" in files:
            _check_tokenizer(files["tokenizer.json"])
        return files


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
    config_path = folder / "config.json"
    hf_config = read_json_object(inside(folder, "config.json", roots=hf_cache_roots(folder)), what="config file")
    try:
        config = decoder_config_from_hf(hf_config)
        config.check_rope()  # checks the rope parameters now, not in the middle of the export
    except UserError as exc:
        raise UserError(f"{config_path}: {exc}") from None
    tensors: Mapping[str, np.ndarray] = SafetensorsCheckpoint(folder)
    check_tensor_shapes(config, tensors, folder)
    if config.traits.fused_projections:
        tensors = SplitProjections(tensors, config)
    return Checkpoint(folder=folder, hf_config=hf_config, config=config, tensors=tensors)


def check_tensor_shapes(config: DecoderConfig, tensors: Mapping[str, np.ndarray], folder: Path) -> None:
    """Refuse, before any graph is built, weights whose shapes or dtypes do not fit config.json, and layers that
    config.json does not count.

    Raises:
        UserError: naming the tensor, its shape and the shape config.json implies.
    """
    for name, shape in expected_shapes(config, tensors).items():
        if name not in tensors:
            continue  # the graph builder names a missing tensor when it needs it
        tensor = tensors[name]
        if tensor.dtype.kind in "biu":  # bool and integers; ml_dtypes' bfloat16 and fp8 report kind V
            raise UserError(f"{folder}: tensor {name!r} holds {tensor.dtype} values; weights must be floating point")
        if tuple(tensor.shape) != shape:
            raise UserError(f"{folder}: tensor {name!r} has shape {list(tensor.shape)}, but config.json implies "
                            f"{list(shape)}")
    extra = sorted({int(match.group(1)) for name in tensors if (match := _LAYER.match(name))
                    and int(match.group(1)) >= config.num_layers})
    if extra:
        raise UserError(f"{folder}: the checkpoint holds weights of layer {extra[0]}, but config.json says "
                        f"num_hidden_layers is {config.num_layers}")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def expected_shapes(config: DecoderConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every weight (and optional bias) the decoder graph reads, as config.json implies it."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "lm_head.weight": (config.vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        projections = {"self_attn.q_proj": (q_width, hidden), "self_attn.k_proj": (kv_width, hidden),
                       "self_attn.v_proj": (kv_width, hidden), "self_attn.o_proj": (hidden, q_width),
                       "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
        if config.traits.fused_projections:
            projections.update({"self_attn.qkv_proj": (q_width + 2 * kv_width, hidden),
                                "mlp.gate_up_proj": (2 * inner, hidden)})
        for module, shape in projections.items():
            shapes[f"{prefix}.{module}.weight"] = shape
            shapes[f"{prefix}.{module}.bias"] = shape[:1]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[f"{prefix}.{norm}.weight"] = (hidden,)
        if config.traits.qk_norm:
            shapes[f"{prefix}.self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[f"{prefix}.self_attn.k_norm.weight"] = (config.head_dim,)
    return shapes


class SplitProjections(Mapping[str, np.ndarray]):
    """A checkpoint whose fused ``qkv_proj`` and ``gate_up_proj`` (Phi-3) read as the separate q/k/v and gate/up
    weights of a Llama layer: row slices of the memory-mapped fused tensors, nothing copied.

    The export writes them as separate MatMuls, so every rewrite pass, recipe pattern (``*q_proj*``) and
    per-layer override sees the same layers on every architecture; ``merge_parallel_linears`` packs them again
    where a backend gains from it.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], config: DecoderConfig):
        self._tensors = tensors
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        inner = config.intermediate_size
        parts = {"self_attn.qkv_proj": (("self_attn.q_proj", 0, q_width),
                                        ("self_attn.k_proj", q_width, q_width + kv_width),
                                        ("self_attn.v_proj", q_width + kv_width, q_width + 2 * kv_width)),
                 "mlp.gate_up_proj": (("mlp.gate_proj", 0, inner), ("mlp.up_proj", inner, 2 * inner))}
        self._slices: dict[str, tuple[str, int, int]] = {}
        for i in range(config.num_layers):
            for fused, pieces in parts.items():
                for kind in ("weight", "bias"):
                    source = f"model.layers.{i}.{fused}.{kind}"
                    if source in tensors:
                        self._slices.update({f"model.layers.{i}.{name}.{kind}": (source, start, stop)
                                             for name, start, stop in pieces})
        self._hidden = {source for source, _, _ in self._slices.values()}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._slices:
            source, start, stop = self._slices[name]
            return self._tensors[source][start:stop]
        if name in self._hidden:
            raise KeyError(name)
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self._tensors if name not in self._hidden)
        yield from self._slices

    def __len__(self) -> int:
        return len(self._tensors) - len(self._hidden) + len(self._slices)


def _check_tokenizer(path: Path) -> None:
    """Refuse a tokenizer.json that the ``tokenizers`` library cannot load."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a bare Exception for every malformed file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"tokenizer file {path} is not a readable tokenizer ({reason})") from None


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if magic != b"GGUF" and path.suffix.lower() == ".gguf":
        raise UserError(f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes)")
    return magic == b"GGUF"
