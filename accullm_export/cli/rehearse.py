"""``accullm-export rehearse BUNDLE``: the bundle's plugin graph on the CPU against its standard graph."""

from __future__ import annotations

import argparse

HELP = ("run a bundle's model_plugins/ graph in ONNX Runtime with every accullm plugin op executed by its NumPy "
        "reference, and compare it with model/: logits on text windows, greedy tokens with the KV cache "
        "(needs onnxruntime-extensions: pip install 'accullm-export[rehearse]')")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types

    parser.add_argument("bundle", metavar="BUNDLE", help="the bundle/ folder of a TensorRT build")
    parser.add_argument("--prompts", type=arg_types.positive_int, default=8, help="greedy prompts, decoded as a batch")
    parser.add_argument("--new-tokens", type=arg_types.token_count, default=64, help="greedy tokens per prompt")
    parser.add_argument("--prompt-tokens", type=arg_types.token_count, default=32,
                        help="longest prompt (the others are shorter, so the batch is left-padded)")
    parser.add_argument("--text", default="wiki:evaluation", metavar="SOURCE",
                        help="text for prompts and windows: wiki[:evaluation|:calibration], a .txt or a .jsonl file")
    parser.add_argument("--windows", type=arg_types.positive_int, default=4, help="text windows whose logits are "
                                                                                  "compared")
    parser.add_argument("--seq-len", type=arg_types.token_count, default=128, help="tokens per text window")
    parser.add_argument("--seed", type=arg_types.seed, default=0)
    parser.add_argument("--backend", choices=("reference", "kernels"), default="reference",
                        help="how the plugin nodes run: their NumPy references, or their CUDA kernels (needs a GPU; "
                             "not available yet)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from accullm_export.validate.rehearsal import (RehearsalConfig, check_rehearsal, format_report, rehearse_bundle,
                                                   report_json)

    config = RehearsalConfig(text=args.text, windows=args.windows, seq_len=args.seq_len, prompts=args.prompts,
                             prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, seed=args.seed,
                             backend=args.backend)
    report = rehearse_bundle(args.bundle, config)
    print(report_json(report) if args.json else format_report(report))
    check_rehearsal(report)
    return 0
