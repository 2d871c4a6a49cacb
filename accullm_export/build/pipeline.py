"""``build``: the whole pipeline for one target, from a checkpoint or an ONNX file to what runs on the device.

export (unless MODEL is ONNX already) -> calibrate -> quantize (+ sparsify) -> validate with gates -> the
target step: an ONNX Runtime model folder (``cpu``), a TensorRT engine (TensorRT importable and a GPU present)
or a deployment bundle to finish on the device (TensorRT absent: the expected result on a workstation). With
``golden`` set, a golden folder follows (``build.golden``): that deliverable as the draft and a verifier beside
it, for lossless speculative decoding.

Everything is staged in a temporary folder beside OUT and appears only at the end. When a gate fails, the
folder still appears with the work and the validation report (nothing measured is lost) but without a
deployable model, and the command exits 1; a failing target step (TensorRT's build, say) likewise keeps the
validated model and exits with that error's code, and so does a failing golden step, leaving no golden folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import shutil
import time
from pathlib import Path

import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.errors import AccuLLMError, AccuracyError, UserError
from accullm_export.recipes.config import DistillConfig, Recipe, RotationConfig, VocabConfig
from accullm_export.targets import TargetProfile, get_target
from accullm_export.targets.roofline import bytes_per_token, measure_cpu_bandwidth

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
    recipe: Recipe | None = None  # None: the target's default preset, resolved for its backend
    calib: str = "wiki"  # text source, or a load_data() script for a plain ONNX model
    calib_samples: int | None = None  # None: as many windows as the recipe's GPTQ and distillation use
    calib_seq_len: int = 512
    validation_windows: int = 8
    validation_seq_len: int = 256
    validation_prompts: int = 4
    gates: dict | None = None  # gate name -> threshold; None: DEFAULT_GATES for the recipe's scheme
    max_batch: int = 1
    max_seq_len: int = 2048
    tensorrt_version: str | None = None  # None: the target's; what the bundle's ONNX is lowered for
    golden: str | None = None  # None: no golden folder; else its verifier, "reference" or "w8"
    device: str = "cpu"  # where quantize's statistics passes and distillation run: "cpu" or "cuda"
    version: int = 2

    def __post_init__(self):  # the command line's types check ranges too; this keeps the API from writing
        # negative engine dimensions
        counts = ["calib_seq_len", "validation_windows", "validation_seq_len", "validation_prompts", "max_batch",
                  "max_seq_len"] + (["calib_samples"] if self.calib_samples is not None else [])
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise UserError(f"build option {name} must be a positive integer, got {value!r}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"build option device must be cpu or cuda, got {self.device!r}")
        if self.tensorrt_version is not None:
            from accullm_export.targets.tensorrt_support import parse_tensorrt_version

            object.__setattr__(self, "tensorrt_version", parse_tensorrt_version(self.tensorrt_version))
        for gate, value in (self.gates or {}).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or value < 0):
                raise UserError(f"gate {gate} must be a finite number of at least 0, got {value!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["recipe"] = self.recipe.to_dict() if self.recipe else None
        return data


def target_recipe(target: TargetProfile, recipe: Recipe | None) -> Recipe:
    """``recipe`` (resolved for the target's backend, else refused), or the target's default preset."""
    from accullm_export.recipes.presets import get_preset

    if recipe is None:
        recipe = get_preset(target.default_preset).resolve(target.backend)
    if recipe.backend != target.backend:
        raise UserError(f"the recipe was resolved for {recipe.backend}, and target {target.name} runs "
                        f"{target.backend}; resolve it for {target.backend}")
    target.check_recipe(recipe.scheme)
    return recipe


def tensorrt_version(target: TargetProfile, options: BuildOptions) -> str | None:
    """The TensorRT version the target's ONNX is lowered for: ``--tensorrt-version``, else the target's."""
    if target.backend != "tensorrt":
        if options.tensorrt_version is not None:
            raise UserError(f"--tensorrt-version applies to TensorRT targets; target {target.name} runs "
                            f"{target.backend}")
        return None
    from accullm_export.targets.tensorrt_support import parse_tensorrt_version

    return parse_tensorrt_version(options.tensorrt_version or target.tensorrt_version)


def for_plain_onnx(recipe: Recipe) -> Recipe:
    """A recipe without the keys that need a decoder: its residual-stream readers, distillation against its
    next-token distributions, its LM head's rotation and refinement."""
    layers = tuple(p for p in recipe.outliers.layers if p not in ("residual", "!lm_head"))
    plain = dataclasses.replace(recipe, outliers=dataclasses.replace(recipe.outliers, layers=layers),
                                distill=DistillConfig(), rotation=RotationConfig(), vocab=VocabConfig())
    dropped = [key for key, (before, after) in {
        "outliers.layers": (recipe.outliers.layers, layers), "distill.steps": (recipe.distill.steps, 0),
        "rotation.layers": (recipe.rotation.layers, ()), "vocab.refine_rows": (recipe.vocab.refine_rows, 0)}.items()
        if before != after]
    if dropped:
        log.info("build: not a decoder, so the recipe's decoder-only keys are left out: %s", ", ".join(dropped))
    return plain


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
    from accullm_export.build.quantize import check_side_files

    inputs = [model, options.calib if Path(options.calib).is_file() else None]  # wiki names no file
    check_output(out_dir, MANIFEST_KIND, overwrite, protected=inputs)
    target = get_target(options.target)
    recipe = target_recipe(target, options.recipe)
    tensorrt = tensorrt_version(target, options)
    if options.golden is not None:
        from accullm_export.build.golden import check_request

        check_request(model, target, recipe, options.golden)
    steps: list[Step] = []
    failure: AccuLLMError | None = None
    failed_step = None
    with atomic_dir(out_dir, overwrite=overwrite, kind=MANIFEST_KIND, protected=inputs) as staging:
        work = staging / "work"
        work.mkdir()
        reference = _step(steps, "export", lambda: _reference(model, work / "export"), staging)
        check_side_files(reference if reference.is_dir() else reference.parent)  # before calibrating
        is_llm = _is_llm(reference)
        if options.golden is not None and not is_llm:
            raise UserError(f"--golden pairs two decoders for speculative decoding; {model} is not an exported "
                            "decoder (input_ids, past_key_values, logits)")
        if tensorrt is not None:  # before calibrating: what the lowering cannot fix
            from accullm_export.build.lowering import check_lowerable

            onnx_path = reference / "model.onnx" if reference.is_dir() else reference
            check_lowerable(onnx_path, tensorrt, str(onnx_path))
        if not is_llm:
            recipe = for_plain_onnx(recipe)
        profile = _step(steps, "calibrate", lambda: _calibrate(reference, work / "profile", options, recipe,
                                                               is_llm), staging)
        rewritten = _step(steps, "quantize",
                          lambda: _quantize(reference, work / "model", profile, recipe, options.device), staging)
        try:
            report = _step(steps, "validate", lambda: _validate(reference, rewritten, staging / "validation",
                                                                  options, recipe, is_llm), staging,
                           shown="validation/report.html")
        except AccuracyError as exc:
            failure, report = exc, json.loads((staging / "validation" / "report.json").read_text())
        deliverable = golden = None
        if failure is None:
            try:
                deliverable = _step(steps, "target", lambda: _target_step(target, rewritten, profile, staging,
                                                                          options, recipe, is_llm, tensorrt),
                                    staging)
            except AccuLLMError as exc:  # keep the validated model and its report; say what failed
                failure, failed_step = exc, "target"
        if failure is None and options.golden is not None:
            from accullm_export.build.golden import write_golden

            try:
                golden = _step(steps, "golden", lambda: write_golden(staging, model, reference, deliverable,
                                                                     recipe, options), staging)
            except AccuLLMError as exc:  # the deliverable stands; write_golden removed its folder
                failure, failed_step = exc, "golden"
        manifest = _manifest(model, target, recipe, options, steps, report, deliverable, rewritten, failure,
                             tensorrt, failed_step)
        manifest["golden"] = golden
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


def _calibrate(reference: Path, profile_dir: Path, options: BuildOptions, recipe: Recipe, is_llm: bool) -> Path:
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    if not is_llm and not options.calib.endswith(".py"):
        raise UserError(f"{reference} is not an exported decoder: give --calib a load_data() script "
                        "(see calibrators/), which also feeds the Polygraphy comparison")
    samples = options.calib_samples or max(32, recipe.gptq.samples if recipe.gptq.enabled else 0,
                                           recipe.distill.samples if recipe.distill.steps else 0)
    calibrate(reference, profile_dir, CalibrationConfig(source=options.calib, samples=samples,
                                                        seq_len=options.calib_seq_len))
    return profile_dir


def _quantize(reference: Path, out: Path, profile: Path, recipe: Recipe, device: str) -> Path:
    from accullm_export.build.quantize import QuantizeOptions, quantize_model

    quantize_model(reference, out, recipe, profile, options=QuantizeOptions(device=device))
    return out


def _validate(reference: Path, candidate: Path, report_dir: Path, options: BuildOptions, recipe: Recipe,
              is_llm: bool) -> dict:
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, check_gates, validate
    from accullm_export.validate.report import format_summary

    gates = DEFAULT_GATES.get(recipe.scheme, {}) if options.gates is None else options.gates
    llm = LLMValidationConfig(windows=options.validation_windows, seq_len=options.validation_seq_len,
                              num_prompts=options.validation_prompts, probes_per_task=0)
    report = validate(reference, candidate, ValidateOptions(
        llm=llm, gates=gates if is_llm else {}, report_dir=str(report_dir),
        data_loader=None if is_llm else options.calib, atol=1e-1 if not is_llm else 1e-5, rtol=1e-1))
    print(format_summary(report))
    check_gates(report)
    return report


def _target_step(target: TargetProfile, model_dir: Path, profile: Path, staging: Path, options: BuildOptions,
                 recipe: Recipe, is_llm: bool, tensorrt: str | None) -> dict:
    if target.backend == "onnxruntime":
        destination = staging / "model"
        shutil.copytree(model_dir, destination)
        return {"kind": "onnxruntime-folder", "path": str(destination.name)}
    from accullm_export.build.engine import tensorrt_available

    available, reason = tensorrt_available()
    if available:
        from accullm_export.build.engine import build_engine
        from accullm_export.build.lowering import lower_for_tensorrt, runs_on

        installed = ".".join(reason.split(".")[:2])
        if not runs_on(tensorrt, installed):
            raise UserError(f"TensorRT {installed} is installed here and the model is lowered for TensorRT "
                            f"{tensorrt}: pass --tensorrt-version {installed}")
        lowered = staging / "work" / "tensorrt"
        shutil.copytree(model_dir, lowered)
        lower_for_tensorrt(lowered / "model.onnx", tensorrt)
        from accullm_export.targets.tensorrt_support import check_or_raise

        check_or_raise(lowered / "model.onnx", tensorrt, "the model")
        return build_engine(lowered, staging, target, recipe.scheme, options, is_llm) | {
            "tensorrt_version": tensorrt}
    from accullm_export.build.bundle import write_bundle

    return write_bundle(model_dir, profile, staging / "validation", staging / "bundle", target, recipe.scheme,
                        options, is_llm, tensorrt) | {"reason": reason}


def _manifest(model, target, recipe, options, steps, report, deliverable, rewritten, failure, tensorrt,
              failed_step) -> dict:
    per_token = bytes_per_token(rewritten)
    bandwidth = target.bandwidth_gbps or measure_cpu_bandwidth()
    ceiling = target.decode_ceiling(per_token, bandwidth)
    metrics = report.get("metrics") or {}
    return {
        "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "status": _status(failure, failed_step),
        "model": str(model), "target": target.to_dict(), "recipe": recipe.to_dict(),
        "options": options.to_dict(),
        "steps": [dataclasses.asdict(step) for step in steps],
        "accuracy": {"metrics": metrics, "greedy": {k: v for k, v in (report.get("greedy") or {}).items()
                                                    if k != "prompts"},
                     "gates": report.get("gates", [])},
        "roofline": {"bytes_per_token": per_token, "bandwidth_gbps": round(bandwidth, 1),
                     "decode_ceiling_tokens_per_s": round(ceiling, 1) if ceiling else None},
        "deliverable": deliverable, "error": str(failure) if failure else None,
        "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__},
        "tensorrt_version": tensorrt,
    }


def _status(failure: Exception | None, failed_step: str | None) -> str:
    if failure is None:
        return "ok"
    return "failed-gates" if isinstance(failure, AccuracyError) else f"failed-{failed_step}-step"


def format_build_summary(manifest: dict, out_dir: str) -> str:
    """The final summary: sizes, accuracy, the speed ceiling and where everything went."""
    target, roofline = manifest["target"], manifest["roofline"]
    metrics = manifest["accuracy"]["metrics"]
    recipe = manifest["recipe"]
    lines = [f"build for {target['name']} ({target['device']}), recipe {recipe['name']} ({recipe['backend']}): "
             f"{manifest['status']}"]
    for step in manifest["steps"]:
        lines.append(f"  {step['name']:<10} {step['seconds']:8.1f} s  {step['output']}")
    if metrics:
        lines.append(f"accuracy: KL {metrics['kl_mean']:.4g}, top-1 {metrics['top1_agreement']:.3f}, "
                     f"perplexity {metrics['ppl_delta_pct']:+.2f}%")
    ceiling = roofline["decode_ceiling_tokens_per_s"]
    lines.append(f"decode ceiling on {target['device']}: {roofline['bytes_per_token'] / 2**20:.1f} MiB read per "
                 f"token / {roofline['bandwidth_gbps']} GB/s = {ceiling} tokens/s at batch 1")
    if recipe["sparsity"]["fraction"] and target["backend"] == "onnxruntime":
        lines.append("note: sparse-skip MLPs run slower than dense on ONNX Runtime's CPU (Compress copies the kept "
                     "rows); they pay off with the accullm::SparseSkipMLP plugin on TensorRT targets")
    deliverable = manifest["deliverable"]
    if deliverable:
        lines.append(f"output: {out_dir}/{deliverable['path']} ({deliverable['kind']}); manifest: "
                     f"{out_dir}/manifest.json; validation: {out_dir}/validation/report.html")
    golden = manifest.get("golden")
    if golden:
        bits = golden["bits_per_weight"]
        size = f"{bits['linear']:.2f} bits per linear weight" if "linear" in bits else \
            f"{bits['folder_per_parameter']:.2f} bits per parameter"
        accuracy = f"KL {golden['kl_mean']:.4g}, top-1 {golden['top1_agreement']:.3f} against the reference" \
            if golden["kl_mean"] is not None else "not validated"
        lines.append(f"golden: {out_dir}/{golden['path']} (draft {recipe['name']}, verifier {golden['verifier']} "
                     f"{golden['dtype']}; {size}; {accuracy}); run `accullm-export generate "
                     f"{out_dir}/{golden['path']} PROMPT --golden`")
    return "\n".join(lines)
