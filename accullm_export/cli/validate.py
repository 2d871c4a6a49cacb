"""``accullm-export validate REFERENCE CANDIDATE``."""

from __future__ import annotations

import argparse

HELP = ("compare a candidate model with its full-precision reference: perplexity, KL, top-1, greedy agreement, "
        "golden probes (LLMs) or a Polygraphy output comparison (any ONNX model); gates; --bisect; HTML report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types

    parser.add_argument("reference", metavar="REFERENCE", help="exported folder or .onnx file (full precision)")
    parser.add_argument("candidate", metavar="CANDIDATE", help="exported folder or .onnx file to check")
    parser.add_argument("--mode", choices=("auto", "llm", "generic"), default="auto",
                        help="llm metrics or a generic Polygraphy comparison (auto: llm for exported decoders)")
    parser.add_argument("--report", metavar="DIR", help="write report.json and report.html here")
    text = parser.add_argument_group("LLM metrics")
    text.add_argument("--text", default="wiki:evaluation", metavar="SOURCE",
                      help="held-out text: wiki[:evaluation|:calibration], a .txt or a .jsonl file")
    text.add_argument("--windows", type=arg_types.positive_int, default=8, help="text windows to score")
    text.add_argument("--seq-len", type=arg_types.token_count, default=256, help="tokens per text window")
    text.add_argument("--prompts", metavar="FILE", help="greedy prompts, one per line (default: held-out openings)")
    text.add_argument("--num-prompts", type=arg_types.positive_int, default=8)
    text.add_argument("--new-tokens", type=arg_types.token_count, default=64, help="greedy tokens per prompt")
    text.add_argument("--probes-per-task", type=arg_types.non_negative_int, default=5,
                      help="golden probes per task (0: none)")
    text.add_argument("--tokenizer", metavar="DIR", help="folder with tokenizer.json (default: the reference's)")
    text.add_argument("--seed", type=arg_types.seed, default=0)
    text.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="basic",
                      help="ONNX Runtime graph optimization for both sides (basic keeps numerics exact)")
    generic = parser.add_argument_group("generic ONNX comparison (Polygraphy)")
    generic.add_argument("--data-loader", metavar="SCRIPT", help="Python file defining load_data() (as for "
                                                                 "polygraphy --data-loader-script); the script is "
                                                                 "executed, with your privileges")
    generic.add_argument("--iterations", type=arg_types.positive_int, default=1,
                         help="random inputs when no data loader is given")
    generic.add_argument("--val-range", type=arg_types.finite_float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    generic.add_argument("--atol", type=arg_types.non_negative, default=1e-5)
    generic.add_argument("--rtol", type=arg_types.non_negative, default=1e-5)
    bisect = parser.add_argument_group("bisection")
    bisect.add_argument("--bisect", action="store_true", help="find the first block, then node, over tolerance")
    bisect.add_argument("--bisect-tol", type=arg_types.positive, default=0.05, help="relative L2 error tolerance")
    gates = parser.add_argument_group("gates (a failed gate exits 1)")
    gates.add_argument("--max-kl", type=arg_types.non_negative, help="maximum mean KL(reference || candidate)")
    gates.add_argument("--min-top1", type=arg_types.fraction, help="minimum top-1 agreement, in [0, 1]")
    gates.add_argument("--max-ppl-delta", type=arg_types.non_negative, help="maximum |perplexity change| in percent")
    gates.add_argument("--min-greedy-prefix", type=arg_types.non_negative, help="minimum mean greedy prefix in tokens")


def run(args: argparse.Namespace) -> int:
    from accullm_export.errors import UserError
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, check_gates, validate
    from accullm_export.validate.report import format_summary

    if args.val_range[0] > args.val_range[1]:  # each count and tolerance is checked by its argparse type
        raise UserError(f"--val-range LO HI: LO ({args.val_range[0]:g}) is over HI ({args.val_range[1]:g})")
    llm = LLMValidationConfig(text=args.text, windows=args.windows, seq_len=args.seq_len, prompts_file=args.prompts,
                              num_prompts=args.num_prompts, new_tokens=args.new_tokens,
                              probes_per_task=args.probes_per_task, seed=args.seed,
                              optimization=args.optimization, tokenizer=args.tokenizer)
    options = ValidateOptions(
        mode=args.mode, llm=llm, data_loader=args.data_loader, iterations=args.iterations,
        val_range=tuple(args.val_range), atol=args.atol, rtol=args.rtol, bisect=args.bisect,
        bisect_tolerance=args.bisect_tol, report_dir=args.report,
        gates={"max-kl": args.max_kl, "min-top1": args.min_top1, "max-ppl-delta": args.max_ppl_delta,
               "min-greedy-prefix": args.min_greedy_prefix})
    report = validate(args.reference, args.candidate, options)
    print(format_summary(report))
    if args.report:
        print(f"report: {args.report}/report.html")
    check_gates(report)
    return 0
