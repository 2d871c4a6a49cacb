"""``accullm-export generate OUT_DIR "prompt"``: streams text, then prints tokens/s.

With ``--golden DRAFT_DIR`` the draft proposes tokens and OUT_DIR verifies them (lossless speculative decoding);
with ``--golden`` alone OUT_DIR is a golden folder (``build --golden``) whose golden.json names the pair.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable

FROM_GOLDEN_FOLDER = ""  # --golden without DRAFT_DIR: the pair golden.json names
HELP = "generate text from an exported folder with ONNX Runtime (prefill, then KV-cache decode)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from accullm_export.cli import arg_types
    from accullm_export.runtime.speculative import MAX_DRAFT_TOKENS

    parser.add_argument("model", metavar="MODEL_DIR", help="exported folder (or its model.onnx); the verifier "
                                                           "with --golden DRAFT_DIR; a golden folder with --golden")
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--max-new-tokens", type=arg_types.token_count, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=arg_types.positive, default=1.0)
    parser.add_argument("--top-k", type=arg_types.integer(0, 2**31 - 1), default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=arg_types.number(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus sampling, in (0, 1]")
    parser.add_argument("--seed", type=arg_types.seed, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--golden", metavar="DRAFT_DIR", nargs="?", const=FROM_GOLDEN_FOLDER, default=None,
                        help="golden mode: DRAFT_DIR (a low-bit build of the same model) proposes tokens and "
                             "MODEL_DIR verifies them; the output is MODEL_DIR's own. Without DRAFT_DIR (after the "
                             "prompt), MODEL_DIR is a golden folder from `build --golden` and its golden.json names "
                             "the pair, checked file by file")
    parser.add_argument("--draft-tokens", metavar="K", type=arg_types.integer(1, MAX_DRAFT_TOKENS), default=None,
                        help="tokens the draft proposes per verifier pass (default: adapts to the acceptance)")


def run(args: argparse.Namespace) -> int:
    from accullm_export.errors import UserError
    from accullm_export.runtime import GenerationConfig, text_stream
    from accullm_export.runtime.trt_runner import load_runner

    if args.draft_tokens is not None and args.golden is None:
        raise UserError("--draft-tokens needs --golden (DRAFT_DIR, or none for a golden folder)")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.golden is not None:
        return _run_golden(args, config)
    from accullm_export.runtime.speculative import is_golden_folder, verifier_options

    # an .engine runs in TensorRT; a golden folder's verifier runs as golden mode runs it
    model = load_runner(args.model, device=args.device,
                        **(verifier_options(args.model) if is_golden_folder(args.model) else {}))
    stream, pieces = text_stream(model, args.prompt, config)
    _write_text(args.prompt, pieces)
    tokens = stream.decode_steps + 1
    rate = stream.decode_steps / stream.decode_seconds if stream.decode_seconds else float("nan")
    print(f"[{tokens} tokens; prefill {stream.prefill_seconds * 1000:.0f} ms; decode {rate:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _run_golden(args: argparse.Namespace, config) -> int:
    from accullm_export.runtime.speculative import check_pair, golden_models, speculative_text, verifier_options
    from accullm_export.runtime.trt_runner import load_runner

    if args.golden == FROM_GOLDEN_FOLDER:
        draft_path, verifier_path = golden_models(args.model)
    else:
        draft_path, verifier_path = args.golden, args.model
    check_pair(draft_path, verifier_path)
    verifier = load_runner(verifier_path, device=args.device, **verifier_options(verifier_path))
    draft = load_runner(draft_path, device=args.device)
    decoder, pieces = speculative_text(draft, verifier, args.prompt, config, args.draft_tokens)
    _write_text(args.prompt, pieces)
    result = decoder.result()
    print(f"[{len(result.tokens)} tokens; prefill {result.prefill_seconds * 1000:.0f} ms; acceptance "
          f"{result.acceptance_rate:.0%}; {result.tokens_per_verifier_pass:.2f} tokens per verifier pass; "
          f"decode {result.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0


def _write_text(prompt: str, pieces: Iterable[str]) -> None:
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
