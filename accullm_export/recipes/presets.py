"""Named presets, shipped as data: one TOML file per preset in ``recipes/presets/``.

A preset file holds a base recipe, per-backend tables that replace keys of it (``[onnxruntime.weights]``,
``[tensorrt.outliers]``), the backends it runs on, and optionally what it measured on the sample
(``[measured]``, shown by ``accullm-export presets``). Resolving it for a backend gives one ``Recipe``.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from accullm_export.errors import UserError
from accullm_export.recipes.config import BACKENDS, Recipe, shown
from accullm_export.recipes.toml_io import read_toml

_PRESET_ONLY = ("description", "backends", "measured") + BACKENDS  # keys that are not part of a resolved recipe


@dataclasses.dataclass(frozen=True)
class Preset:
    """One preset file: its base table, per-backend tables and the measurements it carries."""

    name: str
    description: str
    backends: tuple[str, ...]
    data: Mapping[str, Any]
    measured: Mapping[str, Any]

    def resolve(self, backend: str) -> Recipe:
        """The recipe for ``backend``; UserError when the preset does not run there."""
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend not in self.backends:
            runs = [p.name for p in all_presets().values() if backend in p.backends]
            raise UserError(f"preset {self.name} does not run on {backend} (it runs on {', '.join(self.backends)}); "
                            f"presets for {backend}: {', '.join(runs)}")
        return resolve_table(self.data, backend)


def resolve_table(data: Mapping[str, Any], backend: str) -> Recipe:
    """A recipe from a preset or config table: the base keys, then ``data[backend]``'s tables over them."""
    for name in BACKENDS:
        if name in data and not isinstance(data[name], Mapping):
            raise UserError(f"recipe key {name}: must be a table of keys for the {name} backend, not "
                            f"{shown(data[name])}")
    base = {key: value for key, value in data.items() if key not in _PRESET_ONLY}
    merged = _merge(base, data.get(backend, {}))
    declared = merged.get("backend", backend)
    if declared not in BACKENDS:  # the recipe tree names the key and its choices
        return Recipe.from_dict(merged)
    if declared != backend:
        raise UserError(f"the config was resolved for the {declared} backend, not {backend}; resolve it "
                        f"again with --backend {declared} or --dump-config for {backend}")
    return Recipe.from_dict(merged | {"backend": backend})


def _merge(base: Mapping, over: Mapping) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(
            merged.get(key), Mapping) else value
    return merged


def _preset_files() -> dict[str, Path]:
    folder = resources.files("accullm_export.recipes") / "presets"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".toml")}


def load_preset_file(path: Path) -> Preset:
    """One preset file, checked: its name matches the file, its backends are known, its recipe resolves."""
    data = read_toml(path)
    name = data.get("name")
    if name != path.stem:
        raise UserError(f"preset file {path}: name = {name!r} must match the file name {path.stem!r}")
    backends = tuple(data.get("backends", ()))
    unknown = [b for b in backends if b not in BACKENDS] + [b for b in BACKENDS if b in data and b not in backends]
    if not backends or unknown:
        raise UserError(f"preset file {path}: backends must list some of {', '.join(BACKENDS)} and every backend "
                        f"table it has ({', '.join(unknown) or 'none listed'})")
    preset = Preset(name=name, description=str(data.get("description", "")), backends=backends, data=data,
                    measured=data.get("measured", {}))
    for backend in backends:
        preset.resolve(backend)
    return preset


def all_presets() -> dict[str, Preset]:
    """Every shipped preset by name, in file-name order."""
    return {name: load_preset_file(path) for name, path in sorted(_preset_files().items())}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def get_preset(name: str) -> Preset:
    """The named preset; UserError lists the known ones."""
    files = _preset_files()
    if name not in files:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(sorted(files))} "
                        "(`accullm-export presets`)")
    return load_preset_file(files[name])


def read_config_backend(path: str | Path) -> str | None:
    """The backend a ``--dump-config`` file was resolved for (None: a preset-shaped file, resolved for any)."""
    backend = read_toml(Path(path)).get("backend") if Path(path).is_file() else None
    return backend if isinstance(backend, str) else None


def _check_preset_keys(data: Mapping[str, Any]) -> None:
    """A config file's preset-only keys are not read, but a wrong type there is still a mistake in the file."""
    if not isinstance(data.get("description", ""), str):
        raise UserError(f"recipe key description: must be text, not {shown(data['description'])}")
    if not isinstance(data.get("measured", {}), Mapping):
        raise UserError(f"recipe key measured: must be a table, not {shown(data['measured'])}")
    backends = data.get("backends", [])
    if not isinstance(backends, list) or any(backend not in BACKENDS for backend in backends):
        raise UserError(f"recipe key backends: must be a list of {', '.join(BACKENDS)}, not {shown(backends)}")


def load_config(path: str | Path, backend: str) -> Recipe:
    """A ``--config`` file (a preset-shaped table or a ``--dump-config`` output) resolved for ``backend``."""
    if not str(path):
        raise UserError("--config '': give a file name")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: " + ("not a regular file" if path.exists() else "no such file"))
    data = read_toml(path)
    _check_preset_keys(data)
    data = {key: value for key, value in data.items() if key not in ("description", "backends", "measured")}
    return resolve_table(data, backend)
