"""Sparse-skip MLPs on the sample model: the sparsity-accuracy curve of both methods, and decode speed.

Accuracy: for each method (threshold, predictor) and sparsity (0/25/40/50/60/70%), ``accullm-export sparsify``
on our fp32 export, then the kit's ``validate`` against that export on held-out Wikipedia text (ORT basic; KL,
top-1, Δppl, greedy prefix), all with the same settings. Sparsity 0 is the dense export itself.

Speed: batch-1 greedy decode tokens/s with ONNX Runtime on CPU (ORT_ENABLE_ALL), dense against 50% sparse,
with and without w4a16 (the peers table's flags), all models loaded and timed in interleaved rounds (median).
The guesser's cost is inside the sparse graphs' times.

Ceiling: the most skipping neurons gives on this model and machine with ONNX Runtime's own kernels doing the
kept work, timed in the same rounds. The ceiling models are our fp32 export with every MLP physically narrowed
to the kept width (``ceiling_model``): the per-token selection ops stay, gathering the selected rows costs
nothing. They are also calibrated and quantized with the w4a16 row's flags, so each has a w4a16 ceiling too.

Outputs under --out: sparsity.md, sparsity.json, sparsity_curve.png, the models under work/. It measures; it
never asserts on a time. Run from the repository root::

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


def ceiling_model(reference: Path, out: Path, method: str, sparsity: float, rank: int) -> Path:
    """A copy of our fp32 export whose MLPs do what the sparse model does at decode when gathering the selected
    weight rows costs nothing: the same per-token selection ops, then MatMuls over weights that are
    physically ``1 - sparsity`` as wide (the first neurons: the numbers are meaningless, the work is exact).

    threshold: |a| > t, Where, then a Slice of the kept width into the narrowed down projection (gate and up
    dense). predictor: a random guesser of the same shape (x -> rank -> intermediate) whose score, cut to the kept
    width, masks the product of narrowed gate and up before the narrowed down projection.
    """
    import numpy as np
    import onnx_graphsurgeon as gs

    from accullm_export.atomic import atomic_dir
    from accullm_export.build.quantize import copy_side_files
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.mlp import find_mlp_blocks

    graph, source = load_graph(reference / "model.onnx")
    blocks = [block for block in find_mlp_blocks(graph) if block.plain and block.down_reader is block.down]
    if not blocks:
        raise RuntimeError(f"{reference} has no plain gated MLP to narrow")
    rng = np.random.default_rng(0)

    def node(op: str, inputs: list, name: str, dtype=np.float32, **attrs) -> gs.Variable:
        output = gs.Variable(f"{name}_output", dtype=dtype)
        graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[output]))
        return output

    for block in blocks:
        prefix, width = f"{block.name}/ceiling", block.intermediate_size
        kept = width - int(round(sparsity * width))
        product = block.product.outputs[0]
        down = block.down.inputs[1]
        block.down.inputs[1] = gs.Constant(f"{prefix}/down_weight", np.ascontiguousarray(down.values[:kept]))
        cut = [gs.Constant(f"{prefix}/{key}", np.array(value, np.int64))
               for key, value in (("start", [0]), ("end", [kept]), ("axis", [-1]))]
        zero = gs.Constant(f"{prefix}/zero", np.array(0.0, np.float32))
        if method == "threshold":
            keep = node("Greater", [node("Abs", [product], f"{prefix}/magnitude"),
                                    gs.Constant(f"{prefix}/level", np.array(1e-3, np.float32))], f"{prefix}/keep",
                        dtype=np.bool_)
            masked = node("Where", [keep, product, zero], f"{prefix}/masked")
            block.down.inputs[0] = node("Slice", [masked, *cut], f"{prefix}/selected")
            continue
        for projection in (block.gate, block.up):
            weight = projection.inputs[1]
            projection.inputs[1] = gs.Constant(f"{projection.name}/ceiling_weight",
                                               np.ascontiguousarray(weight.values[:, :kept]))
        for tensor in (block.gate.outputs[0], block.up.outputs[0],
                       *(node.outputs[0] for node in block.activation_nodes), product):
            tensor.shape = None
        hidden = block.hidden_size
        low = node("MatMul", [block.input, gs.Constant(f"{prefix}/down_rank", (rng.standard_normal(
            (hidden, rank)) / np.sqrt(hidden)).astype(np.float32))], f"{prefix}/guess_rank")
        score = node("MatMul", [low, gs.Constant(f"{prefix}/up_rank", (rng.standard_normal(
            (rank, width)) / np.sqrt(rank)).astype(np.float32))], f"{prefix}/guess")
        keep = node("Greater", [node("Slice", [score, *cut], f"{prefix}/guess_kept"),
                                gs.Constant(f"{prefix}/level", np.array(0.0, np.float32))], f"{prefix}/keep",
                    dtype=np.bool_)
        block.down.inputs[0] = node("Where", [keep, product, zero], f"{prefix}/masked")
    # a crash leaves no half-written folder to --reuse; kind None: the benchmark's own work folder
    with atomic_dir(out, overwrite=True, kind=None) as staging:
        save_graph(graph, source, staging / "model.onnx", {"accullm_export.ceiling": f"{method}:{sparsity}"})
        copy_side_files(reference, staging)
    return out


def ceiling_models(args, work: Path) -> dict[str, Path]:
    """The ceiling models at 50%, fp32 and (calibrated and quantized like the w4a16 row) w4a16."""
    percent, found = int(100 * SPEED_SPARSITY), {}
    profile = json.loads((args.profile / "manifest.json").read_text())["config"]
    if profile["source"].endswith(".py"):  # a profile is data: a script it names is never run from here
        raise SystemExit(f"sparsity.py: {args.profile} was calibrated with a script ({profile['source']}); the "
                         "ceiling models are calibrated like it only from text (wiki, .txt, .jsonl)")
    for method in METHODS:
        name = f"ceiling-{method}-{percent}"
        folder = work / name
        if not (args.reuse and (folder / "model.onnx").is_file()):
            ceiling_model(args.reference, folder, method, SPEED_SPARSITY, args.predictor_rank)
        found[f"fp32+{name}"] = folder
        calibrated = work / f"{name}-profile"
        if not (args.reuse and (calibrated / "manifest.json").is_file()):
            cli("calibrate", str(folder), "-o", str(calibrated), "--overwrite", "--calib", profile["source"],
                "--samples", str(profile["samples"]), "--seq-len", str(profile["seq_len"]),
                "--seed", str(profile["seed"]), log_path=work / f"{name}-profile.log")
        arguments = ("quantize", str(folder), "--profile", str(calibrated), "--preset", "w4a16-fast")
        found[f"w4a16+{name}"] = build(f"w4a16-{name}", arguments, work, args.reuse)[0]
    return found


def render(results: dict, speed: dict, others: float | None, args) -> str:
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
                        help="build the speed and ceiling models, but do not time decoding")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--predictor-rank", type=int, default=64, help="the guesser width in the ceiling model")
    parser.add_argument("--no-ceiling", action="store_true", help="leave out the ceiling models")
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
    speed, others = record.get("speed", {}), record.get("others_share")
    if not args.skip_speed:
        percent = int(100 * SPEED_SPARSITY)
        models = {"fp32": args.reference}
        for method in METHODS:
            models[f"fp32+{method}-{percent}"] = build(f"{method}-{percent}", sparsify_args(
                args.reference, args.profile, method, SPEED_SPARSITY), work, True)[0]
        base = ("quantize", str(args.reference), "--profile", str(args.profile), "--preset", "w4a16-fast")
        models["w4a16"] = build("w4a16", base, work, args.reuse)[0]
        for method in METHODS:
            models[f"w4a16+{method}-{percent}"] = build(f"w4a16-{method}-{percent}", base + (
                "--sparsity", str(SPEED_SPARSITY), "--method", method), work, args.reuse)[0]
        if not args.no_ceiling:
            models.update(ceiling_models(args, work))
        if not args.skip_timing:
            speed, others = decode_speed(models, args.reference, args.rounds)
    record = {"accuracy": results, "speed": speed, "others_share": others}
    record_path.write_text(json.dumps(record, indent=2))
    (args.out / "sparsity.md").write_text(render(results, speed, others, args))
    print((args.out / "sparsity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
