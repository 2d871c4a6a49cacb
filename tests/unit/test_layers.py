"""Module dependencies run one way (STYLE.md, "Layout"): every import of the package is checked against a table.

The checker reads each module's source with ``ast`` (imports inside functions included, relative imports
resolved) and reports ``file:line`` and the rule for each import against the direction. The self-tests at the
end run it on small synthetic sources, so a checker that stopped seeing violations would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "accullm_export"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# top-level modules any layer may import (quant and targets excepted: they take errors only)
HELPERS = frozenset({PACKAGE, "errors", "atomic", "hashing", "packaged_files", "svg", "html_page", "safe_paths",
                     "progress", "resources"})
# layer -> the other layers its modules may import (a layer always imports itself). Read top to bottom, this is
# cli -> build -> {recipes, graph, calibration, sparsity, validate, runtime, targets} -> quant, with the order
# among the middle layers that keeps the table acyclic (see test_the_layer_table_is_acyclic).
LAYERS: dict[str, frozenset[str]] = {
    "cli": frozenset({"build", "models", "recipes", "validate", "sparsity", "calibration", "graph", "runtime",
                      "training", "targets", "quant", "data"}) | HELPERS,
    "build": frozenset({"models", "recipes", "validate", "sparsity", "calibration", "graph", "runtime", "training",
                        "targets", "quant", "data"}) | HELPERS,
    "recipes": frozenset({"sparsity", "calibration", "graph", "training", "targets", "quant", "data"}) | HELPERS,
    "validate": frozenset({"calibration", "graph", "runtime", "targets", "quant", "data"}) | HELPERS,
    "sparsity": frozenset({"calibration", "graph", "runtime", "training", "quant", "data"}) | HELPERS,
    "calibration": frozenset({"graph", "runtime", "quant", "data"}) | HELPERS,
    "models": frozenset({"graph", "quant", "data"}) | HELPERS,
    "graph": frozenset({"runtime", "training", "quant", "data"}) | HELPERS,
    "runtime": frozenset({"data"}) | HELPERS,
    "training": frozenset({"quant"}) | HELPERS,
    "targets": frozenset({"quant", "errors"}),
    "data": HELPERS,
    "quant": frozenset({"errors"}),
    # the helpers sit below every layer: errors at the bottom, the others (and the package's __init__) on it
    **{helper: frozenset({"errors"}) for helper in HELPERS - {"errors"}},
    "errors": frozenset(),
}
PASSES = f"{PACKAGE}.graph.passes"
# quant is pure NumPy: these may not be imported there, not even inside a function or through errors.require
NOT_IN_QUANT = frozenset({"torch", "transformers", "tensorrt"})


def known_modules(package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Dotted names of every module and package under ``package_dir``."""
    names = set()
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to: its first name under the package, or the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``tree``; ``from a import b`` names ``a.b`` when that is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return sorted(set(found))


def required_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of modules loaded by name: ``require("torch", ...)`` or ``importlib.import_module("torch")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("require", "import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return sorted(set(found))


def check_source(source: str, module: str, path: str, known: set[str], is_package: bool = False) -> list[str]:
    """Every import in ``source`` (the module ``module``, read from ``path``) against the direction, one line
    each: ``path:line: rule``."""
    tree = ast.parse(source, filename=path)
    layer = layer_of(module)
    problems = []
    if layer not in LAYERS:
        problems.append(f"{path}:1: {module} is in no layer of the table in tests/unit/test_layers.py; add it")
        return problems
    for line, target in imported_modules(tree, module, is_package, known):
        top = target.split(".")[0]
        if layer == "quant" and top in NOT_IN_QUANT:
            problems.append(f"{path}:{line}: quant is pure NumPy; it may not import {top}")
        if top != PACKAGE:
            continue
        target_layer = layer_of(target)
        if target_layer != layer and target_layer not in LAYERS[layer]:
            allowed = ", ".join(sorted(LAYERS[layer] - HELPERS)) or "no other layer"
            problems.append(f"{path}:{line}: layers: {layer} may not import {target_layer} ({target}); "
                            f"{layer} imports {allowed}" + (" and the helper modules" if HELPERS <= LAYERS[layer]
                                                              else ""))
        in_pass = module.startswith(f"{PASSES}.")
        if in_pass and target.startswith(f"{PASSES}.") and target != module:
            problems.append(f"{path}:{line}: passes never import each other: {module} imports {target}; move what "
                            "they share into a module of graph/")
        if layer == "graph" and not in_pass and module != PASSES and target.startswith(f"{PASSES}."):
            problems.append(f"{path}:{line}: graph's shared helpers sit below the passes: {module} imports {target}")
    if layer == "quant":
        problems += [f"{path}:{line}: quant is pure NumPy; it may not load {name}"
                     for line, name in required_modules(tree) if name.split(".")[0] in NOT_IN_QUANT]
    return problems


def check_package(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The violations of every module under ``package_dir``."""
    known = known_modules(package_dir)
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        relative = path.relative_to(package_dir.parent).as_posix()
        problems += check_source(path.read_text(encoding="utf-8"), module, relative, known, is_package)
    return problems


def test_imports_follow_the_layers():
    problems = check_package()
    assert not problems, "imports against the dependency direction (STYLE.md, Layout):\n" + "\n".join(problems)


def test_the_layer_table_is_acyclic():
    """A cycle in the table would let two layers import each other, which is what the table exists to stop."""
    state: dict[str, str] = {}

    def visit(layer: str, trail: tuple[str, ...]) -> None:
        if state.get(layer) == "done":
            return
        assert state.get(layer) != "open", f"the layer table has a cycle: {' -> '.join(trail + (layer,))}"
        state[layer] = "open"
        for below in sorted(LAYERS[layer] - {layer}):
            visit(below, trail + (layer,))
        state[layer] = "done"

    for layer in LAYERS:
        visit(layer, ())
    assert not any("cli" in allowed for name, allowed in LAYERS.items() if name != "cli"), "nothing imports cli"


# the self-tests: a module set like the package's, and sources that break one rule each
KNOWN = {PACKAGE, f"{PACKAGE}.errors", f"{PACKAGE}.graph", f"{PACKAGE}.graph.rewrite", PASSES,
         f"{PASSES}.first", f"{PASSES}.second", f"{PACKAGE}.sparsity", f"{PACKAGE}.sparsity.plan",
         f"{PACKAGE}.quant", f"{PACKAGE}.quant.symmetric", f"{PACKAGE}.cli", f"{PACKAGE}.cli.main",
         f"{PACKAGE}.build", f"{PACKAGE}.build.engine", f"{PACKAGE}.runtime", f"{PACKAGE}.runtime.base"}


def _check(source: str, module: str, is_package: bool = False) -> list[str]:
    return check_source(source, module, module.replace(".", "/") + ".py", KNOWN, is_package)


def test_the_checker_reports_a_layer_violation_with_file_and_line():
    source = "from __future__ import annotations\n\nfrom accullm_export.sparsity.plan import SparsePlan\n"
    problems = _check(source, f"{PASSES}.first")
    assert len(problems) == 1
    assert problems[0].startswith("accullm_export/graph/passes/first.py:3: layers: graph may not import sparsity")


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    source = ("def run(graph, context):\n"
              "    from accullm_export.graph.passes.second import helper\n"
              "    from . import second\n"
              "    from .. import rewrite\n"
              "    return helper(graph)\n")
    problems = _check(source, f"{PASSES}.first")
    assert [problem.split(": ")[0] for problem in problems] == [f"{PASSES.replace('.', '/')}/first.py:2",
                                                                 f"{PASSES.replace('.', '/')}/first.py:3"]
    assert all("passes never import each other" in problem for problem in problems)


def test_the_checker_reports_cli_build_and_torch_imports():
    assert "layers: runtime may not import build" in _check("import accullm_export.build.engine\n",
                                                             f"{PACKAGE}.runtime.base")[0]
    assert "layers: build may not import cli" in _check("from accullm_export import cli\n",
                                                        f"{PACKAGE}.build.engine")[0]
    torch_in_quant = _check("def train():\n    import torch\n    require('transformers', 'export')\n",
                            f"{PACKAGE}.quant.symmetric")
    assert len(torch_in_quant) == 2 and all("pure NumPy" in problem for problem in torch_in_quant)
    assert "graph's shared helpers sit below the passes" in _check("from accullm_export.graph.passes.first "
                                                                   "import x\n", f"{PACKAGE}.graph.rewrite")[0]


def test_the_checker_accepts_imports_along_the_direction():
    source = ("import numpy as np\n"
              "from accullm_export.errors import UserError\n"
              "from accullm_export.graph.passes import register\n"
              "from accullm_export.graph.rewrite import producer_of\n"
              "from accullm_export.quant.symmetric import quantize\n")
    assert _check(source, f"{PASSES}.first") == []
    assert _check("from accullm_export.graph.passes.first import run\n", f"{PACKAGE}.build.engine") == []
