"""``build --golden``: the draft the build validated and a verifier beside it, for lossless speculative decoding.

    OUT/golden/              the verifier's model folder (`generate OUT/golden PROMPT` runs the verifier alone,
      model.onnx             `generate OUT/golden PROMPT --golden` the pair)
      model.onnx.data        reference: the whole model; w8: what it does not share with the draft
      tokenizer.json, ...    the side files
      golden.json            the pair: the source's hash, the tokenizer's, every model file's SHA-256, the
                             verifier kind, the draft's recipe, bits per weight, the verifier's validation
      draft/                 the deliverable the build validated: the ONNX Runtime folder, the TensorRT engine,
                             or a bundle's ONNX model

The verifier is

* ``reference``: the source model, fp32 on CPU targets, fp16 on GPU targets (exported again from the checkpoint
  in fp16, or MODEL when it is an fp16 export); golden output is that model's own greedy output.
* ``w8``: the draft's graph with an INT4 residual plane on every INT4 layer (``passes.residual_planes``): the
  source weight minus what the draft's layer computes from the same input (its INT4 plane with zero points and
  scale codes, outlier planes or branch, rotation and refined vocabulary rows together, read off the graph by
  ``linear_maps``), rounded in the layer's blocks with its own scales. Constants a pass trained under their own
  names (distilled norm gains) get the source's values back. Its external-data entries point into
  ``draft/model.onnx.data`` for every tensor the draft stores byte for byte, so those bytes are stored once.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import accullm_export
from accullm_export.errors import AccuLLMError, UserError
from accullm_export.hashing import sha256_file
from accullm_export.runtime.speculative import GOLDEN_KIND, GOLDEN_MANIFEST, GOLDEN_VERSION

log = logging.getLogger(__name__)

GOLDEN_DIR = "golden"
VERIFIERS = ("reference", "w8")
# a layer whose draft weight is further than this from its source weight (relative Frobenius norm) is not one
# the draft's INT4 rounding made: it keeps its draft form
MAX_DRAFT_ERROR = 0.5
_SEARCH_LIMIT = 512  # tensors visited when checking what a layer's output is computed from


def check_request(model: str, target, recipe, verifier: str) -> None:
    """Refuse, before any work, a golden build that cannot be made.

    Raises:
        UserError: an unknown verifier kind; ``w8`` for a TensorRT target or for a recipe whose draft has no
            INT4 layers in the source's coordinates; an fp32 ONNX MODEL for a GPU target's fp16 reference.
    """
    if verifier not in VERIFIERS:
        raise UserError(f"unknown verifier {verifier!r}; choose from {', '.join(VERIFIERS)}")
    if verifier == "w8":
        if target.backend != "onnxruntime":
            raise UserError(f"--verifier w8 adds INT4 residual planes in ONNX Runtime's MatMulNBits form; target "
                            f"{target.name} runs {target.backend}: use --verifier reference")
        reasons = {"its layers are not INT4": recipe.scheme != "w4a16",
                   "weights.awq scales the layers' inputs": recipe.weights.awq,
                   "activations.smoothquant scales the layers' inputs": bool(recipe.activations.smoothquant),
                   "sparse-skip MLPs compute only some neurons": bool(recipe.sparsity.fraction)}
        refused = [reason for reason, applies in reasons.items() if applies]
        if refused:
            raise UserError(f"--verifier w8 needs a draft of INT4 layers reading the source model's inputs; recipe "
                            f"{recipe.name}: {refused[0]} (use --verifier reference)")
    elif target.backend != "onnxruntime" and _onnx_dtype(model) == "fp32":
        raise UserError(f"the golden verifier of GPU target {target.name} is the fp16 reference, and {model} is an "
                        "fp32 ONNX model: give the checkpoint (it is exported again in fp16) or an fp16 export")


def write_golden(staging: Path, model: str, reference: Path, deliverable: dict, recipe, options) -> dict:
    """Write ``staging/golden``; returns the build manifest's entry. On an error the folder is removed.

    Args:
        staging: the build's staging folder (holding the deliverable).
        model: MODEL as given to ``build``.
        reference: the reference export (a folder).
        deliverable: the target step's manifest entry.
        recipe: the draft's recipe.
        options: ``BuildOptions`` (``golden``, the validation sizes).
    """
    root = staging / GOLDEN_DIR
    try:
        if options.golden == "w8":
            root.mkdir()
            draft = _copy_draft(staging, deliverable, root / "draft")
            verifier = write_w8_verifier(reference, draft, root)
        else:
            verifier = _reference_verifier(model, reference, root, deliverable["kind"] != "onnxruntime-folder")
            draft = _copy_draft(staging, deliverable, root / "draft")
        verifier["validation"] = _validate_verifier(reference, root, options, verifier.pop("identical", False))
        manifest = _golden_manifest(root, model, reference, draft, recipe, verifier)
        (root / GOLDEN_MANIFEST).write_text(json.dumps(manifest, indent=2))
    except AccuLLMError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    validation = manifest["verifier"]["validation"]
    return {"path": GOLDEN_DIR, "verifier": options.golden, "dtype": manifest["verifier"]["dtype"],
            "bits_per_weight": manifest["size"]["bits_per_weight"],
            "kl_mean": validation.get("kl_mean"), "top1_agreement": validation.get("top1_agreement")}


# ------------------------------------------------------------------------------------------ the two models
def _onnx_dtype(model: str) -> str | None:
    """fp32 or fp16 when MODEL is an ONNX model (its largest initializer's type), else None."""
    path = Path(model)
    path = path / "model.onnx" if path.is_dir() else path
    if path.suffix != ".onnx" or not path.is_file():
        return None
    from accullm_export.graph.io import load_onnx

    header = load_onnx(path, load_external_data=False)
    largest = max(header.graph.initializer, key=lambda t: int(np.prod(t.dims, dtype=np.int64)), default=None)
    return "fp16" if largest is not None and largest.data_type == onnx.TensorProto.FLOAT16 else "fp32"


def _copy_model(source: Path, destination: Path) -> None:
    """An ONNX model folder's model.onnx, its external data, side files and manifest; nothing else travels."""
    from accullm_export.build.quantize import copy_side_files
    from accullm_export.graph.io import external_data_files

    destination.mkdir()
    header = onnx.load(str(source / "model.onnx"), load_external_data=False)
    for location, path in external_data_files(header, source, source / "model.onnx").items():
        (destination / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination / location)
    shutil.copy2(source / "model.onnx", destination / "model.onnx")
    copy_side_files(source, destination)
    if (source / "manifest.json").is_file():
        shutil.copy2(source / "manifest.json", destination / "manifest.json")


def _reference_verifier(model: str, reference: Path, root: Path, gpu: bool) -> dict:
    """The reference as the verifier: the build's reference (fp32 on CPU targets), or in fp16 for a GPU target."""
    if not gpu or _onnx_dtype(model) == "fp16":  # the build's reference as it is (MODEL, for an fp16 export)
        _copy_model(reference, root)
        return {"kind": "reference", "dtype": _onnx_dtype(str(root)), "identical": True}
    from accullm_export.models.export import export_model

    export_model(model, root, dtype="fp16")
    return {"kind": "reference", "dtype": "fp16"}


def _copy_draft(staging: Path, deliverable: dict, destination: Path) -> Path:
    """The deliverable's runnable model copied to ``destination``; returns its model file."""
    from accullm_export.build.quantize import copy_side_files
    from accullm_export.runtime.engine_file import ENGINE_RECORD

    kind = deliverable["kind"]
    if kind == "tensorrt-engine":
        destination.mkdir()
        for name in (deliverable["path"], ENGINE_RECORD):
            shutil.copy2(staging / name, destination / name)
        copy_side_files(staging, destination)
        return destination / deliverable["path"]
    folder = staging / deliverable["path"] / ("model" if kind == "tensorrt-bundle" else "")
    shutil.copytree(folder, destination)
    return destination / "model.onnx"


def write_w8_verifier(reference: Path, draft: Path, root: Path) -> dict:
    """Write the w8 verifier into the existing folder ``root``: the draft's graph (``draft``, a model.onnx inside
    ``root``) with residual planes against the reference export, sharing the draft's bytes. Returns golden.json's
    verifier entry (without the files and the validation)."""
    from accullm_export.build.quantize import check_loads, copy_side_files
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.passes.residual_planes import Config
    from accullm_export.graph.pipeline import run_passes

    draft_manifest = json.loads((draft.parent / "manifest.json").read_text())
    int4_layers = {layer["node"] for layer in draft_manifest["layers"] if layer["precision"] == "int4"}
    graph, source = load_graph(draft)
    reference_graph, _ = load_graph(reference)
    restored = restore_source_constants(graph, reference_graph)
    float_dtype = _float_dtype(reference_graph)
    plans, notes, fits = residual_plans(graph, reference_graph, int4_layers, float_dtype)
    if not plans:
        raise UserError(f"no INT4 layer of the draft {draft} could take a residual plane"
                        + (f" ({notes[0]})" if notes else ""))
    del reference_graph
    graph, reports, _ = run_passes(graph, [("residual_planes", Config(plans=plans, float_dtype=float_dtype))])
    save_graph(graph, source, root / "model.onnx", {"accullm_export.golden_verifier": "w8"})
    copy_side_files(reference, root)
    shared = share_external_data(root / "model.onnx", draft)
    check_loads(root / "model.onnx")
    for note in notes:
        log.info("golden: %s", note)
    if restored:
        shown = ", ".join(restored[:4]) + (f" and {len(restored) - 4} more" if len(restored) > 4 else "")
        notes.append(f"{len(restored)} constants a pass trained under their own names (distilled norm gains) "
                     f"have the source's values: {shown}")
    residual = sum(plane.stored_bytes for plane in plans.values())
    size = draft_manifest["size"]
    linear = 8 * (size["linear_bytes"] + residual) / size["linear_weights"]
    return {"kind": "w8", "dtype": np.dtype(float_dtype).name.replace("float", "fp"),
            "residual_layers": len(plans), "residual_bytes": residual, "shared_bytes": shared,
            "linear_bits_per_weight": round(linear, 4), "layers": fits, "notes": notes + list(reports[0].notes)}


def _float_dtype(graph: gs.Graph) -> np.dtype:
    weights = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and np.dtype(t.dtype).kind == "f"]
    largest = max(weights, key=lambda t: int(np.prod(t.shape)), default=None)
    return np.dtype(largest.dtype) if largest is not None else np.dtype(np.float32)


def _validate_verifier(reference: Path, root: Path, options, identical: bool) -> dict:
    """The verifier against the reference, on the build's validation text and sizes (no gates)."""
    if identical:
        return {"kl_mean": 0.0, "top1_agreement": 1.0, "note": "the verifier is the reference's own files"}
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, validate

    llm = LLMValidationConfig(windows=options.validation_windows, seq_len=options.validation_seq_len,
                              num_prompts=options.validation_prompts, probes_per_task=0)
    report = validate(reference, root, ValidateOptions(llm=llm))
    metrics = report.get("metrics") or {}
    greedy = {key: value for key, value in (report.get("greedy") or {}).items() if key != "prompts"}
    return {key: metrics.get(key) for key in ("kl_mean", "top1_agreement", "ppl_delta_pct")} | {"greedy": greedy}


# ------------------------------------------------------------------------------------------ residual planes
def residual_plans(draft: gs.Graph, reference: gs.Graph, int4_layers: set[str], float_dtype: np.dtype):
    """A residual plane for every INT4 MatMul of the draft (a layer, or layers merged into one) whose columns
    are source layers reading one tensor of both graphs.

    Returns:
        (draft MatMul name -> ``ResidualPlane``, notes on the layers left in their draft form, and per layer the
        relative Frobenius error of the draft's and the verifier's weight against the source's).
    """
    from accullm_export.graph.passes.refine_vocab_rows import linear_maps
    from accullm_export.graph.passes.residual_planes import ResidualPlane
    from accullm_export.graph.rewrite import producer_of
    from accullm_export.quant.symmetric import dequantize, quantize

    readers = collections.defaultdict(list)  # source tensor -> the INT4 layers reading it, in graph order
    for node in reference.nodes:
        if node.op == "MatMul" and node.name in int4_layers:
            readers[node.inputs[0].name].append(node)
    by_name = {node.name: node for members in readers.values() for node in members}
    tensors = draft.tensors()
    plans, notes, fits = {}, [], []
    for node in [node for node in draft.nodes if node.op == "MatMul"]:
        first, _, merged = node.name.partition("/merged_with_")
        dequantize_node = producer_of(node.inputs[1], "DequantizeLinear")
        if first not in by_name or dequantize_node is None or "block_size" not in dequantize_node.attrs:
            continue
        members = readers[by_name[first].inputs[0].name]
        start = members.index(by_name[first])
        members = members[start:start + 1 + (int(merged) if merged else 0)]
        source = tensors.get(members[0].inputs[0].name)
        output = _output_tensor(node, source) if source is not None else None
        weights = [member.inputs[1] for member in members]
        width = sum(int(w.shape[1]) for w in weights if isinstance(w, gs.Constant))
        if output is None or width != int(dequantize_node.inputs[0].shape[-1]) or \
                not all(isinstance(w, gs.Constant) for w in weights):
            notes.append(f"{node.name}: its output is not the source layers' {[m.name for m in members]} computed "
                         "from their input alone; it keeps its draft form")
            continue
        weight = np.concatenate([np.asarray(w.values, dtype=np.float32) for w in weights], axis=1)
        effective = linear_maps(draft, source.name, [output.name], weight.shape[0], float_dtype)[0]
        scale = float(np.linalg.norm(weight)) or 1.0
        error = float(np.linalg.norm(weight - effective)) / scale
        if not error <= MAX_DRAFT_ERROR:
            notes.append(f"{node.name}: its weight is {error:.2f} (relative) from the source's, not a rounding of "
                         "it; it keeps its draft form")
            continue
        block = int(dequantize_node.attrs["block_size"])
        values, scales = quantize(weight - effective, 4, block)
        verifier = float(np.linalg.norm(weight - effective - dequantize(values, scales, block))) / scale
        plans[node.name] = ResidualPlane(source.name, output.name, values, scales, block)
        fits.append({"layer": node.name, "draft_error": round(error, 5), "verifier_error": round(verifier, 6)})
    return plans, notes, fits


def _output_tensor(node: gs.Node, source: gs.Variable) -> gs.Variable | None:
    """The tensor holding everything the layer adds to its columns: its output, then each Add and
    ScatterElements(reduction add) that adds terms computed from ``source`` and constants alone (an outlier
    branch, a bias, the refined vocabulary rows); None when the output is computed from anything else."""
    tensor = node.outputs[0]
    while len(tensor.outputs) == 1:
        consumer = tensor.outputs[0]
        adds = consumer.op == "Add" or (consumer.op == "ScatterElements" and consumer.inputs[0] is tensor
                                        and consumer.attrs.get("reduction") == "add")
        others = [t for t in consumer.inputs if t is not tensor]
        if not adds or not all(_computed_from(t, source) for t in others):
            break
        tensor = consumer.outputs[0]
    return tensor if _computed_from(tensor, source) else None


def _computed_from(tensor, source: gs.Variable) -> bool:
    """Whether ``tensor`` is computed from ``source`` and constants alone (within ``_SEARCH_LIMIT`` tensors)."""
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current is source or isinstance(current, gs.Constant) or id(current) in seen:
            continue
        seen.add(id(current))
        if not current.inputs or len(seen) > _SEARCH_LIMIT:
            return False
        stack.extend(current.inputs[0].inputs)
    return True


def restore_source_constants(graph: gs.Graph, reference: gs.Graph) -> list[str]:
    """Give every float constant that the source holds under the same name and shape the source's values;
    returns the names of those that differed."""
    from accullm_export.graph.ir import constant_array

    source = {name: t for name, t in reference.tensors().items() if isinstance(t, gs.Constant)}
    restored = []
    for name, tensor in graph.tensors().items():
        original = source.get(name)
        if not isinstance(tensor, gs.Constant) or original is None or np.dtype(tensor.dtype).kind != "f":
            continue
        values, wanted = constant_array(tensor), constant_array(original)
        if values.shape == wanted.shape and values.dtype == wanted.dtype and not np.array_equal(values, wanted):
            tensor.values = wanted
            restored.append(name)
    return restored


def share_external_data(model_path: Path, draft_path: Path) -> int:
    """Point every external tensor of ``model_path`` that ``draft_path`` stores byte for byte under the same name
    at the draft's data file (a path inside the model's folder), and rewrite the model's own data file with the
    rest. Returns the bytes shared."""
    from accullm_export.graph.io import external_data_files
    from accullm_export.graph.ir import DATA_FILE

    model = onnx.load(str(model_path), load_external_data=False)
    draft = onnx.load(str(draft_path), load_external_data=False)
    folder = model_path.parent.resolve()
    own = external_data_files(model, folder, model_path)
    theirs = external_data_files(draft, draft_path.parent, draft_path)
    stored = {t.name: t for t in draft.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    data_path = folder / DATA_FILE
    partial = folder / f"{DATA_FILE}.partial"
    shared = 0
    with open(partial, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location, offset, length = _entry(tensor)
            data = _read(own[location], offset, length)
            twin = stored.get(tensor.name)
            if twin is not None and twin.data_type == tensor.data_type and twin.dims == tensor.dims:
                twin_location, twin_offset, twin_length = _entry(twin)
                if twin_length == length and _read(theirs[twin_location], twin_offset, length) == data:
                    _set_entry(tensor, Path(os.path.relpath(theirs[twin_location], folder)).as_posix(),
                               twin_offset, length)
                    shared += length
                    continue
            _set_entry(tensor, DATA_FILE, out.tell(), length)
            out.write(data)
    os.replace(partial, data_path)
    onnx.save(model, str(model_path))
    return shared


def _entry(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def _set_entry(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


# ------------------------------------------------------------------------------------------ golden.json
def role_files(root: Path, model_file: Path) -> dict[str, str]:
    """SHA-256 of every file a model reads, by path relative to ``root``: the model file, its external data (or
    an engine's record) and the tokenizer.json beside it."""
    from accullm_export.graph.io import external_data_files
    from accullm_export.runtime.engine_file import ENGINE_RECORD

    folder = model_file.parent
    if model_file.suffix == ".onnx":
        header = onnx.load(str(model_file), load_external_data=False)
        files = [model_file, *external_data_files(header, folder, model_file).values()]
    else:
        files = [model_file, folder / ENGINE_RECORD]
    files.append(folder / "tokenizer.json")
    resolved = root.resolve()
    return {Path(path).resolve().relative_to(resolved).as_posix(): sha256_file(path) for path in files}


def _golden_manifest(root: Path, model: str, reference: Path, draft: Path, recipe, verifier: dict) -> dict:
    from accullm_export.calibration.profile import model_fingerprint

    export = reference / "manifest.json"
    checkpoint = json.loads(export.read_text()).get("input_hashes", {}) if export.is_file() else {}
    roles = {"verifier": root / "model.onnx", "draft": draft}
    files = {role: role_files(root, path) for role, path in roles.items()}
    model_bytes = {name: (root / name).stat().st_size for role in files.values() for name in role
                   if not name.endswith("tokenizer.json")}
    parameters = _parameters(reference)
    bits = {"folder_per_parameter": round(8 * sum(model_bytes.values()) / parameters, 4)}
    if "linear_bits_per_weight" in verifier:
        bits["linear"] = verifier.pop("linear_bits_per_weight")
    return {
        "kind": GOLDEN_KIND, "version": GOLDEN_VERSION,
        "source": {"model": str(model), "sha256": model_fingerprint(reference), "checkpoint_hashes": checkpoint},
        "tokenizer_sha256": sha256_file(root / "tokenizer.json"),
        "verifier": {**verifier, "model": "model.onnx", "files": files["verifier"]},
        "draft": {"model": draft.relative_to(root).as_posix(), "recipe": recipe.name, "files": files["draft"]},
        "size": {"bits_per_weight": bits, "model_bytes": model_bytes, "parameters": parameters},
        "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__},
    }


def _parameters(reference: Path) -> int:
    """The source model's float parameters (initializers of more than one element)."""
    header = onnx.load(str(reference / "model.onnx"), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in header.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
               and int(np.prod(t.dims, dtype=np.int64)) > 1)
