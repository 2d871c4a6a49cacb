"""The calibration profile: a versioned ``manifest.json`` plus ``statistics.npz``.

Later steps load it with the model they are about to rewrite; a profile measured on another model (a
different SHA-256 of the graph and its weights) is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from accullm_export.errors import UserError
from accullm_export.hashing import sha256_file

MANIFEST, ARRAYS = "manifest.json", "statistics.npz"
PROFILE_KIND, PROFILE_VERSION = "accullm-export/profile", 1


def model_fingerprint(model_path: str | Path) -> str:
    """SHA-256 over the graph file and its external-data files (by name and content)."""
    import hashlib

    import onnx

    path = Path(model_path)
    path = path / "model.onnx" if path.is_dir() else path
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                        if entry.key == "location"})
    digest = hashlib.sha256(sha256_file(path).encode())
    for location in locations:
        digest.update(location.encode())
        digest.update(sha256_file(path.parent / location).encode())
    return digest.hexdigest()


@dataclasses.dataclass
class Profile:
    """A loaded profile: the manifest and the arrays (``<input index>.<statistic>``)."""

    folder: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    def input_statistics(self, tensor: str) -> dict[str, np.ndarray]:
        index = next(i for i, entry in enumerate(self.manifest["inputs"]) if entry["name"] == tensor)
        prefix = f"{index}."
        return {key[len(prefix):]: value for key, value in self.arrays.items() if key.startswith(prefix)}

    def outliers(self, layer: str, policy: str | None = None) -> list[int]:
        """The outlier channels of a layer, for the chosen policy unless another is named."""
        entry = next((item for item in self.manifest["layers"] if item["node"] == layer), None)
        if entry is None:
            raise UserError(f"profile {self.folder} has no layer {layer!r}")
        return entry["candidates"][policy or self.manifest["policy"]["name"]]


def write_profile(folder: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the two files into ``folder`` (the caller makes the folder appear atomically)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    (folder / ARRAYS).write_bytes(buffer.getvalue())
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def load_profile(folder: str | Path, model_path: str | Path | None = None) -> Profile:
    """Load a profile; with ``model_path``, refuse one that was measured on a different model.

    Raises:
        UserError: missing or foreign files, an unknown version, or a model hash mismatch.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / ARRAYS).is_file():
        raise UserError(f"{folder} is not a calibration profile (expected {MANIFEST} and {ARRAYS})")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        with np.load(folder / ARRAYS) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise UserError(f"{folder}: unreadable profile ({exc})") from None
    if manifest.get("kind") != PROFILE_KIND or manifest.get("version") != PROFILE_VERSION:
        raise UserError(f"{folder}: not a version-{PROFILE_VERSION} accullm-export profile")
    if model_path is not None:
        expected = manifest["model"]["sha256"]
        actual = model_fingerprint(model_path)
        if actual != expected:
            raise UserError(f"profile {folder} was measured on another model ({manifest['model']['path']}, "
                            f"sha256 {expected[:12]}...), not {model_path} (sha256 {actual[:12]}...)")
    return Profile(folder=folder, manifest=manifest, arrays=arrays)
