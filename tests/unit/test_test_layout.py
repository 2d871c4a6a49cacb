"""The test suite's own layout: no test module imports another (shared code lives in tests/helpers), helpers are
never collected, every skip says why, and every registered marker marks real tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TESTS = Path(__file__).resolve().parents[1]
PYPROJECT = TESTS.parent / "pyproject.toml"
TEST_PACKAGES = ("tests.unit", "tests.integration", "tests.gpu")
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def _package(path: Path) -> str:
    """The dotted package a file under tests/ belongs to, e.g. "tests.unit"."""
    return ".".join(("tests", *path.relative_to(TESTS).parent.parts))


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    if any(part == "conftest" or part.startswith("test_") for part in parts):
        return True  # also catches rootdir-relative names such as ``unit.test_quantize`` or ``conftest``
    return any(name == package or name.startswith(package + ".") for package in TEST_PACKAGES)


def imported_test_modules(source: str, package: str) -> list[str]:
    """The test modules (or test packages) that ``source``, a module of ``package``, imports anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if _is_test_module(base):
                found.append(base)
            else:
                found += [f"{base}.{alias.name}" for alias in node.names if _is_test_module(f"{base}.{alias.name}")]
    return found


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _says_why(value: ast.AST | None) -> bool:
    return value is not None and not (isinstance(value, ast.Constant) and not value.value)


def skips_without_reason(source: str) -> list[int]:
    """Lines of ``source`` with a pytest skip (skip, importorskip, mark.skip, mark.skipif) that gives no reason."""
    tree = ast.parse(source)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in called:
            if _dotted(node) in ("pytest.mark.skip", "pytest.mark.skipif"):
                lines.append(node.lineno)  # a bare decorator: no reason at all
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if name in ("pytest.skip", "pytest.mark.skip"):
            reason = node.args[0] if node.args else keywords.get("reason", keywords.get("msg"))
        elif name in ("pytest.importorskip", "pytest.mark.skipif"):
            reason = keywords.get("reason")
        else:
            continue
        if not _says_why(reason):
            lines.append(node.lineno)
    return sorted(lines)


def used_marks(source: str) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and _dotted(node.value) == "pytest.mark"}


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(TESTS.rglob("*.py"))}


def test_no_test_module_imports_another():
    offenders = {str(path.relative_to(TESTS)): found for path, source in _sources().items()
                 if (found := imported_test_modules(source, _package(path)))}
    assert not offenders, f"move what these share into tests/helpers: {offenders}"


@pytest.mark.parametrize("source, package", [
    ("from tests.unit.test_quantize import one_layer_graph\n", "tests.unit"),
    ("import tests.unit.test_validate\n", "tests.unit"),
    ("from tests.conftest import PLANTED\n", "tests.unit"),
    ("from tests import conftest\n", "tests.unit"),
    ("from tests.unit import test_distill\n", "tests.unit"),
    ("from tests.integration.test_sample_model import run\n", "tests.helpers"),
    ("from .test_asymmetric import np_round_asymmetric\n", "tests.unit"),
    ("from ..conftest import TEXT\n", "tests.unit"),
    ("from unit.test_quantize import plan_for\n", "tests.unit"),
    ("def test_a():\n    from tests.gpu.test_plugin_kernels import ssm\n", "tests.unit"),
])
def test_the_import_detector_flags_a_test_module_import(source, package):
    assert imported_test_modules(source, package)


def test_the_import_detector_passes_helpers_and_the_package():
    source = ("import numpy as np\nfrom tests.helpers.graphs import ort_logits\nfrom tests.helpers import models\n"
              "from accullm_export.graph.layer_plan import Recipe\n")
    assert imported_test_modules(source, "tests.unit") == []


def test_helpers_are_not_collected():
    helpers = TESTS / "helpers"
    assert (helpers / "__init__.py").is_file()
    collected = [path.name for path in helpers.rglob("*.py")
                 if path.name.startswith("test_") or path.stem.endswith("_test") or path.name == "conftest.py"]
    assert not collected


def test_every_skip_says_why():
    offenders = {str(path.relative_to(TESTS)): lines for path, source in _sources().items()
                 if (lines := skips_without_reason(source))}
    assert not offenders


def test_the_skip_detector_flags_a_skip_without_reason():
    source = ('import pytest\npytest.skip()\npytest.skip("")\npytest.importorskip("torch")\n'
              '@pytest.mark.skipif(True)\ndef test_a():\n    pass\n@pytest.mark.skip\ndef test_b():\n    pass\n'
              'pytest.skip("no GPU")\npytest.skip(f"{1} missing")\npytest.importorskip("torch", reason="extra")\n'
              '@pytest.mark.skipif(True, reason="why")\ndef test_c():\n    pass\n')
    assert skips_without_reason(source) == [2, 3, 4, 5, 8]


def test_every_registered_marker_marks_tests():
    registered = {line.split(":")[0].strip()
                  for line in tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    used = set().union(*(used_marks(source) for source in _sources().values())) - BUILTIN_MARKS
    assert registered == used
