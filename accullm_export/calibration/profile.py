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
import zlib
from pathlib import Path

import numpy as np

from accullm_export.calibration.stats import MagnitudeHistogram
from accullm_export.data.json_files import read_json_object
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
    return _read_arrays(path, rerun, data)


def _read_arrays(path: Path, rerun: str, data: bytes | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive (``data``, else the file's bytes); never a pickle.

    Raises:
        UserError: not a zip archive, a truncated or corrupt one, an entry that is not an array, or a pickle.
    """
    try:
        data = path.read_bytes() if data is None else data
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); {rerun}") from None
    if not data.startswith(b"PK"):  # np.load would take anything else for a pickle or a bare .npy
        raise UserError(f"{path} is not an .npz archive (truncated or another kind of file); {rerun}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(f"{path} holds a pickled object array; arrays are read as plain data only") from None
        raise UserError(f"{path}: unreadable arrays ({exc}); {rerun}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise UserError(f"{path}: unreadable arrays ({type(exc).__name__}: {exc}); {rerun}") from None


# per-channel statistics of every measured input (stats.ChannelStatistics.finish), each [channels], finite, >= 0
CHANNEL_STATISTICS = ("absmax", "p999", "mean_abs", "second_moment", "over_threshold", "sink_absmax", "sink_mean_abs")


def check_profile(folder: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Refuse a profile whose manifest or statistics do not hold what quantize, sparsify and build read from it,
    so that a damaged file ends the command here with its name, not deep inside a rewrite.

    Raises:
        UserError: naming the profile, the entry or array, and what is wrong with it.
    """
    def fail(problem: str) -> None:
        raise UserError(f"profile {folder}: {problem}; re-run `accullm-export calibrate` to make a new profile")

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    model, policy = manifest.get("model"), manifest.get("policy")
    if not isinstance(model, dict) or not all(isinstance(model.get(key), str) for key in ("sha256", "path")):
        fail("its manifest's model entry is not {path, sha256}")
    if not isinstance(policy, dict) or not isinstance(policy.get("name"), str):
        fail("its manifest's policy entry has no name")
    inputs, layers = manifest.get("inputs"), manifest.get("layers")
    if not isinstance(inputs, list) or not all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                               and is_count(entry.get("channels")) for entry in inputs):
        fail("its manifest's inputs are not a list of {name, channels}")
    for index, entry in enumerate(inputs):
        for statistic in CHANNEL_STATISTICS:
            value = arrays.get(f"{index}.{statistic}")
            if value is None:
                fail(f"{ARRAYS} lacks {statistic} of input {entry['name']!r}")
            if value.dtype.kind not in "iuf" or value.shape != (entry["channels"],) or not np.all(np.isfinite(value)) \
                    or np.any(value < 0):
                fail(f"{ARRAYS}: {statistic} of input {entry['name']!r} is not {entry['channels']} finite, "
                     f"non-negative numbers (it is {value.dtype} {list(value.shape)})")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        fail("its manifest's layers are not a list of objects")
    for layer in layers:
        problem = _layer_problem(layer, inputs, policy["name"], arrays)
        if problem:
            fail(f"layer {layer.get('node')!r} {problem}")
    if not isinstance(manifest.get("sparsity", {}), dict):
        fail("its manifest's sparsity entry is not an object")


def _layer_problem(layer: dict, inputs: list[dict], policy: str, arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with one layer entry of a profile manifest, or None."""
    def channels(value, limit: int) -> bool:
        return isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < limit
                                               for c in value)

    if not all(isinstance(layer.get(key), str) for key in ("node", "input", "weight")):
        return "lacks its node, input or weight name"
    index = layer.get("input_index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(inputs) \
            or inputs[index]["name"] != layer["input"]:
        return f"names input_index {index!r}, which is not its input {layer['input']!r}"
    width = inputs[index]["channels"]
    if layer.get("in_features") != width or not isinstance(layer.get("out_features"), int):
        return f"has in_features {layer.get('in_features')!r}, but its input has {width} channels"
    candidates = layer.get("candidates")
    if not channels(layer.get("outliers"), width) or not isinstance(candidates, dict) or policy not in candidates \
            or not all(channels(chosen, width) for chosen in candidates.values()):
        return f"has outlier channels that are not lists of channel numbers under {width} (policy {policy!r} included)"
    histogram, bins = arrays.get(f"{index}.magnitude_histogram"), MagnitudeHistogram().counts.size
    if histogram is not None and (histogram.dtype.kind not in "iu" or histogram.shape != (bins,)
                                  or np.any(histogram < 0)):
        return f"has a magnitude histogram that is not {bins} non-negative counts"
    return None


def load_profile(folder: str | Path, model_path: str | Path | None = None) -> Profile:
    """Load a profile; with ``model_path``, refuse one that was measured on a different model.

    Raises:
        UserError: missing or foreign files, an unknown version, or a model hash mismatch.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / ARRAYS).is_file():
        raise UserError(f"{folder} is not a calibration profile (expected {MANIFEST} and {ARRAYS})")
    manifest_path, arrays_path = (inside(folder, name, what="profile file") for name in (MANIFEST, ARRAYS))
    manifest = read_json_object(manifest_path, what="profile manifest")
    if manifest.get("kind") != PROFILE_KIND or manifest.get("version") != PROFILE_VERSION:
        raise UserError(f"{folder}: not a version-{PROFILE_VERSION} accullm-export profile")
    arrays = _read_arrays(arrays_path, f"re-run `accullm-export calibrate` to make a new profile in place of {folder}")
    check_profile(folder, manifest, arrays)
    if model_path is not None:
        expected = manifest["model"]["sha256"]
        actual = model_fingerprint(model_path)
        if actual != expected:
            raise UserError(f"profile {folder} was measured on another model ({manifest['model']['path']}, "
                            f"sha256 {expected[:12]}...), not {model_path} (sha256 {actual[:12]}...)")
    return Profile(folder=folder, manifest=manifest, arrays=arrays)
