"""The ONNX a TensorRT version's parser takes: scales as build-time constants, attention in the ops it knows.

The kit quantizes and validates one ONNX model per recipe. For a TensorRT target, that model is rewritten once
more for the TensorRT version the device runs (``TargetProfile.tensorrt_version`` or ``--tensorrt-version``):

* the Casts that widen stored FP16 block scales are folded into constants (TensorRT's Dequantize takes a
  build-time constant scale);
* opset 23's ``RotaryEmbedding`` and ``Attention`` are lowered to opset-21 ops where the version's parser lacks
  them (``lower_attention``), and kept where it has them;
* the caller checks the result against the version's support table (``check-trt``), so a model the parser
  would refuse is refused before it reaches the device, naming its nodes.
"""

from __future__ import annotations

from pathlib import Path

LOWERED_OPS = ("Attention", "RotaryEmbedding")
OPSET_FINDING = "opset_import"  # check_model's op for a model whose opset is outside the parser's range


def runs_on(lowered_for: str, device: str) -> bool:
    """Whether ONNX lowered for TensorRT ``lowered_for`` suits a device with TensorRT ``device`` (both "X.Y"):
    the same major version, and a parser at least as new (later parsers keep the ops earlier ones took)."""
    (major, minor), (device_major, device_minor) = (tuple(int(part) for part in text.split(".")[:2])
                                                    for text in (lowered_for, device))
    return major == device_major and device_minor >= minor


def check_lowerable(model, version: str, what: str) -> None:
    """Refuse early what the lowering cannot fix: nodes other than the ones it lowers that ``version`` lacks.

    Raises:
        UserError: each such node and the reason.
    """
    from accullm_export.errors import UserError
    from accullm_export.targets.tensorrt_support import check_model, summary_line

    # the lowering rewrites these ops, and drops the opset to one the parser takes once they are gone
    findings = [finding for finding in check_model(model, version)
                if finding.op not in LOWERED_OPS + (OPSET_FINDING,)]
    if findings:
        raise UserError(summary_line(findings, version, what))


def lower_for_tensorrt(path: Path, version: str) -> list[str]:
    """Rewrite ``path`` in place for TensorRT ``version``; returns what was done, one line each. The caller checks
    the result (``check_or_raise``) where TensorRT is to parse it."""
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.pipeline import run_passes
    from accullm_export.targets.tensorrt_support import check_model

    from accullm_export.graph.passes.lower_attention import Config as LoweringConfig

    graph, source = load_graph(path)
    steps: list = [("fold_scale_casts", None)]
    unparsed = tuple(op for op in LOWERED_OPS if op in {finding.op for finding in check_model(source, version)})
    if unparsed:
        steps.append(("lower_attention", LoweringConfig(ops=unparsed)))
    graph, reports, _ = run_passes(graph, steps)
    done = []
    folded = reports[0].nodes_removed.get("Cast", 0)
    if folded:
        done.append(f"{folded} scale Casts folded into constants")
    if unparsed:
        removed = reports[1].nodes_removed
        done.append(f"lowered for TensorRT {version}: " + ", ".join(
            f"{removed.get(op, 0)} {op}" for op in LOWERED_OPS if removed.get(op)) + " to opset-21 ops")
        done.extend(reports[1].notes)
    if folded or unparsed:
        save_graph(graph, source, path, {"accullm.tensorrt_version": version})
    return done
