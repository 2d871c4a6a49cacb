"""``accullm-export quantize MODEL --recipe RECIPE --profile PROFILE_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse

HELP = ("rewrite a model with a named preset or a recipe file: outlier input channels kept exact, the rest INT8 "
        "or INT4, in standard ONNX ops (see `accullm-export presets`)")


def _outliers(text: str) -> str | int:
    from accullm_export.cli.arg_types import MAX_COUNT

    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a channel count, got {text!r}") from None
    if not 0 <= count <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a channel count up to {MAX_COUNT:,} "
                                         f"(outliers.channels), got {text!r}")
    return count


def add_recipe_arguments(parser: argparse.ArgumentParser, *, backend_option: bool) -> None:
    """The recipe options ``quantize`` and ``build`` share: a preset or a config file, and the few keys a user
    tunes on the command line (each replaces that key of the recipe)."""
    from accullm_export.cli import arg_types
    from accullm_export.recipes.config import BACKENDS, BLOCKS
    from accullm_export.recipes.presets import preset_names

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", "--recipe", dest="preset", metavar="NAME",
                        help=f"a named recipe: {', '.join(preset_names())} (`accullm-export presets` compares them)")
    source.add_argument("--config", metavar="FILE.toml",
                        help="a recipe file (every key: docs/recipes.md; start from --dump-config's output)")
    if backend_option:
        parser.add_argument("--backend", choices=BACKENDS,
                            help="the runtime the model is for: the preset's form for it (default: onnxruntime, or "
                                 "the config file's)")
    parser.add_argument("--block-size", type=int, choices=BLOCKS, metavar="B",
                        help="INT4 rows per scale block (weights.block_size)")
    parser.add_argument("--outliers", type=_outliers, metavar="auto|N|0",
                        help="outlier channels per layer input: the profile's policy, the N largest, or 0 for none "
                             "(outliers.channels)")
    parser.add_argument("--override", action="append", default=[], metavar="PATTERN=PRECISION",
                        help="per-layer precision (fp32, fp16, int8, int4, int4:B); PATTERN is a name part such as "
                             "lm_head or layers.0, or a glob such as '*down_proj*'; repeatable, the last match wins")
    parser.add_argument("--sparsity", type=arg_types.skip_fraction, metavar="S",
                        help="fraction of MLP neurons skipped per token, in [0, 1) (sparsity.fraction)")
    parser.add_argument("--method", choices=("threshold", "predictor"),
                        help="how sparse-skip MLPs choose their neurons (sparsity.method)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", help="exported folder or .onnx file (fp32 or fp16)")
    parser.add_argument("--profile", metavar="PROFILE_DIR", help="from `accullm-export calibrate`")
    parser.add_argument("-o", "--output", metavar="OUT_DIR", help="model folder (created)")
    add_recipe_arguments(parser, backend_option=True)
    parser.add_argument("--dump-config", action="store_true",
                        help="print the fully resolved recipe as TOML and exit (give it back with --config)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the statistics passes (ONNX Runtime) and the distillation (torch) run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous quantize output in that folder (never a folder of anything else)")


def resolve_recipe(args: argparse.Namespace, backend: str | None):
    """The ``Recipe`` the command line asks for: a preset or config file for ``backend``, then the keys given on
    the command line.

    Raises:
        UserError: no preset or config, an unknown preset, a bad config file, or a value a key refuses.
    """
    from accullm_export.errors import UserError
    from accullm_export.graph.layer_plan import parse_override
    from accullm_export.recipes.presets import get_preset, load_config, read_config_backend

    if args.config is not None:
        recipe = load_config(args.config, backend or read_config_backend(args.config) or "onnxruntime")
    elif args.preset is not None:
        recipe = get_preset(args.preset).resolve(backend or "onnxruntime")
    else:
        raise UserError("give --preset NAME (`accullm-export presets` lists them) or --config FILE.toml")
    data = recipe.to_dict()
    if args.block_size is not None:
        data["weights"]["block_size"] = args.block_size
    if args.outliers is not None:
        data["outliers"]["channels"] = args.outliers
    if args.outliers == 0:  # the ablation: no branch, so none of the keys that work on one
        data["outliers"].update(planes=False, bits=16, min_channels=[])
        data["distill"]["outlier_rows"] = False
    data["weights"]["overrides"] += [list(parse_override(text)) for text in args.override]
    if args.sparsity is not None:
        data["sparsity"]["fraction"] = args.sparsity
    if args.method is not None:
        data["sparsity"]["method"] = args.method
    return type(recipe).from_dict(data)


def run(args: argparse.Namespace) -> int:
    from accullm_export.build.quantize import QuantizeOptions, quantize_model
    from accullm_export.cli.sparsify import format_sparsity_summary
    from accullm_export.errors import UserError
    from accullm_export.recipes.toml_io import dump_toml

    recipe = resolve_recipe(args, args.backend)
    if args.dump_config:
        print(dump_toml(recipe.to_dict()), end="")
        return 0
    missing = [name for name, value in (("MODEL", args.model), ("--profile", args.profile), ("-o", args.output))
               if not value]
    if missing:
        raise UserError(f"quantize needs {', '.join(missing)} (only --dump-config runs without them)")
    manifest = quantize_model(args.model, args.output, recipe, args.profile, overwrite=args.overwrite,
                              options=QuantizeOptions(device=args.device))
    print(format_quantize_summary(manifest))
    if manifest["sparsity"]:
        print(format_sparsity_summary(manifest["sparsity"]))
    print(f"model: {args.output}")
    return 0


def _rows_form(recipe: dict) -> str:
    outliers = recipe["outliers"]
    if outliers["planes"]:
        return "rows folded into INT4 planes" + (" (those left in INT8)" if outliers["bits"] == 8 else "")
    return f"rows in {'INT8' if outliers['bits'] == 8 else 'FP16'}"


def format_quantize_summary(manifest: dict) -> str:
    """A few lines: recipe, sizes, bits per weight, outlier channels, notes."""
    size = manifest["size"]
    layers = manifest["layers"]
    with_outliers = [layer for layer in layers if layer["outliers"]]
    precisions: dict[str, int] = {}
    for layer in layers:
        precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
    lines = [
        f"recipe {manifest['recipe']['name']} ({manifest['recipe']['backend']}): " + ", ".join(f"{n} layers {p}" for p, n in sorted(precisions.items())),
        f"size: {manifest['source']['constant_bytes'] / 2**20:.1f} MiB -> "
        f"{size['file_constant_bytes'] / 2**20:.1f} MiB "
        f"({size['file_bits_per_parameter']:.2f} bits per parameter in the file)",
        f"linear layers: {size['linear_bits_per_weight']:.3f} effective bits per weight (scales, zero points and "
        f"outlier rows included)",
        f"outlier branch: {len(with_outliers)} layers, "
        f"{sum(len(layer['outliers']) for layer in with_outliers)} channels in all, " + _rows_form(manifest["recipe"]),
    ]
    if manifest["notes"]:
        lines.append(f"notes: {len(manifest['notes'])} (see manifest.json); first: {manifest['notes'][0]}")
    return "\n".join(lines)
