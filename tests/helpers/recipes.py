"""Recipes for tests, written in one line: ``make_recipe("w4a16", block_size=16, asymmetric=True)``.

Each keyword names one key of the recipe tree (``accullm_export.recipes.config``); the scheme picks the default
layer precision (and, for w8a8, INT8 activations, static unless ``activations`` says dynamic).
"""

from __future__ import annotations

from accullm_export.recipes.config import Recipe

# keyword -> (section, key) of the recipe tree
KEYS = {
    "block_size": ("weights", "block_size"), "scale_search": ("weights", "scale_search"),
    "asymmetric": ("weights", "asymmetric"), "scale_bits": ("weights", "scale_bits"), "awq": ("weights", "awq"),
    "overrides": ("weights", "overrides"), "embeddings": ("weights", "embeddings"),
    "activations": ("activations", "mode"), "activation_group": ("activations", "group"),
    "smoothquant": ("activations", "smoothquant"),
    "outliers": ("outliers", "channels"), "policy": ("outliers", "policy"), "outlier_layers": ("outliers", "layers"),
    "min_outliers": ("outliers", "min_channels"), "outlier_bits": ("outliers", "bits"),
    "outlier_planes": ("outliers", "planes"),
    "gptq": ("gptq", "enabled"), "gptq_samples": ("gptq", "samples"),
    "distill_steps": ("distill", "steps"), "distill_norms": ("distill", "norms"),
    "distill_outlier_rows": ("distill", "outlier_rows"), "distill_lr": ("distill", "lr"),
    "distill_samples": ("distill", "samples"), "distill_precision": ("distill", "precision"),
    "distill_weight_steps": ("distill", "weight_steps"),
    "rotate": ("rotation", "layers"), "refine_vocab": ("vocab", "refine_rows"), "vocab_samples": ("vocab", "samples"),
    "sparsity": ("sparsity", "fraction"), "method": ("sparsity", "method"),
    "predictor_rank": ("sparsity", "predictor_rank"), "predictor_samples": ("sparsity", "predictor_samples"),
    "predictor_steps": ("sparsity", "predictor_steps"), "dense_first_token": ("sparsity", "dense_first_token"),
    "onnxruntime_fusions": ("graph", "onnxruntime_fusions"),
}
SCHEMES = {"w4a16": "int4", "w8a8": "int8", "fp16": "fp16"}


def make_recipe(name: str = "w4a16", *, backend: str = "onnxruntime", **keys) -> Recipe:
    """A recipe of scheme ``name`` (w4a16, w8a8, fp16) with the given keys set (UserError as the tree raises)."""
    data: dict = {"name": name, "backend": backend, "weights": {"precision": SCHEMES[name]}}
    if name == "w8a8":
        data["activations"] = {"mode": "static"}
    for keyword, value in keys.items():
        if keyword == "policy" and value is None:
            value = "profile"
        section, key = KEYS[keyword]
        data.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    return Recipe.from_dict(data)


def write_config(path, recipe: Recipe | dict) -> str:
    """``recipe`` written as a ``--config`` file at ``path`` (the form ``quantize --dump-config`` prints), or a
    table of keys as it is (a file the kit should refuse); returns the path as a string for the command line."""
    from pathlib import Path

    from accullm_export.recipes.toml_io import dump_toml

    Path(path).write_text(dump_toml(recipe if isinstance(recipe, dict) else recipe.to_dict()))
    return str(path)
