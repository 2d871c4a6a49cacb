"""Time and peak memory of calibrating the sample model, against the goal: 128 x 512 tokens in under 3 minutes.

Runs ``accullm-export calibrate`` on our fp32 export of SmolLM2-135M as a child process and reports its wall
time and peak RSS (os.wait4, the child alone) next to the goals: under 3 minutes, and peak memory under twice
the model size plus 2 GB. Writes ``calibrate_speed.md`` and ``calibrate_speed.json``; never asserts.

    .venv/bin/python benchmarks/calibrate_speed.py [--samples 128] [--seq-len 512] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from decode_speed import model_bytes, run_with_peak_rss  # benchmarks/ is on sys.path when run as a script

GOAL_SECONDS = 180


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    work = args.out / "calibrate_speed_work"
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "accullm_export.cli.main"]
    model = work / "smollm2_fp32"
    if not (model / "model.onnx").is_file():
        run_with_peak_rss(cli + ["export", "smollm2-135m", "-o", str(model)], work / "export.log")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    peak = run_with_peak_rss(cli + ["calibrate", str(model), "-o", str(work / "profile"), "--overwrite",
                                    "--samples", str(args.samples), "--seq-len", str(args.seq_len)],
                             work / "calibrate.log")
    seconds = time.perf_counter() - started
    size = model_bytes(model)
    result = {"samples": args.samples, "seq_len": args.seq_len, "tokens": args.samples * args.seq_len,
              "seconds": seconds, "goal_seconds": GOAL_SECONDS, "peak_rss_bytes": peak, "model_bytes": size,
              "memory_goal_bytes": 2 * size + (2 << 30), "load_average_before": load, "cpus": os.cpu_count()}
    lines = [
        f"# Calibration speed: SmolLM2-135M fp32, {args.samples} x {args.seq_len} tokens, {os.cpu_count()} CPUs",
        "",
        "| figure | measured | goal | met |",
        "|---|---:|---:|---|",
        f"| wall time | {seconds:.1f} s | < {GOAL_SECONDS} s | {'yes' if seconds < GOAL_SECONDS else 'no'} |",
        f"| peak RSS | {peak / 2**20:.0f} MiB | < {result['memory_goal_bytes'] / 2**20:.0f} MiB (2x model + 2 GiB) | "
        f"{'yes' if peak < result['memory_goal_bytes'] else 'no'} |",
        "",
        f"Model {size / 2**20:.0f} MiB; load average before the run {load:.2f} (other work on the machine slows it).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibrate_speed.md").write_text("\n".join(lines) + "\n")
    (args.out / "calibrate_speed.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
