"""``accullm-export build MODEL --target T [--recipe R] [--sparsity S] -o OUT``."""

from __future__ import annotations

import argparse

HELP = ("the whole pipeline for a target: export (unless MODEL is ONNX), calibrate, quantize, sparsify, validate "
        "with gates, then an ONNX Runtime folder (cpu), a TensorRT engine, or a deployment bundle to finish on "
        "the device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli.sparsify import add_sparsity_arguments

    parser.add_argument("model", metavar="MODEL", help="Hugging Face folder, .gguf file, the sample "
                        "`smollm2-135m`, an exported folder, or any .onnx file (with --calib SCRIPT.py)")
    parser.add_argument("--target", required=True, help="see `accullm-export targets` (orin, cpu, hopper, ...)")
    parser.add_argument("--recipe", help="w4a16, w8a8, fp16 (default: the target's)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created)")
    parser.add_argument("--block-size", type=int, default=128, help="int4 rows per scale block")
    parser.add_argument("--no-gptq", action="store_true", help="w4a16: plain rounding instead of GPTQ")
    parser.add_argument("--distill-steps", type=int, default=0, metavar="N",
                        help="w4a16 on a decoder: train the INT4 block scales, the norm gains and the outlier rows N "
                        "steps against the source model on the calibration windows (default 0: off; 120 steps took "
                        "about 14 minutes for the sample on 2 cores)")
    parser.add_argument("--calib", default="wiki", metavar="SOURCE",
                        help="calibration text (wiki, .txt, .jsonl) or a load_data() script for a plain ONNX model")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--validation-windows", type=int, default=8, help="held-out text windows validated")
    parser.add_argument("--validation-seq-len", type=int, default=256, help="tokens per validation window")
    parser.add_argument("--max-batch", type=int, default=1, help="engine profiles: largest batch")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="engine profiles: longest sequence")
    gates = parser.add_argument_group("gates (default: per recipe; a failed gate exits 1 and keeps the work)")
    gates.add_argument("--max-kl", type=float)
    gates.add_argument("--min-top1", type=float)
    gates.add_argument("--max-ppl-delta", type=float)
    gates.add_argument("--no-gates", action="store_true", help="measure but do not gate")
    add_sparsity_arguments(parser.add_argument_group("sparse-skip MLPs"), required=False)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from accullm_export.build.pipeline import BuildOptions, build, format_build_summary
    from accullm_export.cli.sparsify import sparsity_config

    given = {"max-kl": args.max_kl, "min-top1": args.min_top1, "max-ppl-delta": args.max_ppl_delta}
    gates = {} if args.no_gates else ({k: v for k, v in given.items() if v is not None} or None)
    sparsity = sparsity_config(args)
    options = BuildOptions(target=args.target, recipe=args.recipe, sparsity=sparsity if sparsity.active else None,
                           block_size=args.block_size, gptq=not args.no_gptq, calib=args.calib,
                           calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, gates=gates,
                           validation_windows=args.validation_windows, validation_seq_len=args.validation_seq_len,
                           max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                           distill_steps=args.distill_steps)
    manifest = build(args.model, args.output, options, overwrite=args.overwrite)
    print(format_build_summary(manifest, args.output))
    deliverable = manifest["deliverable"]
    if deliverable["kind"] == "tensorrt-bundle":
        print(f"TensorRT is not usable here ({deliverable['reason']}), so this is a deployment bundle: on the "
              f"{manifest['target']['device']} run `bash {args.output}/bundle/build_engine.sh`")
    return 0
