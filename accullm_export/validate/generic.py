"""Any ONNX model: a Polygraphy comparison of outputs, reproducible with ``polygraphy run``.

Inputs come from a data-loader script (a Python file defining ``load_data()``, the same file Polygraphy takes
as ``--data-loader-script``) or from Polygraphy's random DataLoader with a value range. Inputs and the
reference's outputs are saved in Polygraphy's JSON format.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from accullm_export.calibration.feeds import check_feeds
from accullm_export.data.loader_script import load_data_script
from accullm_export.errors import UserError
from accullm_export.validate.metrics import tensor_errors

log = logging.getLogger(__name__)
INPUTS_JSON, OUTPUTS_JSON = "inputs.json", "reference_outputs.json"


def validate_generic(reference: str | Path, candidate: str | Path, out_dir: Path | None, *,
                     data_loader: str | None = None, iterations: int = 1, val_range: tuple[float, float] = (0.0, 1.0),
                     seed: int = 1, atol: float = 1e-5, rtol: float = 1e-5, fed: list | None = None,
                     shown_dir: Path | None = None) -> dict:
    """Compare outputs with Polygraphy's Comparator; returns the report's ``generic`` section.

    Args:
        out_dir: where the inputs and the reference's outputs are saved (Polygraphy JSON); None saves nothing.
        fed: a list that receives the input feeds, in order.
        shown_dir: the folder the report names for those files (``out_dir`` is a staging folder renamed to it).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, DataLoader, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    if not log.isEnabledFor(logging.DEBUG):
        G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our report has the figures; -vv shows Polygraphy's

    reference, candidate = _model_file(reference), _model_file(candidate)
    _check_same_inputs(reference, candidate)
    runners = [OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=name)
               for name, path in (("reference", reference), ("candidate", candidate))]
    script = f"data-loader script {data_loader}"
    loader = _Recorded(check_feeds(load_data_script(data_loader), reference, script) if data_loader else DataLoader(
        seed=seed, iterations=iterations, val_range=val_range), [] if fed is None else fed)
    if out_dir is None:
        results = Comparator.run(runners, data_loader=loader)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        results = Comparator.run(runners, data_loader=loader, save_inputs_path=str(out_dir / INPUTS_JSON))
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    section = {"atol": atol, "rtol": rtol, "iterations": len(results[0][1]), "passed": bool(accuracy),
               "outputs": _output_rows(results, accuracy)}
    if out_dir is None:
        return section
    _save_reference_outputs(results, out_dir / OUTPUTS_JSON)
    shown = shown_dir or out_dir
    inputs_json, outputs_json = shown / INPUTS_JSON, shown / OUTPUTS_JSON
    return section | {"inputs_json": str(inputs_json), "outputs_json": str(outputs_json),
                      "polygraphy_command": f"polygraphy run {candidate} --onnxrt --load-inputs {inputs_json} "
                                            f"--load-outputs {outputs_json} --atol {atol} --rtol {rtol}"}


class _Recorded:
    """A data loader that keeps the feeds it hands out (``--bisect`` starts from the first): nothing is written
    to disk for it. Polygraphy sets ``input_metadata`` on the loader; it goes to the wrapped one."""

    def __init__(self, loader, fed: list):
        self.loader, self.fed = loader, fed

    @property
    def input_metadata(self):
        return getattr(self.loader, "input_metadata", None)

    @input_metadata.setter
    def input_metadata(self, value) -> None:
        with contextlib.suppress(AttributeError):
            self.loader.input_metadata = value

    def __iter__(self):
        for feed in self.loader:
            self.fed.append(feed)
            yield feed

    def __getitem__(self, index):
        return self.loader[index]


def _output_rows(results, accuracy) -> list[dict]:
    (_, ref_iterations), (_, cand_iterations) = results[0], results[1]
    verdicts = accuracy[0][("reference", "candidate")]  # the one compare function's per-iteration verdicts
    rows: dict[str, dict] = {}
    for ref_outputs, cand_outputs, verdict in zip(ref_iterations, cand_iterations, verdicts):
        for name, ref_value in ref_outputs.items():
            ref_value, cand_value = np.asarray(ref_value), np.asarray(cand_outputs[name])
            errors = tensor_errors(ref_value, cand_value)
            denominator = np.abs(ref_value.astype(np.float64)) + 1e-12
            row = rows.setdefault(name, {"name": name, "max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0,
                                         "cosine": 1.0, "passed": True})
            row["max_abs"] = max(row["max_abs"], errors["max_abs"])
            row["max_rel"] = max(row["max_rel"], float((np.abs(ref_value - cand_value) / denominator).max()))
            row["mean_abs"] = max(row["mean_abs"], float(np.abs(ref_value - cand_value).mean()))
            row["cosine"] = min(row["cosine"], errors["cosine"])
            row["passed"] = row["passed"] and bool(verdict[name])
    return list(rows.values())


def _save_reference_outputs(results, path: Path) -> None:
    from polygraphy.comparator import RunResults

    reference_only = RunResults()
    reference_only.append(results[0])
    reference_only.save(str(path))


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX model")
    return path


def _check_same_inputs(reference: Path, candidate: Path) -> None:
    import onnx

    def names(path: Path) -> set[str]:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:
            raise UserError(f"{path} is not a valid ONNX model") from None
        initializers = {t.name for t in model.graph.initializer}
        return {i.name for i in model.graph.input if i.name not in initializers}

    ref_names, cand_names = names(reference), names(candidate)
    if ref_names != cand_names:
        raise UserError(f"reference and candidate have different input names: "
                        f"{', '.join(sorted(ref_names ^ cand_names)[:6])}")
