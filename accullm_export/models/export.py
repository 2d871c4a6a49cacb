"""``export``: a checkpoint (Hugging Face folder, GGUF file or sample) to an ONNX folder with a KV cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.hashing import sha256_file
from accullm_export.errors import UserError
from accullm_export.models.checkpoint import Checkpoint, load_checkpoint
from accullm_export.models.decoder_graph import ATTENTION_OPSETS, DecoderGraphBuilder
from accullm_export.models.genai_config import genai_config
from accullm_export.models.onnx_writer import OnnxWriter, save_model

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_KIND, MANIFEST_VERSION = "accullm-export/export", 1


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it holds."""

    out_dir: Path
    model_path: Path
    num_layers: int
    num_parameters: int
    seconds: float


def export_model(model: str, out_dir: str | Path, *, dtype: str = "fp32", attention: str = "fused",
                 overwrite: bool = False) -> ExportResult:
    """Export MODEL to ``out_dir``: model.onnx (+ external data), tokenizer, genai_config.json, manifest.json.

    The folder appears only when everything succeeded; on any error nothing is left behind.

    Raises:
        UserError: bad MODEL, unsupported architecture, unknown dtype or a non-empty output folder.
    """
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_output(out_dir, MANIFEST_KIND, overwrite, protected=[model])
    with atomic_dir(out_dir, overwrite=overwrite, kind=MANIFEST_KIND, protected=[model]) as staging:
        checkpoint = load_checkpoint(model)
        tokenizer_files = checkpoint.tokenizer_files()  # checked before the heavy work
        log.info("exporting %s (%s, %d layers) as %s", checkpoint.folder, checkpoint.config.model_type,
                 checkpoint.config.num_layers, dtype)
        with open(staging / DATA_FILE, "wb") as data_file:
            writer = OnnxWriter(data_file, DATA_FILE)
            builder = DecoderGraphBuilder(checkpoint.config, checkpoint.tensors, writer, EXPORT_DTYPES[dtype],
                                          attention)
            builder.build()
        manifest = _manifest(checkpoint, model, dtype, attention)
        save_model(writer, builder.input_infos(), builder.output_infos(), staging / MODEL_FILE,
                   ATTENTION_OPSETS[attention],
                   producer="accullm-export", metadata={"accullm.manifest": json.dumps(manifest)})
        onnx.checker.check_model(str(staging / MODEL_FILE))
        for name, path in tokenizer_files.items():
            shutil.copy2(path, staging / name)
        if not (staging / "tokenizer.json").is_file():
            log.warning("%s has no tokenizer.json: text generation and onnxruntime-genai need one", checkpoint.folder)
        (staging / "genai_config.json").write_text(json.dumps(genai_config(checkpoint.config), indent=4))
        (staging / "config.json").write_text(json.dumps(checkpoint.hf_config, indent=2))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        num_parameters = sum(int(np.prod(t.dims)) for t in writer.initializers)
    seconds = time.perf_counter() - started
    log.info("exported %s in %.1f s", out_dir / MODEL_FILE, seconds)
    return ExportResult(out_dir=out_dir, model_path=out_dir / MODEL_FILE, num_layers=checkpoint.config.num_layers,
                        num_parameters=num_parameters, seconds=seconds)


def _manifest(checkpoint: Checkpoint, model: str, dtype: str, attention: str) -> dict:
    import onnxruntime

    return {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "source": model,
        "checkpoint_folder": str(checkpoint.folder),
        "input_hashes": {path.name: sha256_file(path) for path in sorted(checkpoint.folder.glob("*.safetensors"))},
        "model_type": checkpoint.config.model_type,
        "dtype": dtype,
        "attention": attention,
        "opset": ATTENTION_OPSETS[attention],
        "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }
