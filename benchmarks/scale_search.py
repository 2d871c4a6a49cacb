"""What the INT4 scale searches cost: ``weights.scale_search``'s asymmetric grid (the ONNX Runtime form of
w4a16) and its symmetric grid (the TensorRT form), on the sample's own weights, against another checkout of the
package (``--against``: a folder holding an ``accullm_export`` package, e.g. an older commit's ``git archive``).

Each side runs in its own Python process, one layer shape at a time (a q/o projection, gate/up, down and the LM
head of the fp32 export, each with the same importance weights), in interleaved rounds so that load from other
processes falls on both alike. The table gives each side's median seconds per search, their ratio, and whether
the two sides returned the same grids bit for bit.

    PYTHONPATH=. .venv/bin/python benchmarks/scale_search.py bench_out/presets/work/ours-fp32 --against /tmp/old

A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": "/model/layers.0/self_attn/q_proj", "up_proj": "/model/layers.0/mlp/up_proj",
          "down_proj": "/model/layers.0/mlp/down_proj", "lm_head": "/lm_head"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an fp32 export folder (its model.onnx)")
    parser.add_argument("--against", type=Path, required=True, help="a folder holding the accullm_export to compare")
    parser.add_argument("--block-size", type=int, default=64, help="INT4 block size (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/scale_search"), help="output folder")
    parser.add_argument("--worker", nargs=3, metavar=("WEIGHTS", "SEARCH", "BLOCK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(weights: Path, search: str, block: int) -> None:
    """Run in a child process: one search on one weight, its seconds and the grid's digest on stdout."""
    from accullm_export.quant.asymmetric import asymmetric_grid
    from accullm_export.quant.symmetric import searched_scales

    data = np.load(weights)
    weight, importance = data["weight"], data["importance"]
    started = time.perf_counter()
    if search == "asymmetric":
        grid = asymmetric_grid(weight, block, search=True, importance=importance)
    else:
        grid = (searched_scales(weight, 4, block, importance=importance),)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(part).tobytes() for part in grid)).hexdigest()
    print(json.dumps({"seconds": seconds, "digest": digest}))


def layer_weights(model: Path, out: Path) -> dict[str, Path]:
    """Each shape's weight from the export ([in, out], as the graph's MatMul reads it), saved for the workers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model / "model.onnx")).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    paths, rng = {}, np.random.default_rng(0)
    for label, prefix in SHAPES.items():
        node = next(node for node in graph.node if node.op_type == "MatMul" and node.name == f"{prefix}/MatMul")
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        paths[label] = out / f"{label}.npz"
        np.savez(paths[label], weight=weight, importance=rng.uniform(0.1, 3.0, size=weight.shape[0]))
    return paths


def run_side(package: Path, weights: Path, search: str, block: int) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(package)}
    result = subprocess.run([sys.executable, __file__, "x", "--against", "x", "--worker", str(weights), search,
                             str(block)], env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], int(args.worker[2]))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    paths = layer_weights(args.model, args.out)
    sides = {"this": ROOT, "against": args.against.resolve()}
    rows = []
    for search in ("asymmetric", "symmetric"):
        for label, path in paths.items():
            seconds = {side: [] for side in sides}
            digests = {side: set() for side in sides}
            for _ in range(args.rounds):
                for side, package in sides.items():
                    result = run_side(package, path, search, args.block_size)
                    seconds[side].append(result["seconds"])
                    digests[side].add(result["digest"])
            this, against = (statistics.median(seconds[side]) for side in sides)
            rows.append((search, label, against, this, this / against, digests["this"] == digests["against"]))
            print(f"{search:10s} {label:9s} against {against:7.2f} s  this {this:7.2f} s  "
                  f"{this / against:.2f}x  same grid: {rows[-1][-1]}", flush=True)
    lines = ["| search | layer | against (s) | this (s) | ratio | same grid |", "|---|---|--:|--:|--:|---|"]
    lines += [f"| {s} | {l} | {a:.2f} | {t:.2f} | {r:.2f}x | {'yes' if same else 'NO'} |"
              for s, l, a, t, r, same in rows]
    (args.out / "scale_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
