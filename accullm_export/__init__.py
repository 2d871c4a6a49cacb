"""accullm-export: export, outlier-aware quantization and edge deployment of LLMs.

Importing the package needs only the core dependencies; torch, transformers and TensorRT are imported
inside the functions that use them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from accullm_export.errors import AccuLLMError, AccuracyError, BackendError, UserError

__all__ = ["AccuLLMError", "AccuracyError", "BackendError", "UserError", "__version__"]
