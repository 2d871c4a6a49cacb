"""``accullm-export calibrate MODEL -o PROFILE_DIR``."""

from __future__ import annotations

import argparse

HELP = ("measure every linear layer's input channels on real text (or a load_data() script): outliers, "
        "attention-sink statistics and MLP sparsity thresholds, saved as a profile with an HTML report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types
    from accullm_export.recipes.config import BLOCKS

    parser.add_argument("model", metavar="MODEL", help="exported folder or any .onnx file with MatMul/Gemm weights")
    parser.add_argument("-o", "--output", required=True, metavar="PROFILE_DIR", help="profile folder (created)")
    parser.add_argument("--calib", default="wiki", metavar="SOURCE",
                        help="wiki (the calibration pages of the built-in Wikipedia extract), a .txt or .jsonl "
                             "file, or a .py file defining load_data() (also a polygraphy --data-loader-script); "
                             "a script is executed, with your privileges, by this command only: the inputs it "
                             "yields are stored in the profile as data")
    parser.add_argument("--samples", type=arg_types.positive_int, default=128, help="text windows")
    parser.add_argument("--seq-len", type=arg_types.token_count, default=512, help="tokens per window")
    parser.add_argument("--seed", type=arg_types.seed, default=0, help="which windows are drawn")
    policy = parser.add_argument_group("outlier policy (every policy is evaluated; this one is chosen)")
    policy.add_argument("--policy", choices=("threshold", "topk", "ratio", "sensitivity"), default="ratio")
    policy.add_argument("--threshold", type=arg_types.positive, default=6.0,
                        help="threshold: |x| over this (LLM.int8())")
    policy.add_argument("--topk", type=arg_types.non_negative_int, default=8,
                        help="topk/sensitivity: channels per layer")
    policy.add_argument("--topk-percent", type=arg_types.percent, help="topk: a global budget, %% of all channels")
    policy.add_argument("--ratio", type=arg_types.positive, default=20.0,
                        help="ratio: absmax over the layer's median absmax")
    policy.add_argument("--bits", type=int, default=4, choices=(4, 8), help="sensitivity: weight bits")
    policy.add_argument("--block-size", type=int, choices=BLOCKS, default=128, metavar="B",
                        help=f"sensitivity: int4 block size ({', '.join(map(str, BLOCKS))})")
    parser.add_argument("--budget-mb", type=arg_types.integer(1, 1 << 20), default=512,
                        help="activation MB tapped per batch")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous profile in that folder (never a folder of anything else)")


def run(args: argparse.Namespace) -> int:
    from accullm_export.calibration.outliers import OutlierPolicy
    from accullm_export.calibration.profile import load_profile
    from accullm_export.calibration.report import format_calibration_summary
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    policy = OutlierPolicy(name=args.policy, threshold=args.threshold, k=args.topk, percent=args.topk_percent,
                           ratio=args.ratio, bits=args.bits, block_size=args.block_size)
    config = CalibrationConfig(source=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                               policy=policy, budget_mb=args.budget_mb)
    calibrate(args.model, args.output, config, overwrite=args.overwrite)
    profile = load_profile(args.output)
    print(format_calibration_summary(profile.manifest, profile.arrays))
    print(f"profile: {args.output}  (report: {args.output}/report.html)")
    return 0
