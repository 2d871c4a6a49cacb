"""The deployment bundle: everything a device with TensorRT needs to finish the build, when this machine has none.

    bundle/
      model/            the rewritten standard-ONNX model (TensorRT runs every op natively), tokenizer, manifest;
                        its FP16 block scales are widened to plain constants (TensorRT's Dequantize takes a
                        build-time constant scale)
      model_plugins/    the same with the accullm plugin ops swapped in (only when a swap applied)
      profile/          the calibration profile            validation/   the validation report
      plugins/          the plugin sources and their CMakeLists.txt
      build_engine.sh   builds the plugins for the target's architecture, then the engine with trtexec
      manifest.json     target, recipe, shapes, the trtexec command, and a SHA-256 of every file
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import accullm_export
from accullm_export.errors import BackendError
from accullm_export.graph.passes import PLUGIN_DOMAIN
from accullm_export.hashing import sha256_file

BUNDLE_KIND, BUNDLE_VERSION = "accullm-export/bundle", 1
PLUGIN_SWAPS = ("fuse_sparse_skip_mlp", "fuse_outlier_split_gemm")
PLUGIN_LIBRARY = "plugins/build/libaccullm_plugins.so"
_PLUGIN_SOURCES = ("*.cu", "*.h", "*.cpp", "*.py", "*.md", "CMakeLists.txt")


def plugin_sources() -> Path:
    """The repository's plugins/ folder (the bundle copies it); BackendError when the install lacks it."""
    folder = Path(accullm_export.__file__).resolve().parents[1] / "plugins"
    if not (folder / "CMakeLists.txt").is_file():
        raise BackendError(f"the plugin sources are not beside this installation ({folder}); install "
                           "accullm-export from a source checkout (pip install -e .) to write bundles")
    return folder


def write_bundle(model_dir: Path, profile: Path, validation: Path, bundle: Path, target, recipe: str, options,
                 is_llm: bool) -> dict:
    """Write the bundle folder; returns the build manifest's deliverable entry."""
    bundle.mkdir()
    shutil.copytree(model_dir, bundle / "model")
    _fold_scale_casts(bundle / "model" / "model.onnx")
    shutil.copytree(profile, bundle / "profile")
    if validation.is_dir():
        shutil.copytree(validation, bundle / "validation")
    _copy_plugins(bundle / "plugins")
    fused = _plugin_model(bundle / "model", bundle / "model_plugins")
    onnx_file = "model_plugins/model.onnx" if fused else "model/model.onnx"
    shapes = trtexec_shapes(bundle / "model" / "model.onnx", options) if is_llm else {}
    command = trtexec_command(onnx_file, target, recipe, shapes, plugins=bool(fused))
    (bundle / "build_engine.sh").write_text(build_script(target, command, plugins=bool(fused)))
    (bundle / "build_engine.sh").chmod(0o755)
    manifest = {
        "kind": BUNDLE_KIND, "version": BUNDLE_VERSION, "target": target.to_dict(), "recipe": recipe,
        "onnx": onnx_file, "plugin_ops": fused, "trtexec": command, "shapes": shapes,
        "files": {str(path.relative_to(bundle)): sha256_file(path) for path in sorted(bundle.rglob("*"))
                  if path.is_file()},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"kind": "tensorrt-bundle", "path": "bundle", "onnx": onnx_file, "plugin_ops": fused,
            "next": f"bash bundle/build_engine.sh   (on the {target.device}, with TensorRT 10+ and CMake)"}


def _copy_plugins(destination: Path) -> None:
    source = plugin_sources()
    for pattern in _PLUGIN_SOURCES:
        for path in source.rglob(pattern):
            if "build" in path.relative_to(source).parts or "__pycache__" in path.parts:
                continue
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _fold_scale_casts(path: Path) -> int:
    """Rewrite ``path`` in place with its scale Casts folded (``fold_scale_casts``); returns how many."""
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.pipeline import run_passes

    graph, source = load_graph(path)
    graph, (report,), _ = run_passes(graph, [("fold_scale_casts", None)])
    folded = report.nodes_removed.get("Cast", 0)
    if folded:
        save_graph(graph, source, path, {})
    return folded


def _plugin_model(model_dir: Path, out_dir: Path) -> dict[str, int]:
    """The model with the plugin swaps applied, if any applied; returns op type -> count."""
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.pipeline import run_passes

    graph, source = load_graph(model_dir / "model.onnx")
    graph, _, _ = run_passes(graph, [(name, None) for name in PLUGIN_SWAPS])
    fused: dict[str, int] = {}
    for node in graph.nodes:
        if node.domain == PLUGIN_DOMAIN:
            fused[node.op] = fused.get(node.op, 0) + 1
    if not fused:
        return fused
    out_dir.mkdir()
    save_graph(graph, source, out_dir / "model.onnx", {})  # adds the plugin domain's opset
    return fused


def trtexec_shapes(model_path: Path, options) -> dict[str, str]:
    """min/opt/max shape strings for trtexec: one profile from a one-token, empty-cache step up to a full batch."""
    from accullm_export.build.engine import shape_profiles

    prefill, decode = shape_profiles(model_path, options.max_batch, options.max_seq_len)
    merged = {}
    for name in decode:
        low = tuple(min(a, b) for a, b in zip(prefill[name][0], decode[name][0]))
        high = tuple(max(a, b) for a, b in zip(prefill[name][2], decode[name][2]))
        merged[name] = (low, decode[name][1], high)
    return {kind: ",".join(f"{name}:{'x'.join(map(str, dims[index]))}" for name, dims in merged.items())
            for index, kind in enumerate(("min", "opt", "max"))}


def trtexec_command(onnx_file: str, target, recipe: str, shapes: dict[str, str], plugins: bool) -> list[str]:
    command = ["${TRTEXEC}", f"--onnx=$HERE/{onnx_file}", "--saveEngine=$HERE/model.engine", "--fp16",
               f"--memPoolSize=workspace:{target.workspace_mb}M", "--timingCacheFile=$HERE/timing.cache"]
    if recipe == "w8a8":
        command.append("--int8")
    if shapes:
        command += [f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}"]
    if plugins:
        # the default plugin build exports getCreators (IPluginRegistry::loadLibrary), which --dynamicPlugins uses
        command.append(f"--dynamicPlugins=$HERE/{PLUGIN_LIBRARY}")
    return command


def build_script(target, command: list[str], plugins: bool) -> str:
    arch = target.cuda_arch
    quoted = " \\\n    ".join(f'"{part}"' if "$" in part else shlex.quote(part) for part in command)
    plugin_steps = f"""
# 1. the accullm plugins (CUDA kernels + TensorRT IPluginV3 wrappers) for sm_{arch}
cmake -S "$HERE/plugins" -B "$HERE/plugins/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES={arch} \\
    ${{TensorRT_ROOT:+-DTensorRT_ROOT="$TensorRT_ROOT"}}
cmake --build "$HERE/plugins/build" -j"$(nproc)"
test -f "$HERE/{PLUGIN_LIBRARY}" || {{
    echo "the plugin library was not built (is TensorRT's include dir found? set TensorRT_ROOT)" >&2; exit 1; }}
""" if plugins else "\n# this model needs no accullm plugin: TensorRT runs every op natively\n"
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for {target.device} (sm_{arch}) from this bundle. Run it on the device.
# Written by accullm-export {accullm_export.__version__}; needs TensorRT 10+ (trtexec) and, for plugins, CMake + nvcc.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
test -x "$TRTEXEC" || {{ echo "trtexec not found: install TensorRT (JetPack 6 on Jetson) or set TRTEXEC" >&2; exit 1; }}
{plugin_steps}
# 2. the engine (model.engine) and its timing cache
{quoted}
echo "engine: $HERE/model.engine"
"""
