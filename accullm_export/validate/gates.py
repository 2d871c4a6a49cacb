"""Accuracy gates: thresholds on the validation figures; a failed gate exits 1 and says by how much."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from accullm_export.errors import AccuracyError


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """A gate: which figure it reads, whether the figure must stay below (max) or above (min) the threshold."""

    name: str
    path: tuple[str, str]  # (report section, key)
    upper_bound: bool
    label: str
    absolute: bool = False  # compare |value| (for signed deltas)


GATES: dict[str, GateSpec] = {spec.name: spec for spec in (
    GateSpec("max-kl", ("metrics", "kl_mean"), True, "mean KL(reference || candidate)"),
    GateSpec("min-top1", ("metrics", "top1_agreement"), False, "top-1 agreement"),
    GateSpec("max-ppl-delta", ("metrics", "ppl_delta_pct"), True, "|perplexity change| in %", absolute=True),
    GateSpec("min-greedy-prefix", ("greedy", "mean_prefix"), False, "mean greedy prefix (tokens)"),
)}


def evaluate_gates(report: Mapping, thresholds: Mapping[str, float | None]) -> list[dict]:
    """One entry per gate that has a threshold, in the report's gate format."""
    results = []
    for name, threshold in thresholds.items():
        if threshold is None:
            continue
        spec = GATES[name]
        section, key = spec.path
        value = report.get(section, {}).get(key)
        if value is None:
            results.append({"name": name, "threshold": threshold, "value": None, "passed": False,
                            "message": f"{name}: {spec.label} was not measured"})
            continue
        measured = abs(value) if spec.absolute else value
        passed = measured <= threshold if spec.upper_bound else measured >= threshold
        relation = ("<=" if passed else ">") if spec.upper_bound else (">=" if passed else "<")
        message = f"{name}: {spec.label} {measured:.6g} {relation} {threshold:.6g}"
        if not passed:
            message += f" (off by {abs(measured - threshold):.6g})"
        results.append({"name": name, "threshold": threshold, "value": value, "passed": passed, "message": message})
    return results


def raise_on_failed_gates(gates: list[dict]) -> None:
    """Raise AccuracyError naming every failed gate."""
    failed = [gate["message"] for gate in gates if not gate["passed"]]
    if failed:
        raise AccuracyError("accuracy gate failed: " + "; ".join(failed))
