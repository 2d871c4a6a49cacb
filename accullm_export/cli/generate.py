"""``accullm-export generate OUT_DIR "prompt"``: streams text, then prints tokens/s."""

from __future__ import annotations

import argparse
import sys

HELP = "generate text from an exported folder with ONNX Runtime (prefill, then KV-cache decode)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types

    parser.add_argument("model", metavar="MODEL_DIR", help="exported folder (or its model.onnx)")
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--max-new-tokens", type=arg_types.token_count, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=arg_types.positive, default=1.0)
    parser.add_argument("--top-k", type=arg_types.integer(0, 2**31 - 1), default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=arg_types.number(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus sampling, in (0, 1]")
    parser.add_argument("--seed", type=arg_types.seed, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from accullm_export.runtime import GenerationConfig, text_stream
    from accullm_export.runtime.trt_runner import load_runner

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = load_runner(args.model, device=args.device)  # an .engine runs in TensorRT
    stream, pieces = text_stream(model, args.prompt, config)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    tokens = stream.decode_steps + 1
    rate = stream.decode_steps / stream.decode_seconds if stream.decode_seconds else float("nan")
    print(f"[{tokens} tokens; prefill {stream.prefill_seconds * 1000:.0f} ms; decode {rate:.1f} tokens/s]",
          file=sys.stderr)
    return 0
