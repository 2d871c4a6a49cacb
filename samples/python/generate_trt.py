"""Greedy generation from a TensorRT engine built by `accullm-export build` (standalone: tensorrt, torch, tokenizers).

    python samples/python/generate_trt.py OUT/model.engine "The capital of France is" \
        --plugins OUT/bundle/plugins/build/libaccullm_plugins.so --max-new-tokens 32

The engine's two optimization profiles are used as `build` made them: 0 for the prompt (prefill), 1 for each
new token (decode). The KV cache lives on the GPU as torch tensors; each step's present.* become the next
step's past_key_values.*. Without TensorRT, torch with CUDA, or a GPU, it says which is missing and exits 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--plugins", type=Path, help="libaccullm_plugins.so, if the engine uses accullm ops")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the engine's folder)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        import tensorrt as trt
        import torch
        from tokenizers import Tokenizer
    except ImportError as exc:
        print(f"generate_trt: {exc.name} is not installed (needs tensorrt, torch with CUDA, tokenizers)", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        print("generate_trt: no CUDA GPU is visible", file=sys.stderr)
        return 3
    tokenizer = Tokenizer.from_file(str((args.tokenizer or args.engine.parent) / "tokenizer.json"))
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    runtime = trt.Runtime(logger)
    if args.plugins:
        runtime.get_plugin_registry().load_library(str(args.plugins))
    engine = runtime.deserialize_cuda_engine(args.engine.read_bytes())
    if engine is None:
        print(f"generate_trt: TensorRT could not load {args.engine}", file=sys.stderr)
        return 1
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    torch_type = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                  trt.int32: torch.int32, trt.bfloat16: torch.bfloat16}
    kv_shape = engine.get_tensor_shape("past_key_values.0.key")
    kv_type = torch_type[engine.get_tensor_dtype("past_key_values.0.key")]
    layers = sum(n.startswith("past_key_values.") and n.endswith(".key") for n in inputs)
    past = {n: torch.empty((1, kv_shape[1], 0, kv_shape[3]), dtype=kv_type, device="cuda")
            for n in inputs if n.startswith("past_key_values.")}
    ids = tokenizer.encode(args.prompt).ids
    generated, step_ids, length = [], ids, 0
    for step in range(args.max_new_tokens):
        count = len(step_ids)
        feed = {"input_ids": torch.tensor([step_ids], dtype=torch.int64, device="cuda"),
                "attention_mask": torch.ones((1, length + count), dtype=torch.int64, device="cuda"),
                "position_ids": torch.arange(length, length + count, dtype=torch.int64, device="cuda")[None], **past}
        profile = 1 if step > 0 and engine.num_optimization_profiles > 1 else 0
        context.set_optimization_profile_async(profile, stream.cuda_stream)
        spare = torch.empty(1, device="cuda")  # a valid address for empty tensors (the first step's cache)
        for name in inputs:
            tensor = feed[name].to(torch_type[engine.get_tensor_dtype(name)]).contiguous()
            feed[name] = tensor
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else spare.data_ptr())
        results = {}
        for name in outputs:
            results[name] = torch.empty(tuple(context.get_tensor_shape(name)),
                                        dtype=torch_type[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, results[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            print("generate_trt: TensorRT failed to run the engine", file=sys.stderr)
            return 1
        stream.synchronize()
        token = int(results["logits"][0, -1].float().argmax())
        generated.append(token)
        print(tokenizer.decode([token]), end="", flush=True)
        past = {f"past_key_values.{i}.{kind}": results[f"present.{i}.{kind}"] for i in range(layers)
                for kind in ("key", "value")}
        length, step_ids = length + count, [token]
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
