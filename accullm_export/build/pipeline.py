"""``build``: the whole pipeline for one target, from a checkpoint or an ONNX file to what runs on the device.

export (unless MODEL is ONNX already) -> calibrate -> quantize (+ sparsify) -> validate with gates -> the
target step: an ONNX Runtime model folder (``cpu``), a TensorRT engine (TensorRT importable and a GPU present)
or a deployment bundle to finish on the device (TensorRT absent: the expected result on a workstation).

Everything is staged in a temporary folder beside OUT and appears only at the end. When a gate fails, the
folder still appears with the work and the validation report (nothing measured is lost) but without a
deployable model, and the command exits 1; a failing target step (TensorRT's build, say) likewise keeps the
validated model and exits with that error's code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import onnx

import accullm_export
from accullm_export.atomic import atomic_dir
from accullm_export.errors import AccuLLMError, AccuracyError, UserError
from accullm_export.sparsity.config import SparsityConfig
from accullm_export.targets import TargetProfile, get_target

log = logging.getLogger(__name__)

MANIFEST_KIND, MANIFEST_VERSION = "accullm-export/build", 1
# gates applied unless the user gives others (None turns one off); generous enough for the sample model
DEFAULT_GATES = {
    "fp16": {"max-kl": 0.01, "min-top1": 0.97},
    "w8a8": {"max-kl": 0.05, "min-top1": 0.9},
    "w4a16": {"max-kl": 0.5, "min-top1": 0.6},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """The ``build`` command line."""

    target: str
    recipe: str | None = None  # None: the target's default recipe
    sparsity: SparsityConfig | None = None
    block_size: int = 128
    gptq: bool = True
    calib: str = "wiki"  # text source, or a load_data() script for a plain ONNX model
    calib_samples: int = 32
    calib_seq_len: int = 512
    validation_windows: int = 8
    validation_seq_len: int = 256
    validation_prompts: int = 4
    gates: dict | None = None  # gate name -> threshold; None: DEFAULT_GATES for the recipe
    max_batch: int = 1
    max_seq_len: int = 2048
    distill_steps: int = 0  # w4a16 on a decoder: train block scales, norm gains and outlier rows (0: off)
    version: int = 1

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["sparsity"] = self.sparsity.to_dict() if self.sparsity else None
        return data


@dataclasses.dataclass
class Step:
    name: str
    seconds: float
    output: str


def build(model: str, out_dir: str | Path, options: BuildOptions, *, overwrite: bool = False) -> dict:
    """Run the pipeline; returns the manifest (also OUT/manifest.json).

    Raises:
        UserError: an unknown target, a recipe the target cannot run, bad MODEL.
        AccuracyError: a failed gate (OUT then holds the work and the validation report, no deployable).
    """
    target = get_target(options.target)
    recipe = options.recipe or target.default_recipe
    target.check_recipe(recipe)
    if recipe == "fp8":
        raise UserError("the fp8 recipe is not implemented yet (quantize offers w8a8, w4a16 and fp16)")
    if options.distill_steps < 0:
        raise UserError(f"--distill-steps must be 0 (off) or positive, not {options.distill_steps}")
    if options.distill_steps and recipe != "w4a16":
        raise UserError(f"--distill-steps trains w4a16's INT4 block scales; the {recipe} recipe has none to train")
    steps: list[Step] = []
    failure: AccuLLMError | None = None
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        work = staging / "work"
        work.mkdir()
        reference = _step(steps, "export", lambda: _reference(model, work / "export"), staging)
        is_llm = _is_llm(reference)
        if options.distill_steps and not is_llm:
            raise UserError(f"--distill-steps trains against the source model's next-token distributions: "
                            f"{reference} is not an exported decoder")
        profile = _step(steps, "calibrate", lambda: _calibrate(reference, work / "profile", options, is_llm),
                        staging)
        rewritten = _step(steps, "quantize", lambda: _quantize(reference, work / "model", profile, recipe, options,
                                                              target, is_llm), staging)
        try:
            report = _step(steps, "validate", lambda: _validate(reference, rewritten, staging / "validation",
                                                                  options, recipe, is_llm), staging,
                           shown="validation/report.html")
        except AccuracyError as exc:
            failure, report = exc, json.loads((staging / "validation" / "report.json").read_text())
        deliverable = None
        if failure is None:
            try:
                deliverable = _step(steps, "target", lambda: _target_step(target, rewritten, profile, staging,
                                                                          options, recipe, is_llm), staging,
                           shown="validation/report.html")
            except AccuLLMError as exc:  # keep the validated model and its report; say what failed
                failure = exc
        manifest = _manifest(model, target, recipe, options, steps, report, deliverable, rewritten, failure,
                             staging)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if failure is not None:
        raise type(failure)(f"{failure} (the work and the validation report are in {out_dir})")
    return manifest


def _step(steps: list[Step], name: str, function, staging: Path, shown: str | None = None):
    """Run one step, timed; ``shown`` (default: the step's result or its "path") is what the summary lists."""
    started = time.perf_counter()
    log.info("build: %s ...", name)
    result = function()
    output = shown or (result.get("path", "") if isinstance(result, dict) else result)
    if isinstance(output, Path) and staging in output.parents:
        output = output.relative_to(staging)  # where it will be once the folder appears
    steps.append(Step(name, round(time.perf_counter() - started, 2), str(output)))
    return result


def _is_llm(model_dir: Path) -> bool:
    from accullm_export.validate.pipeline import detect_mode

    return detect_mode(model_dir, model_dir) == "llm"


def _reference(model: str, export_dir: Path) -> Path:
    """The full-precision ONNX model: MODEL itself if it is ONNX, else its fp32 export."""
    path = Path(model)
    if path.suffix == ".onnx" and path.is_file():
        return path
    if path.is_dir() and (path / "model.onnx").is_file():
        return path
    from accullm_export.models.export import export_model

    export_model(model, export_dir)
    return export_dir


def _calibrate(reference: Path, profile_dir: Path, options: BuildOptions, is_llm: bool) -> Path:
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    if not is_llm and not options.calib.endswith(".py"):
        raise UserError(f"{reference} is not an exported decoder: give --calib a load_data() script "
                        "(see calibrators/), which also feeds the Polygraphy comparison")
    calibrate(reference, profile_dir, CalibrationConfig(source=options.calib, samples=options.calib_samples,
                                                        seq_len=options.calib_seq_len))
    return profile_dir


def _quantize(reference: Path, out: Path, profile: Path, recipe: str, options: BuildOptions,
              target: TargetProfile, is_llm: bool) -> Path:
    from accullm_export.build.quantize import FINISHING_PASSES, ONNXRUNTIME_FUSIONS, quantize_model
    from accullm_export.graph.recipes import Recipe

    quantized = recipe != "fp16"
    extra: dict = {}  # recipe options this target and model call for
    if recipe == "w8a8" and target.backend == "onnxruntime":  # an integer GEMM with per-token, per-group scales
        extra = dict(activations="dynamic", activation_group=_activation_group(reference),
                     gptq=options.gptq and is_llm)
    elif recipe == "w8a8":  # TensorRT's explicit quantization takes static per-tensor scales
        extra = dict(activations="static", smoothquant=0.85)
    elif recipe == "w4a16":  # with GPTQ, o_proj/down_proj branches did not lower the KL on the sample; the
        # searched block scales cut the KL by a quarter there. Zero points (ONNX Runtime only; TensorRT takes
        # none) cut it by another fifth there at the same decode speed. 8-bit scale codes save 0.125 bits per
        # weight at block 64 and changed nothing measurable there (ONNX Runtime folds them at load time); INT8
        # outlier rows save 0.064 more there, for +0.1 Δppl points on 32 windows (TensorRT's plugin takes FP16 rows).
        # The rotated LM head (--rotate lm_head) cut this build's KL from 0.127 to 0.115 there at block 128, at no
        # measurable decode cost (TensorRT targets keep the plain head, which their OutlierSplitGemm swap takes)
        # The busiest twelfth of the head's vocabulary refined (--refine-vocab): on the sample at block 128 Δppl
        # +8.71% -> +7.72%, KL 0.115 -> 0.104 on 8 windows, for 0.072 bits per weight and no measurable decode cost
        # (0.91x genai-int4-b128 both, 101 rounds); without the head's branch too: +8.38% at 0.93x, so it stays.
        # The branches folded into the INT4 weights as two planes (--outlier-planes) where the input is whole
        # blocks (K % block == 0: block 64 on the sample, not 128): the best block-64 build decoded at 0.91-0.97x
        # instead of 0.85-0.92x genai, Δppl +4.91% instead of +4.84% on 32 windows; the branches left (the rotated
        # head's, the attention sink's, partial blocks) get the INT8 rows (TensorRT's plugin takes FP16 branches)
        onnxruntime = target.backend == "onnxruntime"
        extra = dict(gptq=options.gptq, scale_search=True, asymmetric=onnxruntime, scale_bits=8 if onnxruntime else 16,
                     outlier_planes=onnxruntime, outlier_bits=8 if onnxruntime else 16,
                     outlier_layers=("residual",) if is_llm and options.gptq else (),
                     rotate=("lm_head",) if onnxruntime and is_llm and _has_layer(reference, "lm_head") else (),
                     refine_vocab=_vocab_rows_to_refine(reference) if onnxruntime and is_llm else 0,
                     # --distill-steps: the best command's training (README): scales, norm gains, outlier rows
                     distill_steps=options.distill_steps, distill_norms=bool(options.distill_steps),
                     distill_outlier_rows=bool(options.distill_steps))
    quantize_model(reference, out, Recipe(name=recipe, block_size=options.block_size,
                                          policy="sensitivity" if quantized else None, **extra),
                   profile, sparsity=options.sparsity,
                   finishing=FINISHING_PASSES + ONNXRUNTIME_FUSIONS if target.backend == "onnxruntime" else ())
    return out


def _header(reference: Path):
    """The model's graph without its weights."""
    from accullm_export.graph.io import load_onnx

    return load_onnx(reference / "model.onnx" if reference.is_dir() else reference, load_external_data=False)


def _linear_layers(reference: Path) -> list:
    """The model's linear layers (``graph.linear.find_linear_layers``), read from its header only."""
    from accullm_export.graph.linear import find_linear_layers

    return find_linear_layers(_header(reference))


def _vocab_rows_to_refine(reference: Path) -> int:
    """A twelfth of the LM head's rows (in multiples of 64 where that leaves any; 4,096 of the sample's 49,152),
    or 0 when no MatMul writes the logits directly."""
    from accullm_export.graph.linear import find_linear_layers
    from accullm_export.graph.passes.refine_vocab_rows import head_tensors

    header = _header(reference)
    found = head_tensors(header, find_linear_layers(header))
    if found is None:
        return 0
    twelfth = found[0].out_features // 12
    return twelfth // 64 * 64 or twelfth


def _has_layer(reference: Path, pattern: str) -> bool:
    """Whether a linear layer of the model matches ``pattern`` (as ``--override`` matches)."""
    from accullm_export.graph.recipes import override_matches

    return any(override_matches(pattern, layer.node) for layer in _linear_layers(reference))


def _activation_group(reference: Path) -> int:
    """32 input channels per dynamic scale (as MatMulNBits at accuracy level 4) where every linear layer's width
    allows it, else 16, else one scale per token."""
    from accullm_export.graph.recipes import activation_groups

    usable = activation_groups(_linear_layers(reference))
    return next((group for group in (32, 16) if group in usable), 0)


def _validate(reference: Path, candidate: Path, report_dir: Path, options: BuildOptions, recipe: str,
              is_llm: bool) -> dict:
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, check_gates, validate
    from accullm_export.validate.report import format_summary

    gates = DEFAULT_GATES.get(recipe, {}) if options.gates is None else options.gates
    llm = LLMValidationConfig(windows=options.validation_windows, seq_len=options.validation_seq_len,
                              num_prompts=options.validation_prompts, probes_per_task=0)
    report = validate(reference, candidate, ValidateOptions(
        llm=llm, gates=gates if is_llm else {}, report_dir=str(report_dir),
        data_loader=None if is_llm else options.calib, atol=1e-1 if not is_llm else 1e-5, rtol=1e-1))
    print(format_summary(report))
    check_gates(report)
    return report


def _target_step(target: TargetProfile, model_dir: Path, profile: Path, staging: Path, options: BuildOptions,
                 recipe: str, is_llm: bool) -> dict:
    if target.backend == "onnxruntime":
        destination = staging / "model"
        shutil.copytree(model_dir, destination)
        return {"kind": "onnxruntime-folder", "path": str(destination.name)}
    from accullm_export.build.engine import tensorrt_available

    available, reason = tensorrt_available()
    if available:
        from accullm_export.build.engine import build_engine

        return build_engine(model_dir, staging, target, recipe, options, is_llm)
    from accullm_export.build.bundle import write_bundle

    return write_bundle(model_dir, profile, staging / "validation", staging / "bundle", target, recipe, options,
                        is_llm) | {"reason": reason}


def bytes_per_token(model_path: Path) -> int:
    """Weight bytes one decode step reads: every initializer, but only one row of an embedding table."""
    import numpy as np

    from accullm_export.graph.summary import storage_bytes

    path = model_path / "model.onnx" if model_path.is_dir() else model_path
    model = onnx.load(str(path), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node if node.op_type in ("Gather", "GatherBlockQuantized")}
    total = 0
    for tensor in model.graph.initializer:
        size = storage_bytes(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), int(np.prod(tensor.dims)))
        if tensor.name in gathered and len(tensor.dims) == 2:
            size //= max(tensor.dims[0], 1)  # one row per token
        total += size
    return total


def measure_cpu_bandwidth(megabytes: int = 256) -> float:
    """GB/s of a large copy on this machine (read + write), the CPU target's roofline."""
    import numpy as np

    source = np.ones(megabytes << 18, dtype=np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9


def _manifest(model, target, recipe, options, steps, report, deliverable, rewritten, failure, staging) -> dict:
    per_token = bytes_per_token(rewritten)
    bandwidth = target.bandwidth_gbps or measure_cpu_bandwidth()
    ceiling = target.decode_ceiling(per_token, bandwidth)
    metrics = report.get("metrics") or {}
    return {
        "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "status": _status(failure),
        "model": str(model), "target": target.to_dict(), "recipe": recipe, "options": options.to_dict(),
        "steps": [dataclasses.asdict(step) for step in steps],
        "accuracy": {"metrics": metrics, "greedy": {k: v for k, v in (report.get("greedy") or {}).items()
                                                    if k != "prompts"},
                     "gates": report.get("gates", [])},
        "roofline": {"bytes_per_token": per_token, "bandwidth_gbps": round(bandwidth, 1),
                     "decode_ceiling_tokens_per_s": round(ceiling, 1) if ceiling else None},
        "deliverable": deliverable, "error": str(failure) if failure else None,
        "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__},
    }


def _status(failure: Exception | None) -> str:
    if failure is None:
        return "ok"
    return "failed-gates" if isinstance(failure, AccuracyError) else "failed-target-step"


def format_build_summary(manifest: dict, out_dir: str) -> str:
    """The final summary: sizes, accuracy, the speed ceiling and where everything went."""
    target, roofline = manifest["target"], manifest["roofline"]
    metrics = manifest["accuracy"]["metrics"]
    lines = [f"build for {target['name']} ({target['device']}), recipe {manifest['recipe']}: {manifest['status']}"]
    for step in manifest["steps"]:
        lines.append(f"  {step['name']:<10} {step['seconds']:8.1f} s  {step['output']}")
    if metrics:
        lines.append(f"accuracy: KL {metrics['kl_mean']:.4g}, top-1 {metrics['top1_agreement']:.3f}, "
                     f"perplexity {metrics['ppl_delta_pct']:+.2f}%")
    ceiling = roofline["decode_ceiling_tokens_per_s"]
    lines.append(f"decode ceiling on {target['device']}: {roofline['bytes_per_token'] / 2**20:.1f} MiB read per "
                 f"token / {roofline['bandwidth_gbps']} GB/s = {ceiling} tokens/s at batch 1")
    sparsity = manifest["options"].get("sparsity")
    if sparsity and target["backend"] == "onnxruntime":
        lines.append("note: sparse-skip MLPs run slower than dense on ONNX Runtime's CPU (Compress copies the kept "
                     "rows); they pay off with the accullm::SparseSkipMLP plugin on TensorRT targets")
    deliverable = manifest["deliverable"]
    if deliverable:
        lines.append(f"output: {out_dir}/{deliverable['path']} ({deliverable['kind']}); manifest: "
                     f"{out_dir}/manifest.json; validation: {out_dir}/validation/report.html")
    return "\n".join(lines)
