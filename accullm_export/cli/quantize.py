"""``accullm-export quantize MODEL --recipe RECIPE --profile PROFILE_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse

HELP = ("rewrite a model with a recipe: outlier input channels in an FP16 branch, the rest INT8 or INT4 "
        "(w8a8, w4a16), or a plain FP16 baseline; standard ONNX QuantizeLinear/DequantizeLinear, weights stored "
        "quantized")


def _outliers(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a channel count, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.graph.recipes import RECIPES
    from accullm_export.quant.scale_codes import SCALE_BITS

    parser.add_argument("model", metavar="MODEL", help="exported folder or .onnx file (fp32 or fp16)")
    parser.add_argument("--recipe", required=True, choices=list(RECIPES),
                        help="; ".join(f"{name}: {defaults.description}" for name, defaults in RECIPES.items()))
    parser.add_argument("--profile", required=True, metavar="PROFILE_DIR", help="from `accullm-export calibrate`")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="model folder (created)")
    parser.add_argument("--block-size", type=int, default=128, help="int4 rows per scale block (64 or 128)")
    parser.add_argument("--outliers", type=_outliers, default="auto",
                        help="auto (the profile's policy), N (the N largest channels of each input), or 0 (no "
                             "FP16 branch, for ablation)")
    parser.add_argument("--policy", choices=("threshold", "topk", "ratio", "sensitivity"),
                        help="which of the profile's outlier policies 'auto' uses (default: the profile's choice)")
    parser.add_argument("--activations", choices=("static", "dynamic"), default="static",
                        help="w8a8: per-tensor scales from the profile, or per-token scales computed at run time")
    parser.add_argument("--activation-group", type=int, default=0, metavar="G",
                        help="w8a8 dynamic: one scale per G input channels of each token (16 to 256; as "
                             "MatMulNBits at accuracy level 4) instead of one per token: much less error, about "
                             "half the CPU decode speed (a batched integer GEMM ONNX Runtime does not prepack)")
    parser.add_argument("--awq", action="store_true", help="w4a16: activation-aware weight scaling")
    parser.add_argument("--gptq", action="store_true", help="w4a16, w8a8: GPTQ error compensation (act-order)")
    parser.add_argument("--gptq-absorb", action="store_true",
                        help="with --gptq: the FP16 outlier rows come last in GPTQ's order and take the other rows' "
                             "rounding error, which costs nothing since they are never rounded (OWQ); an ablation: "
                             "on the sample it measured worse (README)")
    parser.add_argument("--gptq-sink-weight", type=float, default=0.0, metavar="W",
                        help="with --gptq: GPTQ's objective also counts the attention sink (position 0 of each "
                             "calibration window), whose inputs no other token resembles, weighted W against all "
                             "other tokens together (0, the default: left out; 0.2 measured a worse KL on the "
                             "sample, README)")
    parser.add_argument("--scale-search", action="store_true",
                        help="INT4 layers: choose each block's scale (clipping level) for the least rounding error, "
                             "weighted by the input's second moments, on the full grid [-8, 7]")
    parser.add_argument("--asymmetric", action="store_true",
                        help="blocked INT4 layers: unsigned 4-bit values with a 4-bit zero point per block, the "
                             "block's range [min, max] on all 16 levels (+0.0625 bits per weight at block 64). "
                             "ONNX Runtime runs it (MatMulNBits with zero points); TensorRT takes only zero points "
                             "of 0, so TensorRT targets refuse it")
    parser.add_argument("--scale-bits", type=int, choices=SCALE_BITS, default=16,
                        help="blocked INT4 layers: each block's scale in FP16 (16), or as an 8-bit code on a log "
                             "grid shared by the layers that read one input (8: -0.125 bits per weight at block 64; "
                             "scales move by under 1%%). ONNX Runtime folds the codes at load time and still fuses "
                             "MatMulNBits; the TensorRT bundle decodes them into FP16 constants")
    parser.add_argument("--outlier-bits", type=int, choices=(16, 8), default=16,
                        help="the outlier branch's weight rows in FP16 (16) or INT8 with one FP16 scale per 16 rows "
                             "(8: half the rows' bytes, 0.064 bits per weight on the sample, run by ONNX Runtime as an "
                             "8-bit MatMulNBits, no faster there; TensorRT's OutlierSplitGemm plugin takes FP16 rows "
                             "only)")
    parser.add_argument("--outlier-planes", action="store_true",
                        help="ONNX Runtime: fold each INT4 layer's outlier branch into its weight as two INT4 planes "
                             "(the rows rounded on their blocks' grid, and what that left in one more block that "
                             "reads the outlier channels twice): one MatMulNBits per layer instead of three nodes, "
                             "as accurate as INT8 rows on the sample. Layers whose input is not whole blocks and "
                             "branches on the attention sink's activations keep theirs (with --outlier-bits 8, as "
                             "INT8 rows). TensorRT targets keep the FP16 branch (its plugin)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="INT8/INT4 layers: add the FP16 bias E[x] (W - W_quantized), E[x] measured on the "
                             "calibration text, so that each layer's output error has zero mean; GPTQ then works on "
                             "the covariance of x instead of E[x x^T] (16/K bits per weight; ONNX Runtime fuses the "
                             "Add into MatMulNBits). An ablation: on the sample it did not replace the FP16 branch "
                             "and changed little beside it (README)")
    parser.add_argument("--rotate", action="append", default=[], metavar="PATTERN",
                        help="weight-only INT4 layers matching PATTERN (repeatable, as --override matches): the "
                             "low-bit part reads its input block-Hadamard rotated, x R, and rounds R^T W, whose "
                             "blocks round more evenly; the FP16 branch keeps the outlier channels. Four small "
                             "nodes per rotated input, meant for the LM head (--rotate lm_head), whose block size "
                             "sets a large share of the decode time: on the sample, at block 64 it cut the head's "
                             "KL toward the block-16 head's at no measurable speed cost (README)")
    parser.add_argument("--smoothquant", type=float, metavar="ALPHA",
                        help="w8a8: SmoothQuant with migration strength ALPHA (e.g. 0.5), folded into the producers")
    parser.add_argument("--gptq-samples", type=int, default=32,
                        help="calibration windows for the statistics of GPTQ and --bias-correction")
    parser.add_argument("--distill-steps", type=int, default=0, metavar="N",
                        help="w4a16: train the INT4 block scales N steps (one calibration window each) to match the "
                             "source model's next-token distributions (KL); integers, layout and size unchanged; "
                             "needs torch and transformers, about 5 s a step for a 135M model on 2 cores; kept only "
                             "if it lowers the KL on held-out calibration windows")
    parser.add_argument("--distill-norms", action="store_true",
                        help="with --distill-steps: train the RMSNorm gains too")
    parser.add_argument("--distill-rounding", action="store_true",
                        help="with --distill-steps: train the INT4 integers too (learned rounding: each may move "
                             "one step up or down from where GPTQ or rounding left it); same layout and size")
    parser.add_argument("--distill-rounding-lr", type=float, metavar="LR",
                        help="with --distill-rounding: Adam's step on the integer offsets (default 2/N: an offset "
                             "whose gradient keeps one sign moves about one step over the run)")
    parser.add_argument("--distill-outlier-rows", action="store_true",
                        help="with --distill-steps: also train the FP16 outlier rows (same size and speed)")
    parser.add_argument("--distill-lr", type=float, default=1e-3, help="Adam's step on the log-scales")
    parser.add_argument("--distill-samples", type=int, default=64,
                        help="calibration windows of the profile to distill on (one eighth are held out)")
    parser.add_argument("--refine-vocab", type=int, default=0, metavar="K",
                        help="give the INT4 LM head's K rows of largest calibration error (sum over calibration "
                             "tokens of p_v (x . d_v)^2: the vocabulary that holds the probability) a second INT4 "
                             "stage, about 8-bit exact; costs 4.25 bits per row entry and K/V more head reads")
    parser.add_argument("--vocab-samples", type=int, default=32,
                        help="calibration windows of the profile --refine-vocab ranks the head's rows on")
    parser.add_argument("--override", action="append", default=[], metavar="PATTERN=PRECISION",
                        help="per-layer precision (fp32, fp16, int8, int4, or int4:B for INT4 blocks of B rows); "
                             "PATTERN is a name part such as lm_head or layers.0, or a glob such as '*down_proj*'; "
                             "repeatable, the last match wins")
    parser.add_argument("--outlier-layers", action="append", default=[], metavar="PATTERN",
                        help="give the FP16 outlier branch only to layers matching PATTERN (repeatable; default: "
                             "every INT8/INT4 layer); 'residual': the layers reading the residual stream through a "
                             "norm (q/k/v, gate/up, lm_head), where its outlier features enter, and those writing the "
                             "attention sink's massive activations; '!PATTERN' takes matching layers out (e.g. "
                             "residual and '!*up_proj*'); each branch costs a few small kernels per decode step")
    parser.add_argument("--min-outliers", action="append", default=[], metavar="PATTERN=N",
                        help="at least N outlier channels for the branch of each layer matching PATTERN: the "
                             "policy's, topped up by the channels of largest calibration E[x^2] (repeatable; e.g. "
                             "lm_head=32, where 24 more FP16 rows cost the sample 0.14 bits per weight)")
    parser.add_argument("--embeddings", choices=("int8", "fp16", "fp32"), default="int8",
                        help="the token-embedding table (fp32: left as it is)")
    parser.add_argument("--onnxruntime-fusions", action="store_true",
                        help="write attention as GroupQueryAttention (rotary inside) and each residual Add + "
                             "RMSNorm as SkipSimplifiedLayerNormalization, ONNX Runtime's contrib ops, as "
                             "onnxruntime-genai does: fewer nodes per CPU decode step; the file then runs only in "
                             "ONNX Runtime (not TensorRT or Polygraphy's TensorRT backend)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    from accullm_export.cli.sparsify import add_sparsity_arguments

    add_sparsity_arguments(parser.add_argument_group("sparse-skip MLPs (see `sparsify`)"), required=False)


def run(args: argparse.Namespace) -> int:
    from accullm_export.build.quantize import FINISHING_PASSES, ONNXRUNTIME_FUSIONS, QuantizeOptions, quantize_model
    from accullm_export.cli.sparsify import format_sparsity_summary, sparsity_config
    from accullm_export.errors import UserError

    if args.gptq_samples < 1:
        raise UserError("--gptq-samples must be at least 1")
    if args.distill_samples < 1:
        raise UserError("--distill-samples must be at least 1")
    if args.vocab_samples < 1:
        raise UserError("--vocab-samples must be at least 1")
    if not args.distill_lr > 0:
        raise UserError(f"--distill-lr must be positive, not {args.distill_lr}")
    if args.distill_rounding_lr is not None and not (args.distill_rounding and args.distill_rounding_lr > 0):
        raise UserError("--distill-rounding-lr takes a positive rate and needs --distill-rounding")
    recipe = recipe_from_args(args)
    options = QuantizeOptions(gptq_samples=args.gptq_samples, distill_samples=args.distill_samples,
                              vocab_samples=args.vocab_samples,
                              distill_lr=args.distill_lr, distill_rounding_lr=args.distill_rounding_lr)
    manifest = quantize_model(args.model, args.output, recipe, args.profile, options=options,
                              sparsity=sparsity_config(args), overwrite=args.overwrite,
                              finishing=FINISHING_PASSES + (ONNXRUNTIME_FUSIONS if args.onnxruntime_fusions else ()))
    print(format_quantize_summary(manifest))
    if manifest["sparsity"]:
        print(format_sparsity_summary(manifest["sparsity"]))
    print(f"model: {args.output}")
    return 0


def _rows_form(recipe: dict) -> str:
    if recipe.get("outlier_planes"):
        return "rows folded into INT4 planes" + (" (those left in INT8)" if recipe.get("outlier_bits") == 8 else "")
    return f"rows in {'INT8' if recipe.get('outlier_bits') == 8 else 'FP16'}"


def format_quantize_summary(manifest: dict) -> str:
    """A few lines: recipe, sizes, bits per weight, outlier channels, notes."""
    size = manifest["size"]
    layers = manifest["layers"]
    with_outliers = [layer for layer in layers if layer["outliers"]]
    precisions: dict[str, int] = {}
    for layer in layers:
        precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
    lines = [
        f"recipe {manifest['recipe']['name']}: " + ", ".join(f"{n} layers {p}" for p, n in sorted(precisions.items())),
        f"size: {manifest['source']['constant_bytes'] / 2**20:.1f} MiB -> "
        f"{size['file_constant_bytes'] / 2**20:.1f} MiB "
        f"({size['file_bits_per_parameter']:.2f} bits per parameter in the file)",
        f"linear layers: {size['linear_bits_per_weight']:.3f} effective bits per weight (scales, zero points, outlier "
        f"rows and bias corrections included)",
        f"outlier branch: {len(with_outliers)} layers, "
        f"{sum(len(layer['outliers']) for layer in with_outliers)} channels in all, " + _rows_form(manifest["recipe"]),
    ]
    if manifest["notes"]:
        lines.append(f"notes: {len(manifest['notes'])} (see manifest.json); first: {manifest['notes'][0]}")
    return "\n".join(lines)


def recipe_from_args(args: argparse.Namespace):
    """The ``Recipe`` the command line asks for (its own checks raise ``UserError``)."""
    from accullm_export.graph.recipes import Recipe, parse_min_outliers, parse_override

    return Recipe(name=args.recipe, block_size=args.block_size, outliers=args.outliers, policy=args.policy,
                  activations=args.activations, activation_group=args.activation_group, awq=args.awq,
                  gptq=args.gptq, gptq_absorb=args.gptq_absorb, scale_search=args.scale_search,
                  asymmetric=args.asymmetric, scale_bits=args.scale_bits, smoothquant=args.smoothquant,
                  bias_correction=args.bias_correction, gptq_sink_weight=args.gptq_sink_weight,
                  outlier_bits=args.outlier_bits, outlier_planes=args.outlier_planes,
                  overrides=tuple(parse_override(text) for text in args.override), embeddings=args.embeddings,
                  outlier_layers=tuple(args.outlier_layers), distill_steps=args.distill_steps,
                  distill_norms=args.distill_norms, distill_rounding=args.distill_rounding,
                  distill_outlier_rows=args.distill_outlier_rows, rotate=tuple(args.rotate),
                  min_outliers=tuple(parse_min_outliers(text) for text in args.min_outliers),
                  refine_vocab=args.refine_vocab)
