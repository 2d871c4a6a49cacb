"""What one distillation step spends on a quantized LM head, in time and memory: its logit chunks run through the
head module (the float weight rebuilt inside every chunk's product and again in its backward) against
``kl_step``'s way (the float weight made once a step, the chunks' gradients of the scales gathered on a leaf of
the scales, one backward to the log-scales).

A synthetic head of ``--hidden`` x ``--vocab`` INT4 integers in blocks of 64, rotated as the w4a16 preset's ONNX
Runtime form rotates the head, reading one window of ``--tokens`` final hidden states in chunks of about
``LOGIT_CHUNK_BYTES`` of logits, as ``kl_step`` cuts them. The loss is the chunks' log-softmax sum. Both ways run in
interleaved rounds; the table gives the median seconds of each and their ratio, the most resident memory
each way added above what the process held before it (sampled every 10 ms; the first round's allocations make
the later rounds' pages resident already, so the most over all rounds counts), and the largest relative
difference of the scales' gradients.

    .venv/bin/python benchmarks/distill_head.py --hidden 576 --vocab 49152     # the sample's head
    .venv/bin/python benchmarks/distill_head.py --hidden 896 --vocab 151936    # Qwen2.5-0.5B's

A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accullm_export.training.distill import (LOGIT_CHUNK_BYTES, BlockScaled, _head_weight,  # noqa: E402
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
    holder = torch.nn.Module()  # what _head_weight reads: a model with an lm_head
    holder.lm_head = head
    hidden = torch.from_numpy(rng.standard_normal((1, args.tokens, args.hidden)).astype(np.float32))
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * args.vocab))
    parts = [slice(start, min(start + rows, args.tokens)) for start in range(0, args.tokens, rows)]

    def step(once: bool):
        head.zero_grad(set_to_none=True)
        states = hidden.detach().requires_grad_(True)
        run, scales = _head_weight(holder) if once else (head, None)
        for part in parts:
            torch.log_softmax(run(states[:, part]), dim=-1).sum().backward()
        if once:
            scales.backward(run.scales_leaf.grad)
        return head.theta.grad.clone()

    times: dict[str, list[float]] = {"per chunk": [], "once a step": []}
    added = dict.fromkeys(times, 0)
    gradients = {}
    for _ in range(args.rounds):
        for name, once in (("per chunk", False), ("once a step", True)):
            watch = _PeakResident()
            start = time.perf_counter()
            gradients[name] = step(once)
            times[name].append(time.perf_counter() - start)
            added[name] = max(added[name], watch.stop())
    base = statistics.median(times["per chunk"])
    print(f"head {args.hidden} x {args.vocab}, {args.tokens} tokens in {len(parts)} chunks, "
          f"median of {args.rounds} interleaved rounds")
    print("| head weight made | seconds | ratio | most memory added |\n|---|--:|--:|--:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f}x | "
              f"{added[name] / 2**20:.0f} MiB |")
    reference, other = gradients["per chunk"], gradients["once a step"]
    print(f"largest difference of the scales' gradients: "
          f"{float((reference - other).abs().max() / reference.abs().max()):.1e} of the largest")
    return 0


class _PeakResident:
    """The most resident memory (VmRSS) above its value at the start, sampled every 10 ms until ``stop``."""

    def __init__(self):
        self.start = self.peak = _resident()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, _resident())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _resident()) - self.start


def _resident() -> int:
    """This process's resident bytes (Linux /proc)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS"))


if __name__ == "__main__":
    sys.exit(main())
