"""``accullm-export export MODEL -o OUT_DIR``."""

from __future__ import annotations

import argparse

HELP = "export a Hugging Face folder, a .gguf file or the sample 'smollm2-135m' to ONNX with a KV cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="Hugging Face checkpoint folder, .gguf file, or a named model (smollm2-135m, "
                             "qwen2.5-coder-0.5b: downloaded once, checksum-verified, cached)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weight and activation precision")
    parser.add_argument("--attention", choices=("fused", "decomposed"), default="fused",
                        help="fused: opset 23's standard Attention/RotaryEmbedding ops (fastest in ONNX Runtime); "
                             "decomposed: opset 21 MatMul/Softmax, for runtimes without opset 23")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export output in that folder (never a folder of anything else)")


def run(args: argparse.Namespace) -> int:
    from accullm_export.models.export import export_model

    result = export_model(args.model, args.output, dtype=args.dtype, attention=args.attention,
                          overwrite=args.overwrite)
    print(f"exported {result.num_parameters:,} parameters ({result.num_layers} layers) to {result.model_path} "
          f"in {result.seconds:.1f} s")
    return 0
