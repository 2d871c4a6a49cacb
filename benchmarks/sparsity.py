"""Sparse-skip MLPs on the sample model: the sparsity-accuracy curve of both methods, and decode speed.

Accuracy: for each method (threshold, predictor) and sparsity (0/25/40/50/60/70%), ``accullm-export sparsify``
on our fp32 export, then the kit's ``validate`` against that export on held-out Wikipedia text (ORT basic; KL,
top-1, Δppl, greedy prefix), all with the same settings. Sparsity 0 is the dense export itself.

Speed: batch-1 greedy decode tokens/s with ONNX Runtime on CPU (ORT_ENABLE_ALL), dense against 50% sparse,
with and without w4a16 (the peers table's flags), all models loaded and timed in interleaved rounds (median).
The guesser's cost is inside the sparse graphs' times.

Ceiling: the most any sparse-skip kernel could give on this model and machine. ONNX Runtime's profiler times the
decode steps of each dense model per node; the MLPs' nodes (found by structure, then by their name prefix in the
optimized graph) and their down projections' are summed. Skipping a fraction s of them for free shortens a step
by s times their time (threshold: the down projection only; predictor: the whole MLP, plus the guesser's own
kernel time, profiled in the predictor model). Ceiling = step / (step - s * skippable + guesser).

Outputs under --out: sparsity.md, sparsity.json, sparsity_curve.png, the models under work/. It measures; it
never asserts on a time. Run from the repository root (about 45 minutes on a 2-core machine)::

    .venv/bin/python benchmarks/sparsity.py --reference bench_out/peers5/work/ours-fp32 \
        --profile bench_out/peers5/work/profile --out bench_out/sparsity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peers  # benchmarks/ is on sys.path when a script here runs: its decode timing and prompt
import profile_decode  # noqa: E402  per-node decode profiles

log = logging.getLogger("sparsity")
LEVELS = (0.25, 0.40, 0.50, 0.60, 0.70)
METHODS = ("threshold", "predictor")
SPEED_SPARSITY = 0.5


def cli(*arguments: str, log_path: Path) -> None:
    command = [str(Path(sys.executable).parent / "accullm-export"), *arguments]
    with open(log_path, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed; see {log_path}")


def build(name: str, arguments: tuple[str, ...], work: Path, reuse: bool) -> tuple[Path, float | None]:
    folder = work / name
    if reuse and (folder / "manifest.json").is_file():
        return folder, None
    started = time.perf_counter()
    cli(*arguments, "-o", str(folder), "--overwrite", log_path=work / f"{name}.log")
    return folder, time.perf_counter() - started


def sparsify_args(reference: Path, profile: Path, method: str, sparsity: float) -> tuple[str, ...]:
    return ("sparsify", str(reference), "--profile", str(profile), "--method", method, "--sparsity", str(sparsity))


def validate(reference: Path, candidate: Path, args, text: str = "wiki:evaluation") -> dict:
    from accullm_export.validate.llm import LLMValidationConfig
    from accullm_export.validate.pipeline import ValidateOptions, validate as run_validate

    config = LLMValidationConfig(text=text, windows=args.windows, seq_len=args.seq_len, num_prompts=args.prompts,
                                 new_tokens=args.new_tokens, probes_per_task=0, optimization="basic")
    report = run_validate(reference, candidate, ValidateOptions(llm=config))
    greedy = report["greedy"]
    return {"metrics": report["metrics"], "greedy_prefix": greedy["mean_prefix"]}


def decode_speed(models: dict[str, Path], reference: Path, rounds: int) -> tuple[dict[str, list[float]], float]:
    """The peers table's decode timing (same prompt, interleaved rounds, CPU share of other processes)."""
    rows = [peers.Row(name=name, label=name, folder=str(folder)) for name, folder in models.items()]
    others = peers.measure_decode(rows, peers.decode_prompt(reference),
                                  dataclasses.replace(peers.FULL, speed_rounds=rounds))
    failed = [f"{row.name}: {row.error}" for row in rows if row.status != "ok"]
    if failed:
        raise RuntimeError("decode timing failed for " + "; ".join(failed))
    return {row.name: row.decode_samples for row in rows}, others


def mlp_prefixes(folder: Path) -> list[tuple[str, str]]:
    """(MLP name prefix, down-projection name prefix) of every SwiGLU MLP of a model, found by structure.

    The prefixes match the optimized graph's nodes too: ONNX Runtime names a fused node after one it replaced."""
    from accullm_export.graph.ir import load_graph
    from accullm_export.sparsity.mlp import find_mlp_blocks

    blocks = find_mlp_blocks(load_graph(folder / "model.onnx")[0])
    if not blocks:
        raise RuntimeError(f"{folder} has no SwiGLU MLP to measure")
    pairs = []
    for block in blocks:
        down = block.down.name.rsplit("/", 1)[0]
        pairs.append((block.name, down if down.startswith(block.name + "/") else block.down.name))
    return pairs


def step_shares(node_us: dict[str, float], prefixes: list[tuple[str, str]]) -> dict[str, float]:
    """Kernel time per decode step in the MLPs, in their down projections and in the guessers (us)."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + "/")

    totals = {"mlp_us": 0.0, "down_us": 0.0, "guesser_us": 0.0}
    for name, us in node_us.items():
        for mlp, down in prefixes:
            if under(name, mlp):
                totals["mlp_us"] += us
                totals["down_us"] += us if under(name, down) else 0.0
                totals["guesser_us"] += us if name.startswith(f"{mlp}/sparse/guess") else 0.0
                break
    return totals


def ceiling(step_us: float, skippable_us: float, sparsity: float, added_us: float = 0.0) -> float:
    """Speedup of a step if ``sparsity`` of ``skippable_us`` cost nothing and ``added_us`` were added."""
    return step_us / (step_us - sparsity * skippable_us + added_us)


def speed_ceilings(models: dict[str, Path], steps: int, prompt: list[int]) -> dict[str, dict]:
    """Profile each dense model (and its predictor model for the guesser's time); the ceilings at 50%."""
    import tempfile

    percent = int(100 * SPEED_SPARSITY)
    found = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dense in ("fp32", "w4a16"):
            if dense not in models:
                continue
            prefixes = mlp_prefixes(models[dense])  # the sparse models keep the dense model's node names
            profile = profile_decode.profile_folder(models[dense], prompt, steps, Path(scratch))
            shares = step_shares(profile["node_us"], prefixes)
            predictor = models[f"{dense}+predictor-{percent}"]
            guesser = step_shares(profile_decode.profile_folder(predictor, prompt, steps, Path(scratch))["node_us"],
                                  prefixes)["guesser_us"]
            run = profile["run_us"]
            found[dense] = {"step_us": run, **shares, "guesser_us": guesser,
                            "threshold": ceiling(run, shares["down_us"], SPEED_SPARSITY),
                            "predictor": ceiling(run, shares["mlp_us"], SPEED_SPARSITY, guesser)}
    return found


def render(results: dict, speed: dict, others: float | None, args, ceilings: dict | None = None) -> str:
    lines = ["# Sparse-skip MLPs on SmolLM2-135M", "",
             f"Accuracy against our fp32 export: {args.windows} held-out windows x {args.seq_len} tokens, "
             f"{args.prompts} prompts x {args.new_tokens} greedy tokens, ONNX Runtime basic.", "",
             "| method | sparsity | Δppl % | KL mean | top-1 | greedy prefix | guesser recall | precision | "
             "guesser FLOPs % of MLP |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for key, entry in results.items():
        metrics, guesser = entry["metrics"], entry.get("predictor") or {}
        lines.append(f"| {entry['method']} | {entry['sparsity']:.2f} | {metrics['ppl_delta_pct']:+.2f} | "
                     f"{metrics['kl_mean']:.4g} | {metrics['top1_agreement']:.3f} | {entry['greedy_prefix']:.1f} | "
                     f"{guesser.get('recall', '—')} | {guesser.get('precision', '—')} | "
                     f"{guesser.get('flops_percent_of_mlp', '—')} |")
    if speed:
        lines += ["", f"Decode tokens/s at batch 1 ({peers.FULL.decode_tokens} tokens after a "
                      f"{peers.DECODE_PROMPT_TOKENS}-token "
                      f"prompt), ORT all, {args.rounds} interleaved rounds, median; other processes took "
                      f"{'n/a' if others is None else f'{100 * others:.0f}%'} of the CPUs meanwhile.", "",
                  "| model | tok/s | ratio to its dense model |", "|---|--:|--:|"]
        for name, samples in speed.items():
            dense = "w4a16" if name.startswith("w4a16") else "fp32"
            ratio = statistics.median(samples) / statistics.median(speed[dense])
            lines.append(f"| {name} | {statistics.median(samples):.1f} | {ratio:.2f}x |")
    if ceilings:
        percent = int(100 * SPEED_SPARSITY)
        lines += ["", f"Ceiling at {percent}%: the dense step (profiled, {args.profile_steps} decode steps, ORT all) "
                      "if the skipped share of the MLPs cost nothing; the guesser's profiled time added.", "",
                  "| dense model | step ms | MLP % of step | down proj % | guesser % | "
                  f"threshold-{percent} ceiling | predictor-{percent} ceiling |", "|---|--:|--:|--:|--:|--:|--:|"]
        for name, entry in ceilings.items():
            step = entry["step_us"]
            lines.append(f"| {name} | {step / 1000:.2f} | {100 * entry['mlp_us'] / step:.1f} | "
                         f"{100 * entry['down_us'] / step:.1f} | {100 * entry['guesser_us'] / step:.1f} | "
                         f"{entry['threshold']:.2f}x | {entry['predictor']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        points = sorted((e["sparsity"], e["metrics"]) for e in results.values() if e["method"] in (method, "dense"))
        x = [100 * s for s, _ in points]
        axes[0].plot(x, [m["ppl_delta_pct"] for _, m in points], marker="o", label=method)
        axes[1].plot(x, [100 * m["top1_agreement"] for _, m in points], marker="o", label=method)
    axes[0].set(xlabel="MLP sparsity %", ylabel="Δ perplexity %", yscale="symlog", title="Perplexity change")
    axes[1].set(xlabel="MLP sparsity %", ylabel="top-1 agreement %", title="Next-token agreement with fp32")
    for axis in axes:
        axis.axvline(40, color="grey", linestyle=":")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="our fp32 export")
    parser.add_argument("--profile", type=Path, required=True, help="its calibration profile")
    parser.add_argument("--out", type=Path, default=Path("bench_out/sparsity"))
    parser.add_argument("--reuse", action="store_true", help="keep models already built under --out/work")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-timing", action="store_true",
                        help="build the speed models and profile the ceilings, but do not time decoding")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=32, help="decode steps profiled for the ceiling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "sparsity.json"
    record = json.loads(record_path.read_text()) if args.reuse and record_path.is_file() else {}
    results = record.get("accuracy", {})
    if not args.skip_accuracy:
        results["dense"] = {"method": "dense", "sparsity": 0.0, **validate(args.reference, args.reference, args)}
        for method in METHODS:
            for level in LEVELS:
                name = f"{method}-{int(round(100 * level))}"
                folder, seconds = build(name, sparsify_args(args.reference, args.profile, method, level), work,
                                        args.reuse)
                manifest = json.loads((folder / "manifest.json").read_text())
                results[name] = {"method": method, "sparsity": level, "build_seconds": seconds,
                                 "predictor": manifest["sparsity"].get("predictor"),
                                 **validate(args.reference, folder, args)}
                log.info("%s: %s", name, results[name]["metrics"])
                record_path.write_text(json.dumps({**record, "accuracy": results}, indent=2))  # survive a crash
        plot(results, args.out / "sparsity_curve.png")
    speed, others, ceilings = record.get("speed", {}), record.get("others_share"), record.get("ceilings")
    if not args.skip_speed:
        percent = int(100 * SPEED_SPARSITY)
        models = {"fp32": args.reference}
        for method in METHODS:
            models[f"fp32+{method}-{percent}"] = build(f"{method}-{percent}", sparsify_args(
                args.reference, args.profile, method, SPEED_SPARSITY), work, True)[0]
        base = ("quantize", str(args.reference), "--profile", str(args.profile), *peers.OURS_W4A16)
        models["w4a16"] = build("w4a16", base, work, args.reuse)[0]
        for method in METHODS:
            models[f"w4a16+{method}-{percent}"] = build(f"w4a16-{method}-{percent}", base + (
                "--sparsity", str(SPEED_SPARSITY), "--method", method), work, args.reuse)[0]
        if not args.skip_timing:
            speed, others = decode_speed(models, args.reference, args.rounds)
            record_path.write_text(json.dumps({**record, "accuracy": results, "speed": speed,
                                               "others_share": others}, indent=2))  # survive a crash
        ceilings = speed_ceilings(models, args.profile_steps, peers.decode_prompt(args.reference))
    record = {"accuracy": results, "speed": speed, "others_share": others, "ceilings": ceilings}
    record_path.write_text(json.dumps(record, indent=2))
    (args.out / "sparsity.md").write_text(render(results, speed, others, args, ceilings))
    print((args.out / "sparsity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
