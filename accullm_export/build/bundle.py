"""The deployment bundle: everything a device with TensorRT needs to finish the build, when this machine has none.

    bundle/
      model/            the rewritten standard-ONNX model, tokenizer, manifest; lowered for the bundle's TensorRT
                        version (build/lowering.py: constant scales, attention in the ops that version parses);
                        what trtexec builds unless plugin ops apply, then checked against the version's table
      model_plugins/    the same with the accullm plugin ops swapped in (only when a swap applied): what trtexec
                        builds then, and the one that parses where sparse-skip MLPs need their plugin
      profile/          the calibration profile            validation/   the validation report
      plugins/          the plugin sources and their CMakeLists.txt
      build_engine.sh   checks the device's TensorRT version, builds the plugins for the target's architecture,
                        then the engine with trtexec, and writes engine.json beside it
      manifest.json     target, TensorRT version, recipe, shapes, the trtexec command, a SHA-256 of every file
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
_PLUGIN_SOURCES = ("*.cu", "*.cuh", "*.h", "*.cpp", "*.py", "*.md", "CMakeLists.txt")


def plugin_sources() -> Path:
    """The repository's plugins/ folder (the bundle copies it); BackendError when the install lacks it."""
    folder = Path(accullm_export.__file__).resolve().parents[1] / "plugins"
    if not (folder / "CMakeLists.txt").is_file():
        raise BackendError(f"the plugin sources are not beside this installation ({folder}); install "
                           "accullm-export from a source checkout (pip install -e .) to write bundles")
    return folder


def write_bundle(model_dir: Path, profile: Path, validation: Path, bundle: Path, target, recipe: str, options,
                 is_llm: bool, tensorrt_version: str) -> dict:
    """Write the bundle folder for TensorRT ``tensorrt_version``; returns the build manifest's deliverable entry.

    Raises:
        UserError: the model holds nodes that version's parser does not take, even after lowering.
    """
    from accullm_export.build.lowering import lower_for_tensorrt
    from accullm_export.targets.tensorrt_support import check_model, check_or_raise

    bundle.mkdir()
    shutil.copytree(model_dir, bundle / "model")
    lowering = lower_for_tensorrt(bundle / "model" / "model.onnx", tensorrt_version)
    shutil.copytree(profile, bundle / "profile")
    if validation.is_dir():
        shutil.copytree(validation, bundle / "validation")
    _copy_plugins(bundle / "plugins")
    fused = _plugin_model(bundle / "model", bundle / "model_plugins")
    onnx_file = "model_plugins/model.onnx" if fused else "model/model.onnx"
    check_or_raise(bundle / onnx_file, tensorrt_version, onnx_file)  # what trtexec parses
    # the standard model is the rehearsal's reference; with sparse-skip MLPs only the plugin model parses
    unparsed = len(check_model(bundle / "model" / "model.onnx", tensorrt_version)) if fused else 0
    shapes = trtexec_shapes(bundle / "model" / "model.onnx", options) if is_llm else {}
    command = trtexec_command(onnx_file, target, recipe, shapes, plugins=bool(fused))
    (bundle / "build_engine.sh").write_text(build_script(target, command, plugins=bool(fused),
                                                         tensorrt_version=tensorrt_version))
    (bundle / "build_engine.sh").chmod(0o755)
    manifest = {
        "kind": BUNDLE_KIND, "version": BUNDLE_VERSION, "target": target.to_dict(),
        "tensorrt_version": tensorrt_version, "lowering": lowering, "standard_model_unparsed_nodes": unparsed,
        "recipe": recipe,
        "onnx": onnx_file, "plugin_ops": fused, "trtexec": command, "shapes": shapes,
        "files": {str(path.relative_to(bundle)): sha256_file(path) for path in sorted(bundle.rglob("*"))
                  if path.is_file()},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"kind": "tensorrt-bundle", "path": "bundle", "onnx": onnx_file, "plugin_ops": fused,
            "tensorrt_version": tensorrt_version,
            "next": f"bash bundle/build_engine.sh   (on the {target.device}, with TensorRT {tensorrt_version} and CMake)"}


def _copy_plugins(destination: Path) -> None:
    source = plugin_sources()
    for pattern in _PLUGIN_SOURCES:
        for path in source.rglob(pattern):
            if "build" in path.relative_to(source).parts or "__pycache__" in path.parts:
                continue
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


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


def build_script(target, command: list[str], plugins: bool, tensorrt_version: str) -> str:
    """The bash script that finishes the bundle on the device: a TensorRT version check before any work, the
    plugins, the engine, and ``engine.json`` beside it (what ``validate`` and the runners check)."""
    arch = target.cuda_arch
    major, minor = tensorrt_version.split(".")
    quoted = " \\\n    ".join(f'"{part}"' if "$" in part else shlex.quote(part) for part in command)
    plugin_steps = f"""
# 2. the accullm plugins (CUDA kernels + TensorRT IPluginV3 wrappers) for sm_{arch}
cmake -S "$HERE/plugins" -B "$HERE/plugins/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES={arch} \\
    ${{TensorRT_ROOT:+-DTensorRT_ROOT="$TensorRT_ROOT"}}
cmake --build "$HERE/plugins/build" -j"$(nproc)"
test -f "$HERE/{PLUGIN_LIBRARY}" || {{
    echo "the plugin library was not built (is TensorRT's include dir found? set TensorRT_ROOT)" >&2; exit 1; }}
""" if plugins else "\n# 2. this model needs no accullm plugin: TensorRT runs every op natively\n"
    library = f'"{PLUGIN_LIBRARY}"' if plugins else "null"
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for {target.device} (sm_{arch}) from this bundle. Run it on the device.
# Written by accullm-export {accullm_export.__version__} for TensorRT {tensorrt_version}; needs trtexec and, for
# plugins, CMake + nvcc. ACCULLM_TENSORRT_VERSION=X.Y names the device's TensorRT where it cannot be read.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
BUNDLE_TENSORRT={tensorrt_version}
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
test -x "$TRTEXEC" || {{ echo "trtexec not found: install TensorRT (JetPack 6 on Jetson) or set TRTEXEC" >&2; exit 1; }}

# 1. the device's TensorRT: this bundle's ONNX uses only what TensorRT {tensorrt_version}'s parser takes
device_tensorrt() {{
    if [ -n "${{ACCULLM_TENSORRT_VERSION:-}}" ]; then
        echo "$ACCULLM_TENSORRT_VERSION" | cut -d. -f1,2; return
    fi
    local dir major minor code
    for dir in ${{TensorRT_ROOT:+"$TensorRT_ROOT/include"}} /usr/include/aarch64-linux-gnu \\
               /usr/include/x86_64-linux-gnu /usr/include /usr/local/tensorrt/include; do
        if [ -f "$dir/NvInferVersion.h" ]; then
            major=$(sed -nE 's/^#define (NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE) +([0-9]+).*/\\2/p' \\
                    "$dir/NvInferVersion.h" | head -n 1)
            minor=$(sed -nE 's/^#define (NV_TENSORRT_MINOR|TRT_MINOR_ENTERPRISE) +([0-9]+).*/\\2/p' \\
                    "$dir/NvInferVersion.h" | head -n 1)
            if [ -n "$major" ] && [ -n "$minor" ]; then echo "$major.$minor"; return; fi
        fi
    done
    # trtexec's banner names the version as one number: "[TensorRT v100300]" is 10.3.0
    code=$("$TRTEXEC" --help 2>&1 | sed -nE 's/.*TensorRT v([0-9]+).*/\\1/p' | head -n 1 || true)
    if [ -n "$code" ] && [ "$code" -ge 100000 ]; then echo "$((code / 10000)).$(((code / 100) % 100))";
    elif [ -n "$code" ]; then echo "$((code / 1000)).$(((code / 100) % 10))"; fi  # TensorRT 8: v8601 is 8.6.1
}}
DEVICE_TENSORRT=$(device_tensorrt)
if [ -z "$DEVICE_TENSORRT" ]; then
    echo "cannot tell this device's TensorRT version (no NvInferVersion.h, no version in trtexec's banner): set ACCULLM_TENSORRT_VERSION=X.Y" >&2
    exit 2
fi
if ! [[ "$DEVICE_TENSORRT" =~ ^[0-9]+\\.[0-9]+$ ]]; then
    echo "this device's TensorRT version reads '$DEVICE_TENSORRT', not X.Y: set ACCULLM_TENSORRT_VERSION=X.Y" >&2
    exit 2
fi
device_major=${{DEVICE_TENSORRT%%.*}}
device_minor=${{DEVICE_TENSORRT#*.}}
if [ "$device_major" != {major} ] || [ "$device_minor" -lt {minor} ]; then
    echo "this bundle is for TensorRT $BUNDLE_TENSORRT and this device has TensorRT $DEVICE_TENSORRT: build a bundle for it with \\`accullm-export build MODEL --target {target.name} --tensorrt-version $DEVICE_TENSORRT\\`" >&2
    exit 2
fi
echo "TensorRT $DEVICE_TENSORRT on this device; the bundle is for TensorRT $BUNDLE_TENSORRT"
{plugin_steps}
# 3. the engine (model.engine) and its timing cache
{quoted}

# 4. engine.json: what identifies the engine (validate and the runners check it)
ENGINE_SHA256=$(sha256sum "$HERE/model.engine" | cut -d' ' -f1)
cat > "$HERE/engine.json" <<RECORD
{{"sha256": "$ENGINE_SHA256", "tensorrt": "$DEVICE_TENSORRT", "target": "{target.name}", "compute_capability": "{target.compute_capability}", "plugin_library": {library}, "bundle_tensorrt": "$BUNDLE_TENSORRT"}}
RECORD
echo "engine: $HERE/model.engine"
"""
