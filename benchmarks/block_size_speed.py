"""What an INT4 layer's block size costs in ONNX Runtime's MatMulNBits at batch-1 decode, one shape at a time.

    python benchmarks/block_size_speed.py [--k 576] [--n 49152] [--blocks 16 32 64 128] [--rounds 300]
                                          [--threads 2] [--out table.md]

The default shape is the sample's LM head ([576, 49152], the largest matrix of SmolLM2-135M). For each block size,
with and without zero points, a model ``DequantizeLinear(int4 blocks) -> MatMul`` is built, ONNX Runtime fuses it
into MatMulNBits (``ORT_ENABLE_ALL``, accuracy level 4 as our runtime and onnxruntime-genai run it), and one
[1, K] row is multiplied ``--rounds`` times after a warm-up; the rows are interleaved round by round so that the
machine's drift touches them alike. The table gives the median time of a call and its ratio to block 64 without
zero points. It measures, it asserts nothing; random weights (the kernel's time does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=576, help="input features (rows of the weight)")
    parser.add_argument("--n", type=int, default=49152, help="output features")
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def layer_model(k: int, n: int, block: int, zero_points: bool, rng: np.random.Generator) -> bytes:
    """A serialized model y = x @ DequantizeLinear(int4 or uint4 [k, n], blocked scales [, uint4 zero points])."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    storage = ml_dtypes.uint4 if zero_points else ml_dtypes.int4
    values = rng.integers(0, 16, size=(k, n)) if zero_points else rng.integers(-8, 8, size=(k, n))
    initializers = [numpy_helper.from_array(values.astype(storage), "q"),
                    numpy_helper.from_array((rng.random((blocks, n)) * 0.01 + 1e-3).astype(np.float32), "s")]
    if zero_points:
        initializers.append(numpy_helper.from_array(rng.integers(0, 16, size=(blocks, n)).astype(storage), "z"))
    nodes = [helper.make_node("DequantizeLinear", [t.name for t in initializers], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # ONNX Runtime rejects the newer one onnx writes
    return model.SerializeToString()


def main(argv=None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [(block, zero_points) for block in args.blocks for zero_points in (False, True)]
    sessions = {}
    for block, zero_points in rows:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
        sessions[block, zero_points] = ort.InferenceSession(layer_model(args.k, args.n, block, zero_points, rng),
                                                            options, providers=["CPUExecutionProvider"])
    feed = {"x": rng.normal(size=(1, args.k)).astype(np.float32)}
    times: dict = {row: [] for row in rows}
    for session in sessions.values():
        for _ in range(20):
            session.run(None, feed)
    for _ in range(args.rounds):
        for row, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[row].append(time.perf_counter() - start)
    medians = {row: float(np.median(t)) for row, t in times.items()}
    reference = medians.get((64, False), next(iter(medians.values())))
    lines = [f"MatMulNBits, [1, {args.k}] x [{args.k}, {args.n}], accuracy level 4, {args.threads} threads, "
             f"median of {args.rounds} interleaved calls", "",
             "| block | zero points | us per call | ratio to block 64 without |", "|--:|---|--:|--:|"]
    lines += [f"| {block} | {'yes' if zero_points else 'no'} | {medians[block, zero_points] * 1e6:.0f} | "
              f"{medians[block, zero_points] / reference:.2f}x |" for block, zero_points in rows]
    peers.print_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
