"""The calibration profile: a versioned ``manifest.json``, ``statistics.npz`` and ``feeds.npz``.

Later steps load it with the model they are about to rewrite; a profile measured on another model (a
different SHA-256 of the graph and its weights) is refused with a clear error. ``feeds.npz`` holds the
calibration inputs themselves, as data (its SHA-256 in the manifest): steps that need the batches again (GPTQ,
distillation, guesser training) read them from there and never re-read or re-run the source the manifest names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from accullm_export.errors import UserError
from accullm_export.hashing import sha256_file
from accullm_export.safe_paths import inside

MANIFEST, ARRAYS, FEEDS = "manifest.json", "statistics.npz", "feeds.npz"
PROFILE_KIND, PROFILE_VERSION = "accullm-export/profile", 1


def model_fingerprint(model_path: str | Path) -> str:
    """SHA-256 over the graph file and its external-data files (by name and content)."""
    import hashlib

    import onnx

    from accullm_export.graph.io import external_data_files

    path = Path(model_path)
    path = path / "model.onnx" if path.is_dir() else path
    model = onnx.load(str(path), load_external_data=False)
    files = external_data_files(model, path.parent, path)  # checked before anything is hashed
    digest = hashlib.sha256(sha256_file(path).encode())
    for location in sorted(files):
        digest.update(location.encode())
        digest.update(sha256_file(files[location]).encode())
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


def feeds_archive(arrays: dict[str, np.ndarray]) -> tuple[bytes, str]:
    """``arrays`` as the bytes of ``feeds.npz`` (no pickles) and their SHA-256.

    Raises:
        UserError: an array of Python objects (it could only be stored as a pickle).
    """
    for key, value in arrays.items():
        if value.dtype.hasobject:
            raise UserError(f"calibration input {key} is an array of Python objects; feeds must be numeric arrays")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def write_profile(folder: Path, manifest: dict, arrays: dict[str, np.ndarray], feeds: bytes) -> None:
    """Write the three files into ``folder`` (the caller makes the folder appear atomically); ``feeds`` is
    :func:`feeds_archive`'s bytes, whose hash is ``manifest["feeds"]["sha256"]``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    (folder / ARRAYS).write_bytes(buffer.getvalue())
    (folder / FEEDS).write_bytes(feeds)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_feeds(profile: Profile) -> dict[str, np.ndarray]:
    """The arrays of the profile's ``feeds.npz``, checked against the SHA-256 in its manifest; never a pickle.

    Raises:
        UserError: no stored feeds (a profile from an older version), a hash mismatch, or an unreadable file.
    """
    recorded = profile.manifest.get("feeds")
    path = profile.folder / FEEDS
    rerun = f"re-run `accullm-export calibrate` to make a new profile in place of {profile.folder}"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str) or not path.is_file():
        raise UserError(f"profile {profile.folder} holds no calibration inputs ({FEEDS}); {rerun}")
    data = inside(profile.folder, FEEDS, what="profile file").read_bytes()  # hashed and parsed from these bytes
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise UserError(f"{path} does not match the SHA-256 in its manifest (changed or corrupted); {rerun}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(f"{path} holds a pickled object array; feeds are read as plain arrays only") from None
        raise UserError(f"{path}: unreadable calibration inputs ({exc}); {rerun}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: unreadable calibration inputs ({exc}); {rerun}") from None


def load_profile(folder: str | Path, model_path: str | Path | None = None) -> Profile:
    """Load a profile; with ``model_path``, refuse one that was measured on a different model.

    Raises:
        UserError: missing or foreign files, an unknown version, or a model hash mismatch.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / ARRAYS).is_file():
        raise UserError(f"{folder} is not a calibration profile (expected {MANIFEST} and {ARRAYS})")
    manifest_path, arrays_path = (inside(folder, name, what="profile file") for name in (MANIFEST, ARRAYS))
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as data:
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
