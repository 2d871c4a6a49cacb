"""``accullm-export calibrate MODEL -o PROFILE_DIR``."""

from __future__ import annotations

import argparse

HELP = ("measure every linear layer's input channels on real text (or a load_data() script): outliers, "
        "attention-sink statistics and MLP sparsity thresholds, saved as a profile with an HTML report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="exported folder or any .onnx file with MatMul/Gemm weights")
    parser.add_argument("-o", "--output", required=True, metavar="PROFILE_DIR", help="profile folder (created)")
    parser.add_argument("--calib", default="wiki", metavar="SOURCE",
                        help="wiki (the calibration pages of the built-in Wikipedia extract), a .txt or .jsonl "
                             "file, or a .py file defining load_data() (also a polygraphy --data-loader-script)")
    parser.add_argument("--samples", type=int, default=128, help="text windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    policy = parser.add_argument_group("outlier policy (every policy is evaluated; this one is chosen)")
    policy.add_argument("--policy", choices=("threshold", "topk", "ratio", "sensitivity"), default="ratio")
    policy.add_argument("--threshold", type=float, default=6.0, help="threshold: |x| over this (LLM.int8())")
    policy.add_argument("--topk", type=int, default=8, help="topk/sensitivity: channels per layer")
    policy.add_argument("--topk-percent", type=float, help="topk: a global budget, %% of all channels")
    policy.add_argument("--ratio", type=float, default=20.0, help="ratio: absmax over the layer's median absmax")
    policy.add_argument("--bits", type=int, default=4, choices=(4, 8), help="sensitivity: weight bits")
    policy.add_argument("--block-size", type=int, default=128, help="sensitivity: int4 block size")
    parser.add_argument("--budget-mb", type=int, default=512, help="activation MB tapped per batch")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty profile folder")


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
