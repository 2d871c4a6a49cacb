"""What an outlier branch costs ONNX Runtime per layer at batch-1 decode, against a constant bias and nothing.

A synthetic stand-in for a decode step: a chain of ``--layers`` INT4 layers (blocked DequantizeLinear + MatMul,
which ONNX Runtime fuses into MatMulNBits) of the sample's q/k/v and gate/up shapes in turn (576 x 960 and
576 x 3072, block ``--block-size``, zero points), each followed by a Slice back to 576 channels. Variants, each
its own session, timed in interleaved rounds (ORT all, ``--threads`` intra-op threads):

* ``plain``: the chain as it is;
* ``bias``: each layer plus the Add of a constant vector (a bias correction; ONNX Runtime folds it
  into MatMulNBits, with a Reshape on either side);
* ``branch-K``: each layer plus an outlier branch of K channels as ``isolate_outliers`` writes it (a last-axis
  Gather, an fp32 MatMul by K rows, an Add).

    .venv/bin/python benchmarks/branch_cost.py --out bench_out/branch_cost.md

Reports microseconds per chain and the extra per layer over ``plain``. A benchmark: it measures, it asserts
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

HIDDEN, WIDTHS = 576, (960, 3072)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4, 8, 20],
                        help="outlier channels per branch, one variant each")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=40, help="runs of the chain per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def chain(kind: str, channels: int, layers: int, block: int, seed: int = 0):
    """The ONNX model of one variant."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    tensors = [numpy_helper.from_array(np.array(value, dtype=np.int64), name)
               for name, value in (("start", [0]), ("end", [HIDDEN]), ("axis", [-1]))]
    nodes, x = [], "x"
    for index in range(layers):
        width = WIDTHS[index % len(WIDTHS)]
        blocks = -(-HIDDEN // block)
        tensors += [
            helper.make_tensor(f"q{index}", TensorProto.UINT4, (HIDDEN, width),
                               rng.integers(0, 16, HIDDEN * width).tolist()),
            numpy_helper.from_array((rng.random((blocks, width)) * 0.01 + 0.001).astype(np.float32), f"s{index}"),
            helper.make_tensor(f"z{index}", TensorProto.UINT4, (blocks, width), [8] * (blocks * width))]
        nodes += [helper.make_node("DequantizeLinear", [f"q{index}", f"s{index}", f"z{index}"], [f"w{index}"],
                                   axis=0, block_size=block),
                  helper.make_node("MatMul", [x, f"w{index}"], [f"m{index}"])]
        y = f"m{index}"
        if kind == "bias":
            tensors.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) * 0.01, f"b{index}"))
            nodes.append(helper.make_node("Add", [y, f"b{index}"], [f"y{index}"]))
            y = f"y{index}"
        elif kind == "branch":
            tensors += [numpy_helper.from_array(np.arange(0, 20 * channels, 20, dtype=np.int64), f"i{index}"),
                        numpy_helper.from_array(rng.standard_normal((channels, width)).astype(np.float32) * 0.01,
                                                f"r{index}")]
            nodes += [helper.make_node("Gather", [x, f"i{index}"], [f"g{index}"], axis=-1),
                      helper.make_node("MatMul", [f"g{index}", f"r{index}"], [f"o{index}"]),
                      helper.make_node("Add", [y, f"o{index}"], [f"y{index}"])]
            y = f"y{index}"
        nodes.append(helper.make_node("Slice", [y, "start", "end", "axis"], [f"t{index}"]))
        x = f"t{index}"
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, HIDDEN])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    variants = [("plain", 0), ("bias", 0)] + [("branch", count) for count in args.channels]
    sessions = {}
    for kind, count in variants:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = args.threads
        sessions[(kind, count)] = ort.InferenceSession(
            chain(kind, count, args.layers, args.block_size).SerializeToString(), options,
            providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, 1, HIDDEN)).astype(np.float32)}
    samples = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        for variant in np.roll(np.arange(len(variants)), -round_index):
            session = sessions[variants[variant]]
            start = time.perf_counter()
            for _ in range(args.calls):
                session.run(None, feed)
            samples[variants[variant]].append((time.perf_counter() - start) / args.calls * 1e6)
    base = statistics.median(samples[("plain", 0)])
    lines = ["| variant | us per chain | extra us per layer |", "|---|--:|--:|"]
    for kind, count in variants:
        median = statistics.median(samples[(kind, count)])
        label = f"branch, {count} channels" if kind == "branch" else kind
        lines.append(f"| {label} | {median:.0f} | {(median - base) / args.layers:+.2f} |")
    shapes = " / ".join(map(str, WIDTHS))
    lines.append(f"\n{args.layers} layers ({HIDDEN} x {shapes}, INT4 block {args.block_size} with zero points), "
                 f"median of {args.rounds} interleaved rounds of {args.calls} calls, ORT all, "
                 f"{args.threads} threads")
    peers.print_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
