"""``accullm-export build MODEL --target T [--preset NAME | --config FILE] -o OUT``."""

from __future__ import annotations

import argparse

HELP = ("the whole pipeline for a target: export (unless MODEL is ONNX), calibrate, quantize, sparsify, validate "
        "with gates, then an ONNX Runtime folder (cpu), a TensorRT engine, or a deployment bundle to finish on "
        "the device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types
    from accullm_export.cli.quantize import add_recipe_arguments

    parser.add_argument("model", metavar="MODEL", help="Hugging Face folder, .gguf file, the sample "
                        "`smollm2-135m`, an exported folder, or any .onnx file (with --calib SCRIPT.py)")
    parser.add_argument("--target", required=True, help="see `accullm-export targets` (orin, cpu, hopper, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created)")
    add_recipe_arguments(parser.add_argument_group("recipe (default: the target's preset, in its backend's form)"),
                         backend_option=False)
    parser.add_argument("--calib", default="wiki", metavar="SOURCE",
                        help="calibration text (wiki, .txt, .jsonl) or a load_data() script for a plain ONNX model "
                             "(a script is executed, with your privileges)")
    parser.add_argument("--calib-samples", type=arg_types.positive_int, metavar="N",
                        help="calibration windows (default: as many as the recipe's GPTQ and distillation use)")
    parser.add_argument("--calib-seq-len", type=arg_types.token_count, default=512)
    parser.add_argument("--validation-windows", type=arg_types.positive_int, default=8,
                        help="held-out text windows validated")
    parser.add_argument("--validation-seq-len", type=arg_types.token_count, default=256,
                        help="tokens per validation window")
    parser.add_argument("--max-batch", type=arg_types.batch_size, default=1, help="engine profiles: largest batch")
    parser.add_argument("--max-seq-len", type=arg_types.token_count, default=2048,
                        help="engine profiles: longest sequence")
    parser.add_argument("--tensorrt-version", metavar="X.Y",
                        help="TensorRT on the device (default: the target's, see `accullm-export targets`); the "
                             "bundle uses only what that version's ONNX parser takes")
    gates = parser.add_argument_group("gates (default: per recipe; a failed gate exits 1 and keeps the work)")
    gates.add_argument("--max-kl", type=arg_types.non_negative, help="maximum mean KL(reference || candidate)")
    gates.add_argument("--min-top1", type=arg_types.fraction, help="minimum top-1 agreement, in [0, 1]")
    gates.add_argument("--max-ppl-delta", type=arg_types.non_negative,
                       help="maximum |perplexity change| in percent")
    gates.add_argument("--no-gates", action="store_true", help="measure but do not gate")
    golden = parser.add_argument_group("golden mode (lossless speculative decoding)")
    golden.add_argument("--golden", action="store_true",
                        help="also write OUT/golden: the validated build as the draft, a verifier beside it, and "
                             "golden.json; run it with `accullm-export generate OUT/golden PROMPT --golden`")
    golden.add_argument("--verifier", choices=("reference", "w8"), default=None,
                        help="reference (default): the source model, fp32 on cpu, fp16 on GPU targets; w8: the "
                             "draft's INT4 planes plus INT4 residual planes, sharing the draft's bytes (cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where quantize's statistics passes and distillation run (cuda: this machine's GPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous build output in that folder (never a folder of anything else)")


def run(args: argparse.Namespace) -> int:
    from accullm_export.build.pipeline import BuildOptions, build, format_build_summary
    from accullm_export.cli.quantize import resolve_recipe
    from accullm_export.errors import UserError
    from accullm_export.targets import get_target

    if args.verifier is not None and not args.golden:
        raise UserError("--verifier needs --golden")
    target = get_target(args.target)
    given = {"max-kl": args.max_kl, "min-top1": args.min_top1, "max-ppl-delta": args.max_ppl_delta}
    gates = {} if args.no_gates else ({k: v for k, v in given.items() if v is not None} or None)
    if args.preset is None and args.config is None:  # an empty --preset "" is an unknown preset, not the default
        args.preset = target.default_preset
    recipe = resolve_recipe(args, target.backend)
    options = BuildOptions(target=args.target, recipe=recipe, calib=args.calib, calib_samples=args.calib_samples,
                           calib_seq_len=args.calib_seq_len, gates=gates,
                           validation_windows=args.validation_windows, validation_seq_len=args.validation_seq_len,
                           max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                           tensorrt_version=args.tensorrt_version, device=args.device,
                           golden=(args.verifier or "reference") if args.golden else None)
    manifest = build(args.model, args.output, options, overwrite=args.overwrite)
    print(format_build_summary(manifest, args.output))
    deliverable = manifest["deliverable"]
    if deliverable["kind"] == "tensorrt-bundle":
        print(f"TensorRT is not usable here ({deliverable['reason']}), so this is a deployment bundle: on the "
              f"{manifest['target']['device']} run `bash {args.output}/bundle/build_engine.sh`")
    return 0
