"""Recipes: the config tree (``config``), named presets shipped as TOML data (``presets``) and the per-layer
plan computed from a recipe and a calibration profile (``plan``)."""

from __future__ import annotations

from accullm_export.recipes.config import Recipe
from accullm_export.recipes.presets import all_presets, get_preset, load_config, preset_names

__all__ = ["Recipe", "all_presets", "get_preset", "load_config", "preset_names"]
