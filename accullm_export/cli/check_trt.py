"""``accullm-export check-trt``: will a TensorRT version's ONNX parser take this model? (docs/check-trt.md)"""

from __future__ import annotations

import argparse
import json

HELP = ("check every node of an ONNX model against what a TensorRT version's ONNX parser takes (ops, opset, dtypes, "
        "constant inputs, accullm plugin ops)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx file, or a folder holding model.onnx")
    parser.add_argument("--tensorrt-version", default=None, metavar="X.Y",
                        help="the TensorRT to check for (default: 10.3, JetPack 6's, as on the Orin targets)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from accullm_export.errors import UserError
    from accullm_export.targets.tensorrt_support import (DEFAULT_TENSORRT_VERSION, check_model, load_model,
                                                         parse_tensorrt_version, summary_line)

    version = parse_tensorrt_version(args.tensorrt_version or DEFAULT_TENSORRT_VERSION)
    model, name = load_model(args.model)
    findings = check_model(model, version)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    if args.json:
        print(json.dumps({"model": name, "tensorrt_version": version, "ok": not findings,
                          "nodes": len(model.graph.node), "opsets": opsets,
                          "findings": [finding.to_dict() for finding in findings]}, indent=2))
    elif findings:
        for finding in findings:
            print(finding)
    if findings:
        raise UserError(summary_line(findings, version, name))
    if not args.json:
        print(f"{name}: ok for TensorRT {version} ({len(model.graph.node)} nodes, opset "
              f"{opsets.get('ai.onnx', '?')})")
    return 0
