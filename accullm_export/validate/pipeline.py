"""``validate``: one entry point for causal LMs and any other ONNX model, with bisection, gates and a report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.errors import UserError
from accullm_export.validate.gates import evaluate_gates, raise_on_failed_gates
from accullm_export.validate.llm import LLMValidationConfig, validate_llm

log = logging.getLogger(__name__)
MODES = ("auto", "llm", "generic")
REPORT_KIND = "accullm-export/validate"  # report.json's kind: a report folder may replace only a previous report


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValidateOptions:
    """Everything ``validate`` takes besides the two models."""

    mode: str = "auto"
    llm: LLMValidationConfig = LLMValidationConfig()
    data_loader: str | None = None  # generic mode: a load_data() script
    iterations: int = 1
    val_range: tuple[float, float] = (0.0, 1.0)
    atol: float = 1e-5
    rtol: float = 1e-5
    bisect: bool = False
    bisect_tolerance: float = 0.05
    bisect_seq_len: int = 64
    gates: dict = dataclasses.field(default_factory=dict)  # gate name -> threshold (None: off)
    report_dir: str | None = None
    version: int = 1


def validate(reference: str | Path, candidate: str | Path, options: ValidateOptions) -> dict:
    """Compare candidate with reference; write the report if asked; raise AccuracyError on a failed gate.

    The report folder appears whole when everything else succeeded; it replaces only a previous report (its
    report.json names the kind), never an input, the current folder or a folder of other files.
    """
    if not options.report_dir:
        return _compare(reference, candidate, options, None)
    inputs = [reference, candidate, options.data_loader, options.llm.tokenizer, options.llm.prompts_file,
              options.llm.text if Path(options.llm.text).is_file() else None]
    check_output(options.report_dir, REPORT_KIND, overwrite=True, protected=inputs)
    with atomic_dir(options.report_dir, overwrite=True, kind=REPORT_KIND, protected=inputs) as staging:
        from accullm_export.validate.report import write_report

        report = _compare(reference, candidate, options, staging)
        write_report(report, staging)
    return report


def _compare(reference: str | Path, candidate: str | Path, options: ValidateOptions, staging: Path | None) -> dict:
    """The report; the generic comparison's Polygraphy files go into ``staging`` (none without a report)."""
    mode = detect_mode(reference, candidate) if options.mode == "auto" else options.mode
    if mode not in MODES[1:]:
        raise UserError(f"unknown mode {options.mode!r}; choose from {', '.join(MODES)}")
    if options.mode != "auto":
        _check_mode_fits(mode, reference, candidate, options.data_loader)
    report: dict = {"kind": REPORT_KIND, "version": 1, "reference": str(reference),
                    "candidate": str(candidate), "mode": mode, "versions": _versions()}
    fed: list[dict[str, np.ndarray]] = []  # the generic comparison's inputs, the first one seeds --bisect
    if mode == "llm":
        report.update(validate_llm(reference, candidate, options.llm))
    else:
        from accullm_export.validate.generic import validate_generic

        report["generic"] = validate_generic(reference, candidate, staging, data_loader=options.data_loader,
                                             iterations=options.iterations, val_range=options.val_range,
                                             atol=options.atol, rtol=options.rtol, fed=fed,
                                             shown_dir=Path(options.report_dir) if staging else None)
    if options.bisect:
        from accullm_export.validate.bisect import bisect

        feed = dict(fed[0]) if mode == "generic" else _bisect_feed(reference, options)
        report["layers"], report["bisect"] = bisect(reference, candidate, feed, options.bisect_tolerance,
                                                    options.llm.optimization)
    report["gates"] = evaluate_gates(report, options.gates)
    if mode == "generic":
        report["gates"].append({"name": "polygraphy", "threshold": options.atol, "value": None,
                                "passed": report["generic"]["passed"],
                                "message": f"polygraphy: outputs within atol {options.atol:g} / rtol {options.rtol:g}"})
    return report


def check_gates(report: dict) -> None:
    """Raise AccuracyError if any gate in the report failed (call after printing the summary)."""
    raise_on_failed_gates(report.get("gates", []))


def detect_mode(reference: str | Path, candidate: str | Path) -> str:
    """``llm`` when both sides look like exported decoders (input_ids, past_key_values, logits)."""
    return "llm" if _is_causal_lm(reference) and _is_causal_lm(candidate) else "generic"


def _check_mode_fits(mode: str, reference: str | Path, candidate: str | Path, data_loader: str | None) -> None:
    """Refuse, before any session is made, a --mode the two models cannot be compared in."""
    sides = (("reference", reference), ("candidate", candidate))
    if mode == "llm":
        for side, path in sides:
            if not _is_causal_lm(path):
                raise UserError(f"--mode llm compares exported decoders, but the {side} {path} is not one (it needs "
                                "inputs input_ids and past_key_values.*, and a logits output); use --mode generic")
    elif data_loader is None:
        for side, path in sides:
            if _is_causal_lm(path):
                raise UserError(f"--mode generic without --data-loader feeds random values, which an exported "
                                f"decoder's KV cache cannot take ({side} {path}); use --mode llm, or give "
                                "--data-loader a load_data() script")


def _is_causal_lm(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix == ".engine":  # engines are built by `build` from exported decoders only
        from accullm_export.runtime.engine_file import check_engine_file

        check_engine_file(path)
        return True
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no such model (expected an exported folder or an .onnx file)")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        raise UserError(f"{path} is not a valid ONNX model (truncated or not ONNX)") from None
    if not graph.node and not graph.output:
        raise UserError(f"{path} is not a valid ONNX model (it parses to an empty graph)")
    inputs = {value.name for value in graph.input}
    return ("input_ids" in inputs and "past_key_values.0.key" in inputs
            and any(value.name == "logits" for value in graph.output))


def _bisect_feed(reference: str | Path, options: ValidateOptions) -> dict[str, np.ndarray]:
    """One input for bisecting an LLM: a held-out text window."""
    from accullm_export.calibration.feeds import llm_feeds
    from accullm_export.data.text import load_text_source, token_windows
    from accullm_export.runtime.tokenizer import FolderTokenizer

    model_file = Path(reference) / "model.onnx" if Path(reference).is_dir() else Path(reference)
    tokenizer = FolderTokenizer(options.llm.tokenizer or model_file.parent)
    source = load_text_source(options.llm.text)
    tokens = token_windows(source.documents, tokenizer.encode, num_windows=1, seq_len=options.bisect_seq_len,
                           seed=options.llm.seed)
    return llm_feeds(tokens, model_file)[0]


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
