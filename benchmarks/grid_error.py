"""How much rounding error the asymmetric INT4 grid saves against the symmetric one, layer by layer.

    python benchmarks/grid_error.py MODEL_FOLDER PROFILE_DIR [--block-size 64] [--out table.md]

For every linear layer the profile lists, both grids are searched as ``weights.scale_search`` searches them
(``quant.symmetric.searched_scales`` and ``quant.asymmetric.asymmetric_grid``), with each input row's squared
error weighted by the profile's E[x^2] of that channel and the layer's ``sensitivity`` outlier channels left
out (they are FP16 rows). The table gives, per projection kind and in all, the ratio of the asymmetric grid's
weighted error to the symmetric grid's (below 1: the asymmetric grid is closer), and the spread over layers.
No GPTQ and no training: this isolates the grid. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an exported folder (model.onnx inside)")
    parser.add_argument("profile", type=Path, help="a calibrate output folder for that model")
    parser.add_argument("--block-size", type=int, default=64, help="INT4 rows per block (default 64)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def layer_errors(model: Path, profile: Path, block_size: int):
    """(layer node name, symmetric weighted error, asymmetric weighted error) for each profiled layer."""
    import onnx
    from onnx import numpy_helper

    from accullm_export.calibration.profile import load_profile
    from accullm_export.quant.asymmetric import quantize_asymmetric
    from accullm_export.quant.symmetric import dequantize, quantize

    loaded = load_profile(profile)
    graph = onnx.load(str(model / "model.onnx")).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    for layer in loaded.manifest["layers"]:
        if layer["weight"] not in weights:
            continue
        weight = numpy_helper.to_array(weights[layer["weight"]]).astype(np.float32)
        importance = loaded.arrays[f"{layer['input_index']}.second_moment"].astype(np.float64).copy()
        outliers = list(layer["candidates"].get("sensitivity", []))
        importance[outliers] = 0.0
        weight[outliers] = 0.0

        def error(dequantized):
            return float((importance[:, None] * (dequantized - weight) ** 2).sum())

        symmetric = dequantize(*quantize(weight, 4, block_size, search=True, importance=importance), block_size)
        values, scales, _ = quantize_asymmetric(weight, block_size, search=True, importance=importance)
        yield layer["node"], error(symmetric), error(dequantize(values, scales, block_size))


def kind_of(node: str) -> str:
    """q_proj, down_proj, lm_head ... from a layer's node name."""
    parts = node.strip("/").split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    by_kind: dict[str, list] = collections.defaultdict(list)
    for node, symmetric, asymmetric in layer_errors(args.model, args.profile, args.block_size):
        by_kind[kind_of(node)].append((symmetric, asymmetric))
        print(f"{node}: {asymmetric / symmetric:.3f}", file=sys.stderr, flush=True)
    everything = [pair for pairs in by_kind.values() for pair in pairs]
    lines = [f"Weighted rounding error, asymmetric / symmetric searched INT4 grid, block {args.block_size} "
             f"({args.model}, profile {args.profile})", "",
             "| layers | count | ratio of summed errors | per-layer ratio: median (lowest-highest) |",
             "|---|--:|--:|--:|"]
    for kind, pairs in sorted(by_kind.items()) + [("all", everything)]:
        ratios = sorted(a / s for s, a in pairs if s > 0)
        total = sum(a for _, a in pairs) / max(sum(s for s, _ in pairs), 1e-30)
        lines.append(f"| {kind} | {len(pairs)} | {total:.3f} | {np.median(ratios):.3f} "
                     f"({ratios[0]:.3f}-{ratios[-1]:.3f}) |")
    peers.print_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
