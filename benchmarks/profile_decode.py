"""Where a decode step's time goes, per op type, for model folders side by side (ONNX Runtime's profiler).

    python benchmarks/profile_decode.py FOLDER [FOLDER ...] [--steps 64] [--out table.md]

Each folder decodes ``--steps`` greedy tokens at batch 1 after the peers table's 32-token prompt (taken from the
first folder's tokenizer), ONNX Runtime optimization ``all``, with ONNX Runtime's per-node profiling on. The
prefill run is left out; for the decode steps the table gives the mean time of a run (``model_run``), the sum of
its node kernels, the nodes executed per step, and the op types that took the most kernel time. The difference
between a run and its kernels is the per-node dispatch and the session's own work. Profiling slows every node
down a little, so compare folders within one table, and time speed with ``compare_decode.py``. A benchmark: it
measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders (model.onnx inside)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled (default 64)")
    parser.add_argument("--top", type=int, default=8, help="op types listed per folder (default 8)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return parser.parse_args(argv)


def profile_folder(folder: Path, prompt: list[int], steps: int, scratch: Path) -> dict:
    """Mean per decode step: run time, kernel time, nodes, and kernel time by op type (microseconds)."""
    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    runner = OrtCausalLM.from_path(folder, device="cpu", optimization="all",
                                   profile_prefix=str(scratch / folder.name))
    generate(runner, [prompt], GenerationConfig(max_new_tokens=steps + 1))
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    return summarize(events)


def summarize(events: list[dict]) -> dict:
    """The decode steps of one profile: every ``model_run`` after the first (the prefill)."""
    runs = [event for event in events if event.get("name") == "model_run"]
    if len(runs) < 2:
        raise ValueError("the profile holds no decode step")
    start, count = runs[1]["ts"], len(runs) - 1
    by_op, nodes = collections.Counter(), 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            by_op[event["args"].get("op_name", "?")] += event["dur"]
            nodes += 1
    return {"run_us": sum(run["dur"] for run in runs[1:]) / count, "kernel_us": sum(by_op.values()) / count,
            "nodes": nodes / count, "ops": {op: total / count for op, total in by_op.most_common()}}


def table(results: dict[str, dict], top: int) -> str:
    lines = ["| folder | ms per step | kernels ms | nodes per step | op types by kernel time (us per step) |",
             "|---|--:|--:|--:|---|"]
    for name, result in results.items():
        ops = ", ".join(f"{op} {us:.0f}" for op, us in list(result["ops"].items())[:top])
        lines.append(f"| {name} | {result['run_us'] / 1000:.2f} | {result['kernel_us'] / 1000:.2f} | "
                     f"{result['nodes']:.0f} | {ops} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [str(folder) for folder in args.folders if not (folder / "model.onnx").is_file()]
    if missing or args.steps < 1:
        print(f"profile_decode.py: {'no model.onnx in ' + ', '.join(missing) if missing else '--steps must be >= 1'}",
              file=sys.stderr)
        return 2
    prompt = peers.decode_prompt(args.folders[0])
    with tempfile.TemporaryDirectory() as scratch:
        results = {str(folder): profile_folder(folder, prompt, args.steps, Path(scratch)) for folder in args.folders}
    report = table(results, args.top) + f"\n\n{args.steps} decode steps each, ONNX Runtime all, profiling on"
    peers.print_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
