"""Bisection: the first decoder block, then the first node in it, whose output error exceeds tolerance.

Errors are relative L2 errors of intermediate tensors between reference and candidate on one input. Block
outputs are compared a few at a time (every block, which also gives the per-layer error plot); inside the
first failing block, node outputs present in both graphs are compared in topological order, a group at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from accullm_export.runtime.intermediates import IntermediateReader
from accullm_export.validate.metrics import tensor_errors

log = logging.getLogger(__name__)

BLOCK_OUTPUT = re.compile(r"/model/layers\.(\d+)/residual_mlp/Add/output_0")
GROUP_SIZE = 8


def compare_tensors(reference: IntermediateReader, candidate: IntermediateReader, feed: Mapping[str, np.ndarray],
                    names: list[str]) -> list[dict]:
    """Errors of the float tensors among ``names`` between both models, GROUP_SIZE outputs per run."""
    rows = []
    for start in range(0, len(names), GROUP_SIZE):
        group = names[start:start + GROUP_SIZE]
        ref_values, cand_values = reference.run(feed, group), candidate.run(feed, group)
        for name in group:
            ref_value, cand_value = np.asarray(ref_values[name]), np.asarray(cand_values[name])
            if ref_value.dtype.kind != "f" or ref_value.shape != cand_value.shape:
                continue  # shape/index/mask plumbing, or a tensor the candidate computes differently
            rows.append({"name": name, **tensor_errors(ref_value, cand_value)})
    return rows


def layer_errors(reference: IntermediateReader, candidate: IntermediateReader, feed: Mapping[str, np.ndarray],
                 tolerance: float) -> dict:
    """Per-block output errors (the report's ``layers`` section)."""
    ref_blocks = {m.group(0): int(m.group(1)) for name in reference.tensor_names()
                  if (m := BLOCK_OUTPUT.fullmatch(name))}
    cand_names = set(candidate.tensor_names())
    names = sorted((name for name in ref_blocks if name in cand_names), key=ref_blocks.get)
    rows = compare_tensors(reference, candidate, feed, names)
    for row in rows:
        row["index"] = ref_blocks[row["name"]]
    return {"tolerance": tolerance, "metric": "rel_error", "blocks": rows}


def bisect(reference_path: str | Path, candidate_path: str | Path, feed: Mapping[str, np.ndarray],
           tolerance: float, optimization: str = "basic") -> tuple[dict, dict]:
    """Returns the report's ``layers`` and ``bisect`` sections."""
    reference = IntermediateReader(reference_path, optimization)
    candidate = IntermediateReader(candidate_path, optimization)
    layers = layer_errors(reference, candidate, feed, tolerance)
    failing = next((row for row in layers["blocks"] if row["rel_error"] > tolerance), None)
    if failing is not None:
        prefix = f"/model/layers.{failing['index']}/"
        scope = [name for name in reference.tensor_names() if name.startswith(prefix)]
        block = failing["name"]
    else:  # no block is over tolerance (or the graph has no recognisable blocks): search the whole graph
        scope, block = reference.tensor_names(), None
    culprit = _first_over_tolerance(reference, candidate, feed, scope, tolerance)
    if culprit is None:
        message = f"no compared tensor exceeds relative error {tolerance:g}"
    else:
        where = f" in block {failing['index']}" if failing else ""
        message = (f"first tensor over tolerance{where}: {culprit['tensor']} from {culprit['op_type']} node "
                   f"{culprit['node']} (rel error {culprit['rel_error']:.4g}, max abs {culprit['max_abs']:.4g}, "
                   f"cosine {culprit['cosine']:.6f}, precision {culprit['precision']})")
    return layers, {"culprit": culprit, "block": block, "tolerance": tolerance, "message": message}


def _first_over_tolerance(reference: IntermediateReader, candidate: IntermediateReader,
                          feed: Mapping[str, np.ndarray], scope: list[str], tolerance: float) -> dict | None:
    candidate_names = set(candidate.tensor_names())
    comparable = [name for name in scope if name in candidate_names]
    for start in range(0, len(comparable), GROUP_SIZE):
        for row in compare_tensors(reference, candidate, feed, comparable[start:start + GROUP_SIZE]):
            if row["rel_error"] > tolerance:
                node = candidate.nodes_by_output[row["name"]]
                return {"node": node.name, "op_type": node.op_type, "tensor": row["name"],
                        "max_abs": row["max_abs"], "rel_error": row["rel_error"], "cosine": row["cosine"],
                        "precision": candidate.precision_of(row["name"])}
    return None

