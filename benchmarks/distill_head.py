"""What one distillation step spends on a quantized LM head: its logit chunks run through the head module (the
float weight rebuilt inside every chunk's product and again in its backward) against ``kl_step``'s way (the
float weight made once a step, the chunks' gradients gathered on it, one backward to the scales).

A synthetic head of ``--hidden`` x ``--vocab`` INT4 integers in blocks of 64, rotated as the w4a16 preset's ONNX
Runtime form rotates the head, reading one window of ``--tokens`` final hidden states in chunks of about
``LOGIT_CHUNK_BYTES`` of logits, as ``kl_step`` cuts them. The loss is the chunks' log-softmax sum. Both ways run in
interleaved rounds; the table gives the median seconds of each and their ratio, and the largest relative
difference of the scales' gradients.

    .venv/bin/python benchmarks/distill_head.py --hidden 576 --vocab 49152     # the sample's head
    .venv/bin/python benchmarks/distill_head.py --hidden 896 --vocab 151936    # Qwen2.5-0.5B's

A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accullm_export.training.distill import (LOGIT_CHUNK_BYTES, BlockScaled, _HeadWithWeight,  # noqa: E402
                                             block_scaled_linear_class)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576, help="the head's input width (default 576)")
    parser.add_argument("--vocab", type=int, default=49152, help="the vocabulary (default 49152)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the window (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    rng = np.random.default_rng(0)
    block = 64
    layer = BlockScaled("lm_head", rng.integers(-8, 8, size=(args.hidden, args.vocab)).astype(np.int8),
                        rng.uniform(0.01, 0.02, size=(-(-args.hidden // block), args.vocab)).astype(np.float32),
                        block_size=block,
                        rotation=np.linalg.qr(rng.standard_normal((args.hidden, args.hidden)))[0].astype(np.float32))
    head = block_scaled_linear_class()(layer, None)
    hidden = torch.from_numpy(rng.standard_normal((1, args.tokens, args.hidden)).astype(np.float32))
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * args.vocab))
    parts = [slice(start, min(start + rows, args.tokens)) for start in range(0, args.tokens, rows)]

    def step(once: bool):
        head.zero_grad(set_to_none=True)
        states = hidden.detach().requires_grad_(True)
        weight = head.dense_weight() if once else None
        run = _HeadWithWeight(head, weight.detach().requires_grad_(True)) if once else head
        for part in parts:
            torch.log_softmax(run(states[:, part]), dim=-1).sum().backward()
        if once:
            weight.backward(run.weight_leaf.grad)
        return head.theta.grad.clone()

    times: dict[str, list[float]] = {"per chunk": [], "once a step": []}
    gradients = {}
    for _ in range(args.rounds):
        for name, once in (("per chunk", False), ("once a step", True)):
            start = time.perf_counter()
            gradients[name] = step(once)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["per chunk"])
    print(f"head {args.hidden} x {args.vocab}, {args.tokens} tokens in {len(parts)} chunks, "
          f"median of {args.rounds} interleaved rounds")
    print("| head weight made | seconds | ratio |\n|---|--:|--:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f}x |")
    reference, other = gradients["per chunk"], gradients["once a step"]
    print(f"largest difference of the scales' gradients: "
          f"{float((reference - other).abs().max() / reference.abs().max()):.1e} of the largest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
