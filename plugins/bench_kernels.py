"""Time the accullm CUDA kernels against torch fp16 (cuBLAS) on a GPU and print markdown tables.

    python plugins/bench_kernels.py [--iterations 20] [--output bench.md]

OutlierSplitGemm (int4 blocks of 64 and int8 per channel, 16 outlier channels) against ``torch.matmul`` with an fp16
weight, at 1, 4 and 16 rows on SmolLM2's 576x1536 and 1536x576 and a 7B MLP's 4096x11008; SparseSkipMLP (one token,
half the neurons skipped) against the dense fp16 MLP. Achieved bandwidth is the bytes a call must read and write
(weights, scales, outlier rows, x, y; not split-K partials) over its time, as a fraction of a measured
device-to-device copy (read + write bytes over time). Every timed call cycles through enough copies of the weights
to exceed twice the L2 cache, so weights come from DRAM as in a real model; calls are captured in a CUDA graph so
Python launch overhead is not timed. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plugins import kernels  # noqa: E402
from plugins.outlier_split_gemm.reference import pack_int4  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (4096, 11008)]
MLP_SHAPES = [(576, 1536), (4096, 11008)]
ROWS = [1, 4, 16]
OUTLIERS = 16
MAX_COPIES = 256
DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="graph replays per measurement (default 20)")
    parser.add_argument("--build-dir", type=Path, help="where to build libaccullm_kernels.so (default: a temp dir)")
    parser.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    return parser.parse_args(argv)


class Timer:
    """Median time of one call, captured `calls_per_graph` times in a CUDA graph and replayed."""

    def __init__(self, torch, iterations: int):
        self.torch, self.iterations = torch, iterations

    def __call__(self, calls) -> float:
        """calls: list of zero-argument callables (one per weight copy). Returns seconds per call."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls[: min(3, len(calls))]:  # warm up (and let cuBLAS pick its kernels) outside capture
                call()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / len(calls))
        return float(np.median(times))


def copy_bandwidth(torch, timer: Timer, megabytes: int = 512) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and the bytes written."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = timer([lambda: target.copy_(source)])
    return 2 * source.numel() / seconds


def current_stream(torch) -> int:
    """The cudaStream_t of torch's current stream (inside graph capture: the capture stream)."""
    return torch.cuda.current_stream().cuda_stream


def copies_for(torch, footprint_bytes: int) -> int:
    """Weight copies to cycle through so that their total exceeds twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / max(footprint_bytes, 1))))


def time_gemm(torch, lib, timer, rng, k, n, rows, bits, block_size, cublas: bool = True) -> dict:
    """Seconds per call of our OutlierSplitGemm and (``cublas``) of fp16 cuBLAS on the same shape, with the bytes
    each must move."""
    cuda = dict(device=DEVICE)
    limit = 7 if bits == 4 else 127
    values = rng.integers(-limit, limit + 1, size=(k, n), dtype=np.int8)
    stored = torch.from_numpy(pack_int4(values) if bits == 4 else values).to(**cuda)
    scale_shape = (-(-k // block_size), n) if bits == 4 else (n,)
    scales = torch.rand(scale_shape, **cuda).mul(0.01).add(1e-3).half()
    channels = torch.from_numpy(np.sort(rng.choice(k, OUTLIERS, replace=False)).astype(np.int32)).to(**cuda)
    outlier_weight = torch.randn(OUTLIERS, n, **cuda).half()
    weight_bytes = stored.numel() + 2 * scales.numel() + 2 * outlier_weight.numel()
    copies = copies_for(torch, weight_bytes)
    weights = [stored] + [stored.clone() for _ in range(copies - 1)]
    x = torch.randn(rows, k, **cuda).half()
    y = torch.empty(rows, n, **cuda).half()
    workspace_bytes = lib.accullm_outlier_split_gemm_workspace_size(rows, k, n, OUTLIERS, bits, block_size)
    workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, **cuda)

    def ours(weight):
        def call():
            status = lib.accullm_outlier_split_gemm(
                x.data_ptr(), weight.data_ptr(), scales.data_ptr(), channels.data_ptr(), outlier_weight.data_ptr(),
                y.data_ptr(), rows, k, n, OUTLIERS, bits, block_size, kernels.DTYPE_FLOAT16, workspace.data_ptr(),
                workspace_bytes, current_stream(torch))
            if status:
                raise RuntimeError(f"accullm_outlier_split_gemm returned cudaError {status}")
        return call

    ours_seconds = timer([ours(weight) for weight in weights])
    del weights
    cublas_seconds = None
    if cublas:
        dense = torch.randn(k, n, **cuda).half()
        dense_copies = [dense] + [dense.clone() for _ in range(copies_for(torch, dense.numel() * 2) - 1)]
        cublas_seconds = timer([lambda w=w: torch.matmul(x, w, out=y) for w in dense_copies])
        del dense_copies
    activations = 2 * (rows * k + rows * n)
    return dict(ours_seconds=ours_seconds, cublas_seconds=cublas_seconds, ours_bytes=weight_bytes + activations,
                cublas_bytes=2 * k * n + activations)


def gemm_row(torch, lib, timer, rng, k, n, rows, bits, block_size, bandwidth) -> list:
    """One OutlierSplitGemm table row: our kernel and fp16 cuBLAS on the same shape."""
    timed = time_gemm(torch, lib, timer, rng, k, n, rows, bits, block_size)
    ours_seconds, cublas_seconds = timed["ours_seconds"], timed["cublas_seconds"]
    ours_bytes, cublas_bytes = timed["ours_bytes"], timed["cublas_bytes"]
    quant = f"int4 b{block_size}" if bits == 4 else "int8"
    return [f"{k}x{n}", rows, quant, f"{ours_seconds * 1e6:.1f}", f"{ours_bytes / ours_seconds / 1e9:.0f}",
            f"{ours_bytes / ours_seconds / bandwidth:.2f}", f"{cublas_seconds * 1e6:.1f}",
            f"{cublas_bytes / cublas_seconds / 1e9:.0f}", f"{cublas_bytes / cublas_seconds / bandwidth:.2f}",
            f"{cublas_seconds / ours_seconds:.2f}x"]


def mlp_row(torch, lib, timer, rng, hidden, intermediate, method, block_size) -> list:
    """One SparseSkipMLP table row: one token at 50% sparsity against the dense fp16 MLP."""
    cuda = dict(device=DEVICE)
    rank = 16 if method == "predictor" else 0
    x = torch.randn(1, hidden, **cuda).half()
    stored, scales, dense = [], [], []
    for rows, columns in ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden)):
        if block_size:  # int4 values with one power-of-two scale; the dense baseline multiplies the same numbers
            values = rng.integers(-7, 8, size=(rows, columns), dtype=np.int8)
            stored.append(torch.from_numpy(pack_int4(values)).to(**cuda))
            scales.append(torch.full((-(-rows // block_size), columns), 2.0 ** -7, **cuda).half())
            dense.append(torch.from_numpy(values.astype(np.float16) * np.float16(2.0 ** -7)).to(**cuda))
        else:
            dense.append(torch.randn(rows, columns, **cuda).div(rows ** 0.5).half())
            stored.append(dense[-1])
    guesser = [None, None, None]
    if method == "predictor":
        guesser = [torch.randn(hidden, rank, **cuda).div(hidden ** 0.5).half(),
                   torch.randn(rank, intermediate, **cuda).mul(0.1).half(),
                   torch.from_numpy(rng.choice([-2.0, 2.0], intermediate).astype(np.float16)).to(**cuda)]
        level = torch.zeros((), **cuda).half()
    else:  # the median |silu(gate) * up| of this token: half the neurons kept
        gate, up = (x.float() @ dense[0].float()), (x.float() @ dense[1].float())
        level = (torch.nn.functional.silu(gate) * up).abs().median().half()
    y = torch.empty(1, hidden, **cuda).half()
    method_code = kernels.METHODS[method]
    workspace_bytes = lib.accullm_sparse_skip_mlp_workspace_size(1, hidden, intermediate, rank, method_code,
                                                                 block_size)
    workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, **cuda)
    footprint = sum(t.numel() * t.element_size() for t in stored + scales)
    weight_sets = [stored] + [[t.clone() for t in stored] for _ in range(copies_for(torch, footprint) - 1)]
    pointer = lambda tensor: None if tensor is None else tensor.data_ptr()  # noqa: E731
    scale_pointers = [pointer(s) for s in scales] if block_size else [None] * 3

    def ours(weights):
        def call():
            status = lib.accullm_sparse_skip_mlp(
                x.data_ptr(), *(w.data_ptr() for w in weights), level.data_ptr(), *(pointer(g) for g in guesser),
                *scale_pointers, y.data_ptr(), 1, hidden, intermediate, rank, method_code, 0, block_size,
                workspace.data_ptr(), workspace_bytes, current_stream(torch))  # activation 0: silu
            if status:
                raise RuntimeError(f"accullm_sparse_skip_mlp returned cudaError {status}")
        return call

    ours_seconds = timer([ours(weights) for weights in weight_sets])
    dense_sets = [dense] + [[t.clone() for t in dense] for _ in range(copies_for(torch, 6 * hidden * intermediate) - 1)]

    def dense_mlp(weights):
        gate_weight, up_weight, down_weight = weights
        return lambda: torch.matmul(torch.nn.functional.silu(x @ gate_weight) * (x @ up_weight), down_weight, out=y)

    dense_seconds = timer([dense_mlp(weights) for weights in dense_sets])
    storage = f"int4 b{block_size}" if block_size else "fp16"
    return [f"{hidden}x{intermediate}", method, storage, f"{ours_seconds * 1e6:.1f}", f"{dense_seconds * 1e6:.1f}",
            f"{dense_seconds / ours_seconds:.2f}x"]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernels.py needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as scratch:
        library = kernels.build_library(args.build_dir or Path(scratch), architectures=(f"{major}{minor}",))
        lib = kernels.load_library(library)
        timer = Timer(torch, args.iterations)
        rng = np.random.default_rng(0)
        bandwidth = copy_bandwidth(torch, timer)
        gemm_rows = [gemm_row(torch, lib, timer, rng, k, n, rows, bits, block_size, bandwidth)
                     for k, n in SHAPES for rows in ROWS for bits, block_size in ((4, 64), (8, 0))]
        mlp_rows = [mlp_row(torch, lib, timer, rng, hidden, intermediate, method, block_size)
                    for hidden, intermediate in MLP_SHAPES for method in ("threshold", "predictor")
                    for block_size in (0, 64)]
    device = torch.cuda.get_device_name(0)
    report = "\n\n".join([
        f"# accullm kernels on {device} (sm_{major}{minor})",
        f"Device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write). Times are per call, CUDA-graph "
        f"replays, weights cycled through > 2x L2 ({torch.cuda.get_device_properties(0).L2_cache_size >> 20} MiB).",
        "## OutlierSplitGemm vs torch.matmul fp16 (cuBLAS)",
        table(["K x N", "rows", "weights", "ours us", "ours GB/s", "ours / copy", "cuBLAS us", "cuBLAS GB/s",
               "cuBLAS / copy", "speedup"], gemm_rows),
        "## SparseSkipMLP (1 token, ~50% of neurons kept) vs dense fp16 MLP (torch)",
        table(["H x I", "method", "weights", "ours us", "dense us", "speedup"], mlp_rows),
    ])
    print(report)
    if args.output:
        args.output.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
