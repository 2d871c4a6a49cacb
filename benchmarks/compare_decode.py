"""Decode tokens/s of any model folders side by side: all loaded at once, interleaved rounds, medians, ratios.

    python benchmarks/compare_decode.py BASELINE FOLDER [FOLDER ...] [--rounds 9] [--out table.md]

The peers table's timing (``peers.measure_decode``: batch 1, greedy, 64 steps after a 32-token prompt taken from
the baseline's tokenizer, ONNX Runtime optimization ``all``) for folders built any way, e.g. two flag sets of
``quantize`` and an onnxruntime-genai build, so that a change's speed cost is measured in one run on one machine.
Ratios are to the first folder, two ways: the ratio of the medians, and the median (with the lowest and highest)
of the per-round ratios, each round timing every folder back to back, so that a slow spell of the machine
affects both sides of a ratio alike. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved decode rounds (default 9)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def paired_ratios(samples: list[float], baseline_samples: list[float]) -> list[float]:
    """Round by round, a folder's tokens/s over the baseline's (sample i of each was timed in round i)."""
    if len(samples) != len(baseline_samples) or not samples:
        raise ValueError(f"{len(samples)} samples against {len(baseline_samples)} of the baseline")
    return [sample / base for sample, base in zip(samples, baseline_samples)]


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [str(folder) for folder in args.folders if not (folder / "model.onnx").is_file()]
    if missing:
        print(f"compare_decode.py: no model.onnx in {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("compare_decode.py: --rounds must be at least 1", file=sys.stderr)
        return 2
    rows = [peers.Row(name=folder.name, label=str(folder), folder=str(folder)) for folder in args.folders]
    settings = dataclasses.replace(peers.FULL, speed_rounds=args.rounds)
    others = peers.measure_decode(rows, peers.decode_prompt(args.folders[0]), settings)
    baseline = rows[0].decode_tokens_per_second
    lines = ["| folder | decode tok/s | ratio of medians | per-round ratio: median (lowest-highest) |",
             "|---|--:|--:|--:|"]
    for row in rows:
        speed = row.decode_tokens_per_second
        if not (speed and baseline):
            lines.append(f"| {row.label} | failed: {row.error} | — | — |")
            continue
        ratios = paired_ratios(row.decode_samples, rows[0].decode_samples)
        lines.append(f"| {row.label} | {speed:.1f} | {speed / baseline:.2f}x | "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    lines.append(f"\nmedian of {args.rounds} interleaved rounds; other processes took "
                 f"{'unknown' if others is None else f'{others:.0%}'} of the CPU time meanwhile")
    report = "\n".join(lines)
    peers.print_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
