"""``accullm-export sparsify MODEL --profile P --sparsity 0.5 --method threshold|predictor -o OUT``."""

from __future__ import annotations

import argparse

HELP = ("give every SwiGLU MLP a sparse-skip path: per token, only the neurons a calibrated threshold or a "
        "trained low-rank guesser keeps are computed (standard ONNX Compress/Where; fewer weight rows read)")


def add_sparsity_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """The options ``sparsify`` and ``quantize --sparsity`` share."""
    from accullm_export.cli import arg_types
    from accullm_export.sparsity.config import METHODS

    parser.add_argument("--sparsity", type=arg_types.skip_fraction,
                        required=required, default=None if required else 0.0,
                        metavar="S", help="fraction of MLP neurons skipped per token, in [0, 1) (0: dense)")
    parser.add_argument("--method", choices=METHODS, default="threshold",
                        help="threshold: drop down-projection inputs under the layer's calibrated |a| threshold "
                             "(gate/up stay dense); predictor: a low-rank guesser picks the neurons before the "
                             "MLP runs, so gate, up and down all skip them")
    parser.add_argument("--predictor-rank", type=arg_types.integer(1, 65536), default=64,
                        help="the guesser's inner width r")
    parser.add_argument("--predictor-samples", type=arg_types.positive_int, default=16,
                        help="calibration windows (from the profile's text) that train the guessers")
    parser.add_argument("--predictor-steps", type=arg_types.positive_int, default=400,
                        help="optimizer steps per guesser")
    parser.add_argument("--seed", type=arg_types.seed, default=0, help="seeds the guessers' training")
    parser.add_argument("--sparse-first-token", action="store_true",
                        help="also skip neurons at the sequence's first position (the attention sink; by default "
                             "it stays dense: it runs once, in the prefill, and masking it costs accuracy)")


def sparsity_config(args: argparse.Namespace):
    from accullm_export.sparsity.config import SparsityConfig

    return SparsityConfig(sparsity=args.sparsity, method=args.method, rank=args.predictor_rank,
                          samples=args.predictor_samples, steps=args.predictor_steps, seed=args.seed,
                          dense_first=not args.sparse_first_token)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="exported folder or .onnx file (fp32 or fp16, dense)")
    parser.add_argument("--profile", required=True, metavar="PROFILE_DIR", help="from `accullm-export calibrate`")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="model folder (created)")
    add_sparsity_arguments(parser, required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous sparsify output in that folder (never a folder of anything else)")


def run(args: argparse.Namespace) -> int:
    from accullm_export.build.sparsify import sparsify_model

    manifest = sparsify_model(args.model, args.output, sparsity_config(args), args.profile,
                              overwrite=args.overwrite)
    print(format_sparsity_summary(manifest["sparsity"]))
    print(f"model: {args.output}")
    return 0


def format_sparsity_summary(summary: dict) -> str:
    config = summary["config"]
    lines = [f"sparsity {config['sparsity']:.2f} ({config['method']}) on {summary['mlps']} MLPs"]
    if config["sparsity"] == 0:
        lines.append("sparsity 0: every MLP left dense")
    guesser = summary.get("predictor")
    if guesser:
        lines.append(f"guessers (rank {config['rank']}): recall {guesser['recall']:.3f}, precision "
                     f"{guesser['precision']:.3f} of the large neurons on held-out rows; "
                     f"{guesser['flops_percent_of_mlp']:.2f}% of an MLP's FLOPs")
    if config["sparsity"] > 0:
        lines.append("note: on ONNX Runtime's CPU this standard-ONNX form runs slower than dense (Compress copies the "
                     "kept rows; see docs/sparsify.md); the speedup needs the accullm::SparseSkipMLP plugin "
                     "(TensorRT targets)")
    return "\n".join(lines)
