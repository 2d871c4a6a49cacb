"""Graph passes: functions ``run(graph, config) -> PassResult`` (or a bare ``gs.Graph``), registered by name
with the frozen ``Config`` dataclass they take (None for a pass that reads nothing but the graph).

Each pass lives in its own module of this package and registers itself with :func:`register`; the modules are
discovered by listing the package, and a second pass under the same name is a bug and raises. :mod:`accullm_export.graph.pipeline` runs a list of them and logs what each changed.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

PassFunction = Callable[[Any, Any], Any]  # (gs.Graph, config) -> PassResult | gs.Graph
PASSES: dict[str, PassFunction] = {}
CONFIGS: dict[str, type | None] = {}  # pass name -> its config class
# the TensorRT plugin ops the target-specific swap passes emit: TensorRT's ONNX parser finds a plugin creator by
# op type plus the plugin_version and plugin_namespace string attributes
PLUGIN_DOMAIN = "accullm"
PLUGIN_ATTRIBUTES = {"plugin_version": "1", "plugin_namespace": PLUGIN_DOMAIN}


def register(name: str, config: type | None = None) -> Callable[[PassFunction], PassFunction]:
    """Decorator: add a pass to the registry under ``name``, taking a ``config`` instance."""

    def decorate(function: PassFunction) -> PassFunction:
        if name in PASSES:
            raise ValueError(f"a graph pass named {name!r} is already registered")
        PASSES[name], CONFIGS[name] = function, config
        return function

    return decorate


def discover() -> None:
    """Import every module of this package, so each built-in pass registers itself (no second list to keep)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def get_pass(name: str) -> PassFunction:
    """The registered pass ``name``; KeyError lists the registered ones."""
    discover()
    if name not in PASSES:
        raise KeyError(f"unknown graph pass {name!r}; registered: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def pass_config(name: str) -> type | None:
    """The config class the registered pass ``name`` takes (None: it takes none)."""
    get_pass(name)
    return CONFIGS[name]
