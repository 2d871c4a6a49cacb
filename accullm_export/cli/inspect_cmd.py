"""``accullm-export inspect MODEL.onnx``."""

from __future__ import annotations

import argparse
import json

HELP = "print an ONNX model's opset, inputs/outputs, op counts, parameters by dtype and linear layers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=".onnx file or exported folder")
    parser.add_argument("--all", action="store_true", help="list every linear layer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from accullm_export.graph.io import load_onnx
    from accullm_export.graph.summary import format_summary, summarize

    summary = summarize(load_onnx(args.model, load_external_data=False))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        print(format_summary(summary, max_linear=0 if args.all else 12))
    return 0
