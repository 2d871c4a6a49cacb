"""Probe: per-layer output error of GPTQ variants around the FP16 outlier rows, at ordinary tokens and at the
attention sink (position 0), for a few residual-reading layers of an exported model.

A research probe, not a kit feature. For each chosen layer it taps the layer's input on the profile's calibration
windows (the first ``--fit-windows`` fit, the next ``--eval-windows`` are scored), rounds the weight with the
kit's GPTQ (``quant.gptq``: act-order, searched asymmetric INT4 grid in blocks of ``--block-size``) under each
variant, and reports ||X (W - W_q) - b||^2 / ||X W||^2 over the scored windows, separately for positions >= 1
("tokens") and position 0 ("sink"):

* ``branch``: the profile's outlier channels (its ``--policy``) stay FP16 (``isolate_outliers``), H = E[x x^T]
  without the sink, as the kit's GPTQ computes it;
* ``nobranch``: no FP16 rows, the same H;
* ``nobranch-bias``: no FP16 rows, GPTQ on the covariance, and the bias b = E[x] (W - W_q);
* ``nobranch-bias-sinkW`` / ``branch-sinkW`` / ``branch-bias-sinkW``: the same plus the sink position's moment
  weighted W in GPTQ's objective, e.g. ``branch-sink0.2``.

    .venv/bin/python benchmarks/layer_error_probe.py FP32_DIR PROFILE_DIR --out bench_out/layer_error \\
        branch nobranch nobranch-bias nobranch-bias-sink0.2 branch-sink0.2 branch-bias-sink0.2

Writes layer_error.md under --out. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

VARIANT = re.compile(r"^(branch|nobranch)(-bias)?(-sink([0-9.]+))?$")
DEFAULT_LAYERS = [f"/model/layers.{i}/{part}/MatMul" for part in ("self_attn/q_proj", "mlp/gate_proj")
                  for i in (3, 12, 20, 27)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="the fp32 export folder")
    parser.add_argument("profile", type=Path, help="its calibration profile (64 windows or more)")
    parser.add_argument("variants", nargs="+", help="branch, nobranch, each with -bias and/or -sinkW")
    parser.add_argument("--out", type=Path, required=True, help="folder for layer_error.md")
    parser.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS, help="MatMul node names")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--policy", default="sensitivity", help="the profile's outlier policy for 'branch'")
    parser.add_argument("--fit-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args(argv)
    bad = [variant for variant in args.variants if not VARIANT.match(variant)]
    if bad:
        parser.error(f"unknown variant(s) {', '.join(bad)}: branch or nobranch, then -bias, then -sinkW")
    return args


def layer_errors(weight: np.ndarray, fit: list[np.ndarray], scored: np.ndarray, outliers: list[int], variant: str,
                 block_size: int) -> tuple[float, float]:
    """(relative error at positions >= 1, at position 0) of ``weight`` rounded under ``variant``."""
    from accullm_export.quant.gptq import gptq_grid, gptq_quantize
    from accullm_export.quant.symmetric import dequantize

    match = VARIANT.match(variant)
    branch, bias, sink_weight = match.group(1) == "branch", bool(match.group(2)), float(match.group(4) or 0)
    rows = np.concatenate([window[1:] for window in fit]).astype(np.float64)
    sinks = np.stack([window[0] for window in fit]).astype(np.float64)
    mean = rows.mean(axis=0) if bias else np.zeros(rows.shape[1])
    objective = (rows - mean).T @ (rows - mean) / len(rows)
    objective += sink_weight * (sinks - mean).T @ (sinks - mean) / len(sinks)
    exclude = outliers if branch else []
    grid = gptq_grid(weight, objective, 4, block_size, exclude=exclude, search=True, asymmetric=True)
    values, scales = gptq_quantize(weight, objective, 4, block_size, exclude=exclude, act_order=True, search=True,
                                   grid=grid)
    quantized = dequantize(values.astype(np.float32), scales, block_size).astype(np.float64)
    quantized[exclude] = weight[exclude]
    full = weight.astype(np.float64)
    offset = rows.mean(axis=0) @ (full - quantized) if bias else 0.0
    error = scored @ (full - quantized) - offset
    reference = scored @ full
    return (float((error[:, 1:] ** 2).sum() / (reference[:, 1:] ** 2).sum()),
            float((error[:, 0] ** 2).sum() / (reference[:, 0] ** 2).sum()))


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnx
    from onnx import numpy_helper

    from accullm_export.calibration.profile import load_profile
    from accullm_export.calibration.run import profile_feeds
    from accullm_export.runtime.intermediates import IntermediateReader

    model_path = args.reference / "model.onnx"
    profile = load_profile(args.profile, model_path)
    layers = {layer["node"]: layer for layer in profile.manifest["layers"]}
    missing = [name for name in args.layers if name not in layers]
    if missing:
        print(f"layer_error_probe.py: the profile has no layer {missing[0]}", file=sys.stderr)
        return 2
    windows = args.fit_windows + args.eval_windows
    feeds = profile_feeds(model_path, profile, windows)
    if len(feeds) < windows:
        print(f"layer_error_probe.py: the profile holds {len(feeds)} windows, {windows} needed", file=sys.stderr)
        return 2
    inputs = sorted({layers[name]["input"] for name in args.layers})
    tap = IntermediateReader(model_path, "basic").open(inputs)
    taps = {name: [] for name in inputs}
    for feed in feeds:
        values = tap.run(feed)
        for name in inputs:
            taps[name].append(np.asarray(values[name][0], dtype=np.float32))
    weights = {tensor.name: tensor for tensor in onnx.load(str(model_path)).graph.initializer}
    lines = ["| layer | " + " | ".join(f"{v}: tokens | sink" for v in args.variants) + " |",
             "|---|" + "--:|--:|" * len(args.variants)]
    for name in args.layers:
        layer = layers[name]
        weight = numpy_helper.to_array(weights[layer["weight"]]).astype(np.float32)
        fit = taps[layer["input"]][:args.fit_windows]
        scored = np.stack(taps[layer["input"]][args.fit_windows:]).astype(np.float64)
        cells = [layer_errors(weight, fit, scored, layer["candidates"][args.policy], variant, args.block_size)
                 for variant in args.variants]
        short = name.removeprefix("/model/").removesuffix("/MatMul")
        lines.append(f"| {short} | " + " | ".join(f"{tokens:.3g} | {sink:.3g}" for tokens, sink in cells) + " |")
    lines.append(f"\nrelative output error ||X (W - W_q) - b||^2 / ||X W||^2 on {args.eval_windows} windows after "
                 f"{args.fit_windows} fitting windows; block {args.block_size}, asymmetric INT4, searched grid, "
                 f"act-order GPTQ; FP16 rows: the profile's {args.policy!r} channels")
    args.out.mkdir(parents=True, exist_ok=True)
    peers.print_report("\n".join(lines), args.out / "layer_error.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
