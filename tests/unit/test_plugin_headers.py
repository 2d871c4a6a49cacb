"""The IPluginV3 wrappers and the C++ sample compiled against TensorRT's own headers, 10.3 and 11.1, as CI does.

The headers live beside the checkout (``<repo>/../shared/tensorrt/<version>/include``, no libraries), so CMake
builds in its headers-only mode (``ACCULLM_TENSORRT_HEADERS_ONLY``) with ``ACCULLM_WARNINGS_AS_ERRORS``:
``-Wall -Wextra -Werror`` for our sources, TensorRT's include folder as a system one. The kernels are compiled
for sm_87 only, once: every configuration shares one build folder and only the wrappers recompile. Nothing here
loads TensorRT or needs a GPU; users build fully on the device (plugins/README.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
SAMPLE = REPO / "samples" / "cpp"
TENSORRT_HEADERS = REPO.parent / "shared" / "tensorrt"
VERSIONS = ("10.3", "11.1")
ENTRY_POINTS = {"getCreators", "setLoggerFinder"}
STATIC_REGISTRARS = ("pluginRegistrarOutlierSplitGemmPluginCreator", "pluginRegistrarSparseSkipMLPPluginCreator")
TOOLS = {name: shutil.which(name) for name in ("cmake", "nvcc", "nm")}

pytestmark = pytest.mark.skipif(
    None in TOOLS.values(),
    reason=f"needs cmake, nvcc and nm on PATH; missing: {[name for name, path in TOOLS.items() if path is None]}")


def _include_dir(version: str) -> Path:
    """TensorRT <version>'s include folder; skips the test (saying where it looked) when it is absent."""
    include = TENSORRT_HEADERS / version / "include"
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT {version} headers not found at {include} (the shared folder beside the checkout "
                    "that CI provides)")
    return include


def _run(command: list, cwd: Path | None = None) -> str:
    """stdout + stderr of command; fails the test with them when it exits nonzero."""
    run = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True)
    output = run.stdout + run.stderr
    if run.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {run.returncode}:\n{output[-6000:]}")
    return output


def _warnings(log: str) -> list[str]:
    """The log's warning lines (compiler, nvcc, linker, CMake)."""
    return [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]


def _symbols(library: Path, *flags: str) -> set[str]:
    listing = _run([TOOLS["nm"], *flags, library])
    return {line.split()[-1].split("@")[0] for line in listing.splitlines() if line.strip()}


@dataclass(frozen=True)
class PluginBuild:
    library: Path  # a copy of libaccullm_plugins.so, kept after the shared build folder is reconfigured
    log: str  # configure + build output


class PluginBuilds:
    """libaccullm_plugins.so per (TensorRT version, static registration), built on first request."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.build_dir = folder / "build"
        self.done: dict[tuple[str, bool], PluginBuild] = {}

    def get(self, version: str, static_registration: bool) -> PluginBuild:
        key = (version, static_registration)
        if key not in self.done:
            self.done[key] = self._build(_include_dir(version).parent, static_registration)
        return self.done[key]

    def _build(self, tensorrt_root: Path, static_registration: bool) -> PluginBuild:
        log = _run([TOOLS["cmake"], "-S", PLUGINS, "-B", self.build_dir, "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_CUDA_ARCHITECTURES=87", f"-DTensorRT_ROOT={tensorrt_root}",
                    "-DACCULLM_TENSORRT_HEADERS_ONLY=ON", "-DACCULLM_WARNINGS_AS_ERRORS=ON",
                    f"-DACCULLM_STATIC_REGISTRATION={'ON' if static_registration else 'OFF'}"])
        log += _run([TOOLS["cmake"], "--build", self.build_dir, "--target", "accullm_plugins", "--parallel", "2"])
        copy = self.folder / f"{tensorrt_root.name}-{'static' if static_registration else 'dynamic'}"
        copy.mkdir()
        library = Path(shutil.copy2(self.build_dir / "libaccullm_plugins.so", copy))
        return PluginBuild(library, log)


@pytest.fixture(scope="module")
def plugin_builds(tmp_path_factory) -> PluginBuilds:
    return PluginBuilds(tmp_path_factory.mktemp("plugin-headers"))


@pytest.mark.parametrize("version", VERSIONS)
def test_plugin_library_compiles_warning_free_and_exports_the_entry_points(plugin_builds, version):
    include = _include_dir(version)
    build = plugin_builds.get(version, static_registration=False)

    assert f"TensorRT headers {include}, headers only" in build.log  # this version's headers, not a cached one
    assert _warnings(build.log) == []
    exported = _symbols(build.library, "-D", "--defined-only")
    assert ENTRY_POINTS <= exported
    assert {"accullm_outlier_split_gemm", "accullm_sparse_skip_mlp"} <= exported  # the kernels are inside
    assert not any(name.startswith("_ZN7accullm") for name in exported)  # the wrappers' C++ stays hidden
    # without static registration nothing calls into libnvinfer at load time
    assert "getPluginRegistry" not in _symbols(build.library, "-D", "--undefined-only")


@pytest.mark.parametrize("version", VERSIONS)
def test_static_registration_adds_the_registrars(plugin_builds, version):
    _include_dir(version)
    build = plugin_builds.get(version, static_registration=True)

    assert _warnings(build.log) == []
    assert ENTRY_POINTS <= _symbols(build.library, "-D", "--defined-only")
    # REGISTER_TENSORRT_PLUGIN: a static PluginRegistrar per creator, whose constructor calls getPluginRegistry()
    assert "getPluginRegistry" in _symbols(build.library, "-D", "--undefined-only")
    local_symbols = _run([TOOLS["nm"], "-C", build.library])
    for registrar in STATIC_REGISTRARS:
        assert registrar in local_symbols


@pytest.mark.parametrize("version", VERSIONS)
def test_cpp_sample_compiles_warning_free(tmp_path, version):
    include = _include_dir(version)
    log = _run([TOOLS["cmake"], "-S", SAMPLE, "-B", tmp_path, f"-DTensorRT_ROOT={include.parent}",
                "-DACCULLM_TENSORRT_HEADERS_ONLY=ON", "-DACCULLM_WARNINGS_AS_ERRORS=ON"])
    log += _run([TOOLS["cmake"], "--build", tmp_path])

    assert f"TensorRT headers {include}, headers only" in log
    assert _warnings(log) == []
    objects = list(tmp_path.rglob("main.cpp.o"))
    assert len(objects) == 1
    # main.cpp calls TensorRT's inline createInferRuntime, which the device's libnvinfer resolves
    assert "createInferRuntime_INTERNAL" in _symbols(objects[0], "--undefined-only")
