"""``quantize``: rewrite a model with a recipe and a calibration profile, into a new model folder.

Steps: refuse a model that is already quantized or a profile made from another model; plan every linear
layer; run the recipe's passes (each logs what it changed); write the graph, its external data, the source
folder's tokenizer and genai_config.json and a manifest; open the result in ONNX Runtime before the folder
appears, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.errors import UserError
from accullm_export.graph.linear import find_linear_layers
from accullm_export.graph.pass_data import PassData
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.recipes.config import Recipe
from accullm_export.recipes.plan import plan_layers
from accullm_export.resources import Estimate, check_memory, quantize_estimate
from accullm_export.safe_paths import inside

log = logging.getLogger(__name__)

MANIFEST_KIND, MANIFEST_VERSION = "accullm-export/quantized", 1
RECIPE_KEY = "accullm_export.recipe"  # ONNX metadata_props key marking a rewritten model
# what travels beside a rewritten model: what `export` writes and what tokenizers and onnxruntime-genai read
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "tokenizer.model", "chat_template.jinja", "config.json", "generation_config.json",
              "genai_config.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """Resources, not numerics: the activation memory budget of the statistics passes, the memory of GPTQ's
    second moments held at once, the distillation batch, and the device ("cpu" or "cuda") the heavy steps run
    on."""

    budget_mb: int = 512
    moments_mb: int = 512  # GPTQ's [C, C] second-moment matrices held at once (less: more, shorter passes)
    distill_batch: int = 1  # windows per distillation step
    device: str = "cpu"  # where the statistics sessions (ONNX Runtime) and the distillation (torch) run
    version: int = 1

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"the device must be cpu or cuda, not {self.device!r}")


# ONNX Runtime's contrib ops for attention and residual + RMSNorm, as onnxruntime-genai's builder writes them:
# fewer nodes per decode step; the file then runs only in ONNX Runtime (``graph.onnxruntime_fusions``)
ONNXRUNTIME_FUSIONS = ("fuse_group_query_attention", "fuse_skip_rms_norm")


def finishing_passes(recipe: Recipe) -> tuple[str, ...]:
    """The passes after the per-layer ones, numerics unchanged. TensorRT fuses on its own and its plugin swaps
    need the unmerged layers, so only ONNX Runtime gets the parallel linears merged."""
    if recipe.backend != "onnxruntime":
        return ()
    return ("merge_parallel_linears",) + (ONNXRUNTIME_FUSIONS if recipe.graph.onnxruntime_fusions else ())


def recipe_passes(recipe: Recipe) -> list[str]:
    """The passes a recipe runs, in order."""
    passes = ["scale_activations_awq"] if recipe.weights.awq else []
    if recipe.activations.smoothquant:
        passes.append("smooth_activations")
    passes.append("isolate_outliers")
    if recipe.rotation.layers:  # the branch reads x, the rest x R: after the split, before any rounding
        passes.append("rotate_inputs")
    if recipe.gptq.enabled:
        passes.append("compensate_errors_gptq")
    passes.append("quantize_weights")
    if recipe.distill.steps:
        passes.append("distill_scales")
    passes += ["quantize_activations", "quantize_embeddings"]
    if recipe.weights.scale_bits == 8:  # after every pass that chooses scales
        passes.append("code_block_scales")
    if recipe.outliers.planes:  # after every pass that sets rows or scales, before those that measure the result
        passes.append("fold_outlier_planes")
    if recipe.outliers.bits == 8:  # after every pass that moves the rows; the branches the planes did not take
        passes.append("quantize_outlier_rows")
    if recipe.vocab.refine_rows:  # on the head as it will be saved
        passes.append("refine_vocab_rows")
    return passes


def quantize_model(model: str | Path, out_dir: str | Path, recipe: Recipe, profile_dir: str | Path, *,
                   options: QuantizeOptions = QuantizeOptions(), overwrite: bool = False,
                   finishing: tuple[str, ...] | None = None) -> dict:
    """Rewrite ``model`` into ``out_dir``; returns the manifest (also written as ``manifest.json``).

    ``recipe.sparsity`` adds sparse-skip MLPs after quantization; with the guesser, those MLPs' projections keep
    no FP16 outlier branch (it narrows gate and up, which must be plain MatMuls). ``finishing`` replaces the
    passes that run last (default: ``finishing_passes(recipe)``; ``()`` keeps every layer its own MatMul).
    """
    from accullm_export.calibration.profile import load_profile
    from accullm_export.graph.io import load_onnx

    check_output(out_dir, MANIFEST_KIND, overwrite, protected=[model, profile_dir])
    if options.device == "cuda":
        _check_cuda(torch_needed=bool(recipe.distill.steps))
    model_path = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    header = load_onnx(model_path, load_external_data=False)
    refuse_quantized(header, model_path)
    from accullm_export.build.sparsify import refuse_sparse

    refuse_sparse(header, model_path)
    check_side_files(model_path.parent)
    profile = load_profile(profile_dir, model_path)
    layers = find_linear_layers(header)
    if not layers:
        raise UserError(f"{model_path} has no linear layers (MatMul with an initializer weight) to quantize")
    if recipe.vocab.refine_rows == "auto":
        recipe = dataclasses.replace(recipe, vocab=dataclasses.replace(recipe.vocab,
                                                                       refine_rows=auto_vocab_rows(header, layers)))
    plans = plan_layers(recipe, layers, profile)
    check_memory(memory_estimate(model_path, plans, recipe, options, profile.manifest.get("feeds", {}).get("seq_len"),
                                 header=header))
    notes = [f"{layer.node}: {layer.op_type} is not rewritten (only MatMul is); left as it is"
             for layer in layers if layer.op_type != "MatMul"]
    statistics = {entry["name"]: profile.input_statistics(entry["name"]) for entry in profile.manifest["inputs"]}
    rotated = [plan.node for plan in plans.values() if plan.rotation]  # rotate_inputs reads these before GPTQ
    hessians = _hessians(model_path, header, plans, profile, recipe.gptq.samples, options, notes, first=rotated,
                         kept=_head_input_kept(header, layers, recipe)) if recipe.gptq.enabled else None
    finishing = finishing_passes(recipe) if finishing is None else finishing
    return _rewrite(model_path, out_dir, recipe, profile, plans, statistics, hessians, notes, overwrite, options,
                    finishing, protected=[model, profile_dir])


def _check_cuda(torch_needed: bool) -> None:
    """BackendError before any work when ``device="cuda"`` cannot run: ONNX Runtime without its CUDA provider,
    or (for distillation) torch without a CUDA GPU."""
    import onnxruntime

    from accullm_export.errors import BackendError

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BackendError("--device cuda: ONNX Runtime has no CUDA execution provider here (install "
                           "onnxruntime-gpu on a machine with an NVIDIA GPU); use --device cpu")
    if torch_needed:
        from accullm_export.training.distill import torch_device

        torch_device("cuda")


def memory_estimate(model_path: Path, plans: dict[str, LayerPlan], recipe: Recipe, options: QuantizeOptions,
                    seq_len: int | None, header: onnx.ModelProto | None = None) -> Estimate:
    """What quantizing ``model_path`` with ``recipe`` will hold at its peak (``resources.quantize_estimate``):
    the second moments GPTQ holds at once, and for distillation one chunk of the logits over the LM head's
    vocabulary (the widest layer's outputs). ``header``: the model already loaded without its weights."""
    from accullm_export.calibration.hessian import MATRIX_ITEMSIZE
    from accullm_export.training.distill import LOGIT_CHUNK_BYTES

    inputs = {plan.input: plan.in_features for plan in plans.values() if plan.quantized}
    moments = min(sum(count * count * MATRIX_ITEMSIZE for count in inputs.values()), options.moments_mb << 20) \
        if recipe.gptq.enabled else 0
    vocabulary = max((plan.out_features for plan in plans.values()), default=0)
    logits = min((seq_len or 0) * options.distill_batch * vocabulary * 4, LOGIT_CHUNK_BYTES)
    return quantize_estimate(weight_bytes(model_path, header), moments=moments, distill_logits=logits,
                             distill=bool(recipe.distill.steps))


def weight_bytes(model_path: str | Path, header: onnx.ModelProto | None = None) -> int:
    """Bytes of the model's stored weights: its external data files and the .onnx file itself (``header``: the
    model already loaded without its weights, else it is loaded here)."""
    from accullm_export.graph.io import external_data_files, load_onnx

    path = Path(model_path)
    path = path / "model.onnx" if path.is_dir() else path
    header = header if header is not None else load_onnx(path, load_external_data=False)
    files = external_data_files(header, path.parent, path)
    return path.stat().st_size + sum(file.stat().st_size for file in files.values())


def auto_vocab_rows(header, layers) -> int:
    """``vocab.refine_rows = "auto"``: a twelfth of the LM head's rows, in multiples of 64 where that leaves any;
    0 when no MatMul writes the logits directly (nothing to refine)."""
    from accullm_export.graph.passes.refine_vocab_rows import head_tensors

    found = head_tensors(header, layers)
    if found is None:
        return 0
    twelfth = found[0].out_features // 12
    return twelfth // 64 * 64 or twelfth


def _without_mlp_branches(graph, plans: dict[str, LayerPlan], statistics: dict,
                          notes: list[str]) -> dict[str, LayerPlan]:
    """Drop the outlier branch of every SwiGLU MLP projection (the sparse rewrite narrows plain MatMuls); a
    static activation scale then has to cover the channels the branch would have taken."""
    from accullm_export.graph.layer_plan import activation_scale
    from accullm_export.graph.mlp import find_mlp_blocks

    changed = dict(plans)
    for block in find_mlp_blocks(graph):
        for node in (block.gate, block.up, block.down):
            plan = plans.get(node.name) if node is not None else None
            if plan is not None and plan.outliers:
                scale = (activation_scale(statistics[plan.input], ()) if plan.activations == "static"
                         else plan.activation_scale)
                changed[node.name] = dataclasses.replace(plan, outliers=(), activation_scale=scale)
                notes.append(f"{node.name}: no FP16 outlier branch (its MLP is sparse-skip)")
    return changed


def refuse_quantized(model: onnx.ModelProto, path: Path) -> None:
    """UserError for a model this kit (or another tool) already quantized."""
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if RECIPE_KEY in metadata:
        raise UserError(f"{path} is already quantized (recipe {metadata[RECIPE_KEY]}); quantize the original "
                        "fp32/fp16 export instead")
    quantized_ops = {node.op_type for node in model.graph.node} & {
        "DequantizeLinear", "QuantizeLinear", "MatMulNBits", "QLinearMatMul", "MatMulInteger"}
    if quantized_ops:
        raise UserError(f"{path} already contains {', '.join(sorted(quantized_ops))}: it is quantized; quantize "
                        "the original fp32/fp16 export instead")


def _rewrite(model_path, out_dir, recipe, profile, plans, statistics, hessians, notes, overwrite,
             options: QuantizeOptions, finishing: tuple[str, ...], protected: list) -> dict:
    from accullm_export.build.sparsify import sparsity_metadata, sparsity_plans, sparsity_summary
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.passes import skip_sparse_neurons
    from accullm_export.graph.pipeline import constant_bytes, run_passes

    graph, source = load_graph(model_path)
    weights = source_weights(graph)  # the passes replace constants, never write them: these stay the source's
    if hessians is not None:  # GPTQ's statistics sessions run on these arrays
        hessians.share(weights)
    sparsity = recipe.sparsity.to_sparsity_config()
    sparse = sparsity.active
    if sparse and sparsity.method == "predictor":  # the guesser narrows gate/up: they must be plain MatMuls
        plans = _without_mlp_branches(graph, plans, statistics, notes)
    float_dtype = _float_dtype(graph, plans)
    # the LM head's input on the calibration text, tapped in GPTQ's first statistics pass where it was asked for
    hidden = hessians.source_values(hessians.kept[0]) if hessians is not None and hessians.kept else None
    distillation = _distillation(model_path, graph, recipe, profile, options, notes, hidden) \
        if recipe.distill.steps else None
    data = PassData(plans=plans, float_dtype=float_dtype, statistics=statistics,
                    hessians={} if hessians is None else hessians,
                    embeddings=recipe.weights.embeddings, smoothing=recipe.activations.smoothquant or None,
                    scale_search=recipe.weights.scale_search, asymmetric=recipe.weights.asymmetric,
                    distillation=distillation,
                    vocab_rows=_vocab_rows(model_path, graph, plans, recipe, profile, weights, options.device, hidden)
                    if recipe.vocab.refine_rows else None)
    del weights, hidden  # each source array is freed once its pass replaces it and GPTQ's sessions are done
    sparse_plans = sparsity_plans(model_path, graph, profile, sparsity) if sparse else None
    lower = recipe.backend == "tensorrt" and recipe.weights.asymmetric
    if lower and sparse:  # the SparseSkipMLP plugin reads symmetric INT4 blocks
        data = dataclasses.replace(data, plans=_symmetric_mlps(graph, data.plans, sparse_plans, notes))
    for note in notes:
        log.info("%s", note)
    parameters, source_bytes = _parameter_count(graph), constant_bytes(graph)
    passes = recipe_passes(recipe)
    gptq_done = passes.index("compensate_errors_gptq") + 1 if "compensate_errors_gptq" in passes else 0
    graph, reports, data = run_passes(graph, passes[:gptq_done], data)
    if hessians is not None:  # only GPTQ reads them: their memory is free before distillation
        hessians.clear()
    gc.collect()  # the source replica's module cycles hold source arrays the graph no longer uses
    data = dataclasses.replace(data, hessians={})
    graph, later, data = run_passes(graph, passes[gptq_done:], data)
    reports += later
    plans = data.plans  # as the passes left them (a rotated layer reads its rotated input)
    bits = _bits(graph, plans, parameters)  # per layer, before merging puts several layers in one MatMul
    if sparse:  # with the AWQ / SmoothQuant divisors the recipe passes folded
        config = skip_sparse_neurons.Config(plans=sparse_plans, dense_first=sparsity.dense_first,
                                            input_scales=data.input_scales)
        graph, sparse_reports, _ = run_passes(graph, [("skip_sparse_neurons", config)])
        reports += sparse_reports
    if lower:  # after the sparse rewrite, which finds the MLPs by their plain MatMuls
        graph, lowered, _ = run_passes(graph, ["lower_zero_points"])
        reports += lowered
        bits = _bits(graph, plans, parameters)  # the offsets counted with their layers
    graph, merged, _ = run_passes(graph, finishing, data)
    reports += merged
    notes = notes + [note for report in reports for note in report.notes]
    metadata = {RECIPE_KEY: recipe.name} | (sparsity_metadata(sparsity) if sparse else {})
    with atomic_dir(out_dir, overwrite=overwrite, kind=MANIFEST_KIND, protected=protected) as staging:
        save_graph(graph, source, staging / "model.onnx", metadata)
        copy_side_files(model_path.parent, staging)
        check_loads(staging / "model.onnx")
        manifest = {
            "kind": MANIFEST_KIND, "version": MANIFEST_VERSION,
            "source": {"path": str(model_path), "sha256": profile.manifest["model"]["sha256"],
                       "constant_bytes": source_bytes, "parameters": parameters},
            "profile": {"path": str(profile.folder), "policy": profile.manifest["policy"]["name"]},
            "recipe": recipe.to_dict(), "passes": [report.to_dict() for report in reports], "notes": notes,
            "input_scales": {name: {"max_scale": float(s.max()), "min_scale": float(s.min())}
                             for name, s in data.input_scales.items()},
            "sparsity": sparsity_summary(sparse_plans, sparsity) if sparse else None,
            "size": bits, "layers": [plan.to_dict() | {"bits_per_weight": bits["layers"].get(plan.node)}
                                     for plan in plans.values()],
            "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__,
                         "numpy": np.__version__},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _symmetric_mlps(graph, plans: dict[str, LayerPlan], sparse_plans: dict, notes: list[str]) -> dict:
    """``plans`` with the sparse MLPs' projections kept symmetric (``LayerPlan.symmetric``)."""
    from accullm_export.graph.mlp import find_mlp_blocks

    names = {node.name for block in find_mlp_blocks(graph) if block.name in sparse_plans
             for node in (block.gate, block.up, block.down) if node is not None}
    kept = {name: dataclasses.replace(plan, symmetric=True) if name in names and plan.bits == 4 else plan
            for name, plan in plans.items()}
    count = sum(kept[name] is not plans[name] for name in plans)
    notes.append(f"{count} sparse-skip MLP projections keep symmetric INT4 (the SparseSkipMLP plugin takes no zero "
                 "points)")
    return kept


def _float_dtype(graph, plans) -> np.dtype:
    import onnx_graphsurgeon as gs

    for node in graph.nodes:
        if node.name in plans and isinstance(node.inputs[1], gs.Constant):
            return np.dtype(node.inputs[1].values.dtype)
    return np.dtype(np.float32)


def _parameter_count(graph) -> int:
    import onnx_graphsurgeon as gs

    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and np.dtype(t.dtype).kind == "f" and t.shape and np.prod(t.shape) > 1)


def _bits(graph, plans: dict[str, LayerPlan], parameters: int) -> dict:
    """Effective bits per weight: per layer (its integer values, scales, zero points and FP16 outlier rows),
    over all linear layers, and over the whole file (every stored constant / the source's float parameters)."""
    import onnx_graphsurgeon as gs

    from accullm_export.graph.ir import stored_bytes
    from accullm_export.graph.pipeline import constant_bytes

    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    by_layer: dict[str, int] = {}
    for tensor in constants:
        owner = tensor.name.rsplit("/", 1)[0] if "/" in tensor.name else None
        if owner in plans:
            by_layer[owner] = by_layer.get(owner, 0) + stored_bytes(tensor)
    names = {t.name: t for t in constants}
    layers, stored, weights = {}, 0, 0
    for node, plan in plans.items():
        size = by_layer.get(node) or (stored_bytes(names[plan.weight]) if plan.weight in names else 0)
        count = plan.in_features * plan.out_features
        layers[node] = round(size * 8 / count, 4)
        stored, weights = stored + size, weights + count
    total = constant_bytes(graph)
    return {"layers": layers, "linear_bits_per_weight": round(stored * 8 / max(weights, 1), 4),
            "linear_weights": weights, "linear_bytes": stored, "file_constant_bytes": total,
            "file_bits_per_parameter": round(total * 8 / max(parameters, 1), 4)}


def check_side_files(source_dir: Path) -> dict[str, Path]:
    """The side files (``SIDE_FILES``) present beside a model: name -> resolved path, each a regular file inside
    ``source_dir`` (a symlink leaving it, a device or a FIFO is a UserError). Called before any heavy work."""
    return {name: inside(source_dir, name, what="side file") for name in SIDE_FILES
            if os.path.lexists(source_dir / name)}


def copy_side_files(source_dir: Path, staging: Path) -> None:
    """Tokenizer, configs and genai_config.json: the ``SIDE_FILES`` beside the model; nothing else travels."""
    for name, path in check_side_files(source_dir).items():
        shutil.copy2(path, staging / name)


def check_loads(path: Path) -> None:
    """onnx.checker and an ONNX Runtime session on the written model, before the folder is published."""
    from accullm_export.runtime.session import create_session

    onnx.checker.check_model(str(path))
    create_session(path, optimization="basic")


def _head_input_kept(header: onnx.ModelProto, layers, recipe: Recipe) -> tuple[str, ...]:
    """The LM head's input, for GPTQ's statistics pass to keep the values of when distillation (its teacher's
    final hidden states) or the head's row ranking reads them on no more windows than GPTQ's; else nothing."""
    from accullm_export.graph.passes.refine_vocab_rows import head_tensors

    wanted = max(recipe.distill.samples if recipe.distill.steps else 0,
                 recipe.vocab.samples if recipe.vocab.refine_rows else 0)
    found = head_tensors(header, layers) if 0 < wanted <= recipe.gptq.samples else None
    return () if found is None else (found[0].input,)


def _hessians(model_path: Path, header: onnx.ModelProto, plans: dict[str, LayerPlan], profile, samples: int,
              options: QuantizeOptions, notes: list[str], first: Sequence[str] = (), kept: Sequence[str] = ()):
    """E[x x^T] of every low-bit layer's input over ``gptq.samples`` calibration windows, streamed
    (``StreamedHessians``): collected a group of layers at a time as the passes read them, in graph order; the
    inputs of the layers in ``first`` (read by a pass before GPTQ too) collected ahead of the rest and kept; the
    values of the tensors ``kept`` tapped in the first pass (``StreamedHessians.source_values``)."""
    from accullm_export.calibration.hessian import StreamedHessians
    from accullm_export.calibration.run import profile_feeds

    order = {node.name: index for index, node in enumerate(header.graph.node)}
    quantized = sorted((plan for plan in plans.values() if plan.quantized),
                       key=lambda plan: order.get(plan.node, len(order)))
    channels = {plan.input: plan.in_features for plan in quantized}
    feeds = profile_feeds(model_path, profile, samples)
    if len(feeds) < samples:
        notes.append(f"GPTQ: gptq.samples is {samples}, but the profile holds {len(feeds)} calibration windows, so "
                     f"GPTQ used {len(feeds)} (calibrate with --samples {samples} for more)")
    hessians = StreamedHessians(model_path, channels, lambda: feeds, budget_bytes=options.budget_mb << 20,
                                matrix_bytes=options.moments_mb << 20, device=options.device,
                                pinned=[plans[node].input for node in first if node in plans], kept=kept)
    log.info("second moments of %d input tensors over %d calibration windows, in %d group(s)", len(channels),
             len(feeds), len(hessians.groups))
    return hessians


def source_weights(graph) -> dict[str, np.ndarray]:
    """The graph's large float constants by name, as loaded: what a session of the source model can run on in
    place of loading its weights again (``create_session``'s ``shared_initializers``)."""
    import onnx_graphsurgeon as gs

    from accullm_export.graph.ir import constant_array

    weights = {}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant):
            values = constant_array(tensor)
            if values.dtype.kind == "f" and values.size >= 1024 and values.flags.c_contiguous:
                weights[name] = values
    return weights


def _vocab_rows(model_path: Path, graph, plans: dict[str, LayerPlan], recipe: Recipe, profile,
                weights: dict[str, np.ndarray], device: str, hidden: np.ndarray | None = None):
    """The LM head, its source weight and its input on ``vocab.samples`` calibration windows, for
    ``vocab.refine_rows``; ``hidden``: that input on the profile's first windows, already read (else the source
    model runs here)."""
    from accullm_export.calibration.run import profile_feeds
    from accullm_export.graph.io import load_onnx
    from accullm_export.graph.passes.refine_vocab_rows import VocabRows, head_tensors
    from accullm_export.graph.rewrite import float_weight
    from accullm_export.runtime.intermediates import IntermediateReader

    header = load_onnx(model_path, load_external_data=False)
    found = head_tensors(header, find_linear_layers(header))
    if found is None:
        raise UserError(f"vocab.refine_rows: no MatMul of {model_path} writes its first output (the logits) directly; "
                        "it refines an LM head")
    layer, output = found
    plan = plans[layer.node]
    if plan.precision != "int4":
        raise UserError(f"vocab.refine_rows: the LM head {layer.node} is {plan.precision}; it refines an INT4 head")
    if recipe.vocab.refine_rows > layer.out_features:
        raise UserError(f"vocab.refine_rows {recipe.vocab.refine_rows} is over the head's {layer.out_features} rows")
    node = next(node for node in graph.nodes if node.name == layer.node)
    weight = float_weight(node)
    if weight is None:
        raise UserError(f"vocab.refine_rows: the LM head {layer.node}'s weight is not a float constant")
    feeds = profile_feeds(model_path, profile, recipe.vocab.samples)
    if not feeds or "input_ids" not in feeds[0]:
        raise UserError("vocab.refine_rows needs an LLM profile (calibration windows of token ids)")
    count = sum(len(feed["input_ids"]) for feed in feeds)
    if hidden is not None and len(hidden) >= count:
        values = [hidden[:count]]
    else:
        tap = IntermediateReader(model_path, shared_initializers=weights, device=device).open([layer.input])
        values = [tap.run(feed)[layer.input] for feed in feeds]
    if any(value.ndim != 3 for value in values):
        raise UserError(f"vocab.refine_rows: the LM head {layer.node} reads a tensor of rank {values[0].ndim}, not "
                        "[batch, sequence, channels]")
    samples = np.concatenate([value[:, 1:].reshape(-1, layer.in_features) for value in values])  # sink left out
    log.info("vocab.refine_rows: the head's input on %d calibration rows", len(samples))
    return VocabRows(count=recipe.vocab.refine_rows, head=layer.node, input=layer.input, output=output,
                     samples=samples.astype(np.float32), source_weight=np.asarray(weight.values, dtype=np.float32))


def _distillation(model_path: Path, graph, recipe: Recipe, profile, options: QuantizeOptions, notes: list[str],
                  hidden: np.ndarray | None = None):
    """The calibration windows the block scales are distilled on and the teacher's outputs on them: ``hidden``,
    the source model's LM head input on the profile's first windows where it was already read, else the source
    model run here (before any pass replaces its weights)."""
    from accullm_export.calibration.run import profile_feeds
    from accullm_export.graph.passes.distill_scales import DistillInputs, graph_weights
    from accullm_export.training.distill import DistillConfig, teacher_from_hidden, teacher_outputs

    if not (model_path.parent / "config.json").is_file():
        raise UserError(f"distill.steps needs the export folder's config.json beside {model_path} (it builds a "
                        "torch replica of the model); quantize an exported LLM folder")
    wanted = recipe.distill.samples
    feeds = profile_feeds(model_path, profile, wanted)
    if not feeds or "input_ids" not in feeds[0]:
        raise UserError("distill.steps needs an LLM profile (calibration windows of token ids)")
    if len(feeds) < wanted:
        notes.append(f"distillation: the profile holds {len(feeds)} calibration windows, fewer than the "
                     f"{wanted} asked for")
    windows = np.concatenate([np.asarray(feed["input_ids"], dtype=np.int64) for feed in feeds], axis=0)
    config = DistillConfig(steps=recipe.distill.steps, learning_rate=recipe.distill.lr,
                           batch_windows=options.distill_batch, norms=recipe.distill.norms,
                           outlier_rows=recipe.distill.outlier_rows, device=options.device,
                           precision=recipe.distill.precision, weight_steps=recipe.distill.weight_steps)
    weights = graph_weights(graph)
    head = weights.get("lm_head.weight")  # the replica's head, [vocabulary, hidden]
    if hidden is not None and head is not None and len(hidden) >= len(windows) \
            and hidden.shape[1] == windows.shape[1]:
        teacher = teacher_from_hidden(model_path.parent, hidden[:len(windows)], head, options.device)
    else:
        log.info("distillation: the source model's outputs on %d calibration windows", len(windows))
        teacher = teacher_outputs(model_path.parent, weights, windows, options.device)
    return DistillInputs(config=config, config_dir=model_path.parent, teacher=teacher, windows=windows)
