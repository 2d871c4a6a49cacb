"""Graph passes: pure functions ``run(graph, config) -> gs.Graph``, registered by name.

Each pass lives in its own module and registers itself with :func:`register`; a second pass under the same
name is a bug and raises. :mod:`accullm_export.graph.pipeline` runs a list of them and logs what each changed.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

PassFunction = Callable[[Any, Any], Any]  # (gs.Graph, config) -> gs.Graph
PASSES: dict[str, PassFunction] = {}
# the TensorRT plugin ops the target-specific swap passes emit: TensorRT's ONNX parser finds a plugin creator by
# op type plus the plugin_version and plugin_namespace string attributes
PLUGIN_DOMAIN = "accullm"
PLUGIN_ATTRIBUTES = {"plugin_version": "1", "plugin_namespace": PLUGIN_DOMAIN}
# modules holding the built-in passes; imported on first lookup so the registry is always complete
BUILTIN_MODULES = ("isolate_outliers", "quantize_weights", "quantize_activations", "scale_activations_awq",
                   "smooth_activations", "compensate_errors_gptq", "quantize_embeddings", "merge_parallel_linears",
                   "skip_sparse_neurons", "fuse_sparse_skip_mlp",
                   "fuse_outlier_split_gemm", "fold_scale_casts", "distill_scales", "fuse_group_query_attention",
                   "fuse_skip_rms_norm", "code_block_scales", "correct_bias", "quantize_outlier_rows",
                   "rotate_inputs", "refine_vocab_rows", "fold_outlier_planes")


def register(name: str) -> Callable[[PassFunction], PassFunction]:
    """Decorator: add a pass to the registry under ``name``."""

    def decorate(function: PassFunction) -> PassFunction:
        if name in PASSES:
            raise ValueError(f"a graph pass named {name!r} is already registered")
        PASSES[name] = function
        return function

    return decorate


def get_pass(name: str) -> PassFunction:
    """The registered pass ``name``; KeyError lists the registered ones."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    if name not in PASSES:
        raise KeyError(f"unknown graph pass {name!r}; registered: {', '.join(sorted(PASSES))}")
    return PASSES[name]
