"""How the distillation's learning rate and schedule play out on one model: the held-out KL the pass judges by,
along the way, and the perplexity and KL on the evaluation text at the end, for several schedules trained from
the same starting point.

The starting point is what ``build MODEL --target cpu`` hands the ``distill_scales`` pass: the build runs once
(calibrate, GPTQ and the passes before distillation) and the pass's inputs (the teacher's final hidden states
and head, the student's weights and low-bit layers, the calibration windows) are saved to
``--out``/capture.pkl; later runs reuse that file. Each schedule then trains the torch student as the pass
does (``training.distill``: Adam on log-scales, norm gains at half the rate, FP16 outlier rows at a tenth, one
window a step, the last eighth of the windows held out), with a linear warm-up of ``warmup`` steps before the
cosine decay where asked for.

The evaluation runs the torch replicas, not the written ONNX model: the passes after distillation (8-bit scale
codes, planes, the head's refined rows) are not applied, so its figures compare schedules with each other and
not with ``validate``'s. It reads ``--eval-windows`` windows of 256 tokens of the validation text
(``wiki:evaluation``, as ``validate`` picks them) through the source model and the student.

    .venv/bin/python benchmarks/distill_schedule.py out/smollm2-135m --out bench_out/distill_sample \\
        --run lr=1e-3,steps=120 --run lr=3e-4,steps=120 --eval-windows 32

``--time-steps N`` times N training steps from the same start in float32 and in bfloat16 products
(``distill.precision``), alternated, and writes their medians and ratio:

    .venv/bin/python benchmarks/distill_schedule.py out/smollm2-135m --out bench_out/distill_sample --time-steps 4

A benchmark: it measures, it asserts nothing. Outputs: ``--out``/distill_schedule.md and .json (each run
adds its rows to the JSON and rewrites the table from it), distill_step_time.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEDULE_KEYS = {"lr": float, "steps": int, "warmup": int, "every": int, "seed": int, "precision": str}


def parse_run(text: str) -> dict:
    """'lr=1e-3,steps=120,warmup=20' -> {'lr': 0.001, 'steps': 120, 'warmup': 20, 'every': 30, 'seed': 0,
    'precision': 'float32'}."""
    run = {"lr": 1e-3, "steps": 120, "warmup": 0, "every": 30, "seed": 0, "precision": "float32"}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in SCHEDULE_KEYS:
            raise SystemExit(f"--run: unknown key {key!r} (known: {', '.join(SCHEDULE_KEYS)})")
        run[key] = SCHEDULE_KEYS[key](value)
    return run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported fp32 folder (accullm-export export)")
    parser.add_argument("--out", required=True, help="folder for capture.pkl and the results")
    parser.add_argument("--run", action="append", type=parse_run, default=[],
                        help="a schedule, e.g. lr=1e-3,steps=120,warmup=0,every=30,precision=bfloat16 (repeatable)")
    parser.add_argument("--time-steps", type=int, default=0, metavar="N",
                        help="time N training steps in each product precision, interleaved, from the captured start")
    parser.add_argument("--eval-windows", type=int, default=32, help="validation windows of 256 tokens (0: none)")
    return parser.parse_args(argv)


def capture(model: Path, out: Path) -> Path:
    """The distill_scales pass's inputs from ``build MODEL --target cpu``, saved once to out/capture.pkl."""
    path = out / "capture.pkl"
    if path.is_file():
        return path
    import accullm_export.graph.passes.distill_scales as distill_pass
    from accullm_export.cli.main import main as cli_main

    class Captured(Exception):
        pass

    def save(config_dir, teacher, student_weights, layers, windows, config):
        state = {"config_dir": str(config_dir), "hidden": teacher.hidden.cpu().numpy(),
                 "head": teacher.head.cpu().numpy(), "softcap": teacher.softcap,
                 "student": {name: np.asarray(value) for name, value in student_weights.items()},
                 "layers": list(layers), "windows": np.asarray(windows)}
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as handle:
            pickle.dump(state, handle, protocol=5)
        partial.rename(path)
        raise Captured

    distill_pass.distill_scales = save
    try:
        cli_main(["build", str(model), "--target", "cpu", "-o", str(out / "build"), "--overwrite"])
    except Captured:
        return path
    raise SystemExit("the build finished without reaching the distillation pass: its recipe does not distil")


def evaluation(state: dict, windows: int):
    """The validation windows and the source model's logits on them."""
    import torch

    from accullm_export.data.text import load_text_source, token_windows
    from accullm_export.graph.ir import load_graph
    from accullm_export.graph.passes.distill_scales import graph_weights
    from accullm_export.runtime.tokenizer import FolderTokenizer
    from accullm_export.training.distill import build_replica

    tokenizer = FolderTokenizer(state["config_dir"])
    source = load_text_source("wiki:evaluation")
    tokens = token_windows(source.documents, tokenizer.encode, num_windows=windows, seq_len=256, seed=0,
                           separator_ids=tokenizer.eos_token_ids[:1])
    tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    graph, _ = load_graph(Path(state["config_dir"]) / "model.onnx")
    reference = build_replica(state["config_dir"], graph_weights(graph), share_memory=True)
    with torch.no_grad():
        logits = [reference(window[None]).logits.numpy() for window in tokens]
    return tokens, logits


def metrics(student, tokens, reference_logits) -> dict:
    import torch

    from accullm_export.validate.metrics import TokenStatistics

    statistics = TokenStatistics()
    with torch.no_grad():
        for window, reference in zip(tokens, reference_logits):
            statistics.add(reference, student(window[None]).logits.numpy(), window[None].numpy())
    summary = statistics.summary()
    return {"ppl_delta_pct": round(summary["ppl_delta_pct"], 3), "kl": round(summary["kl_mean"], 5),
            "top1": round(summary["top1_agreement"], 4)}


def student_and_teacher(state: dict, config):
    """The captured start as the pass trains it: (teacher, student, its low-bit modules, optimizer), the
    decoder layers recomputed in the backward pass where the pass would."""
    import torch

    from accullm_export.training.distill import (ACTIVATION_BUDGET_BYTES, Teacher, activation_bytes,
                                                 recompute_layers, student_replica, training_optimizer)

    teacher = Teacher(hidden=torch.from_numpy(state["hidden"]), head=torch.from_numpy(state["head"]),
                      softcap=state["softcap"])
    student, by_module = student_replica(state["config_dir"], state["student"], state["layers"], True)
    if activation_bytes(student.config, state["windows"].shape[1]) > ACTIVATION_BUDGET_BYTES:
        recompute_layers(student)
    optimizer, _ = training_optimizer(student, by_module, config)
    return teacher, student, by_module, optimizer


def train(state: dict, run: dict, tokens, reference_logits) -> dict:
    """One schedule from the captured start, as ``training.distill.distill_scales`` trains (its optimizer, with
    norms and outlier rows, one window a step, its product precision), its held-out KL every ``every`` steps."""
    import torch

    from accullm_export.resources import reused_allocations
    from accullm_export.training.distill import DistillConfig, held_out_count, kl_step, mean_kl, products_in

    config = DistillConfig(steps=run["steps"], learning_rate=run["lr"], seed=run["seed"], norms=True,
                           outlier_rows=True, precision=run["precision"])
    teacher, student, by_module, optimizer = student_and_teacher(state, config)

    def factor(step: int) -> float:
        if step < run["warmup"]:
            return (step + 1) / run["warmup"]
        return 0.5 * (1 + np.cos(np.pi * (step - run["warmup"]) / max(1, run["steps"] - run["warmup"])))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    windows = state["windows"]
    train_count = len(windows) - held_out_count(len(windows))
    window_tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    checked = range(train_count, len(windows))
    result = {"run": run, "before": metrics(student, tokens, reference_logits) if tokens is not None else None}
    started = time.perf_counter()
    with reused_allocations():
        trace = [(0, round(mean_kl(teacher, student, window_tokens, checked), 5))]
        order, pending = np.random.default_rng(run["seed"]).permutation, np.empty(0, dtype=np.int64)
        for step in range(run["steps"]):
            if pending.size < 1:
                pending = order(train_count)
            chosen, pending = pending[:1], pending[1:]
            optimizer.zero_grad(set_to_none=True)
            with products_in(student, by_module, config.precision):
                kl_step(teacher, student, window_tokens, chosen)
            optimizer.step()
            schedule.step()
            if (step + 1) % run["every"] == 0 or step + 1 == run["steps"]:
                trace.append((step + 1, round(mean_kl(teacher, student, window_tokens, checked), 5)))
                print(f"  step {step + 1}: held-out KL {trace[-1][1]}", flush=True)
    result |= {"held_out_kl": trace, "seconds": round(time.perf_counter() - started),
               "after": metrics(student, tokens, reference_logits) if tokens is not None else None}
    return result


def write_table(out: Path, rows: list[dict]) -> None:
    lines = ["| model | lr | steps | warm-up | products | held-out KL along the way | eval Δppl before -> after | "
             "eval KL before -> after | seconds |", "|---|--:|--:|--:|---|---|--:|--:|--:|"]
    for row in rows:
        run, before, after = row["run"], row["before"], row["after"]
        trace = ", ".join(f"{value} ({step})" for step, value in row["held_out_kl"])
        evaluated = (f"{before['ppl_delta_pct']:+.2f}% -> {after['ppl_delta_pct']:+.2f}%",
                     f"{before['kl']} -> {after['kl']}") if before else ("-", "-")
        lines.append(f"| {row['model']} | {run['lr']:g} | {run['steps']} | {run['warmup']} | "
                     f"{run.get('precision', 'float32')} | {trace} | "
                     f"{evaluated[0]} | {evaluated[1]} | {row['seconds']} |")
    (out / "distill_schedule.md").write_text("\n".join(lines) + "\n")


def time_steps(state: dict, count: int) -> dict:
    """Seconds of ``count`` training steps (loss and gradients, no update: each step starts from the same
    scales) in float32 and in bfloat16 products, alternated, on the captured start's windows in turn."""
    import torch

    from accullm_export.resources import reused_allocations
    from accullm_export.training.distill import DistillConfig, kl_step, products_in

    teacher, student, by_module, optimizer = student_and_teacher(state, DistillConfig(steps=1, norms=True,
                                                                                      outlier_rows=True))
    tokens = torch.from_numpy(np.asarray(state["windows"], dtype=np.int64))
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with reused_allocations():
        for step in range(count + 1):  # the first round warms the allocator and is not counted
            for precision, times in seconds.items():
                optimizer.zero_grad(set_to_none=True)
                started = time.perf_counter()
                with products_in(student, by_module, precision):
                    kl_step(teacher, student, tokens, [step % len(tokens)])
                if step:
                    times.append(time.perf_counter() - started)
    medians = {precision: float(np.median(times)) for precision, times in seconds.items()}
    return {"steps": count, "seconds": {key: [round(value, 4) for value in times] for key, times in seconds.items()},
            "median": {key: round(value, 4) for key, value in medians.items()},
            "ratio": round(medians["bfloat16"] / medians["float32"], 3), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(capture(Path(args.model), out), "rb") as handle:
        state = pickle.load(handle)
    if args.time_steps:
        timing = time_steps(state, args.time_steps) | {"model": str(args.model),
                                                       "date": datetime.date.today().isoformat()}
        (out / "distill_step_time.json").write_text(json.dumps(timing, indent=1))
        (out / "distill_step_time.md").write_text(
            "| model | steps | float32 s a step | bfloat16 s a step | ratio |\n|---|--:|--:|--:|--:|\n"
            f"| {args.model} | {args.time_steps} | {timing['median']['float32']} | {timing['median']['bfloat16']} | "
            f"{timing['ratio']}x |\n")
        print((out / "distill_step_time.md").read_text())
    if not args.run:
        return 0
    tokens, reference_logits = evaluation(state, args.eval_windows) if args.eval_windows else (None, None)
    results_path = out / "distill_schedule.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    for run in args.run:
        print(f"{args.model}: {run}", flush=True)
        row = train(state, run, tokens, reference_logits)
        row |= {"model": str(args.model), "date": datetime.date.today().isoformat(),
                "eval_windows": args.eval_windows}
        rows.append(row)
        results_path.write_text(json.dumps(rows, indent=1))
        write_table(out, rows)
    print((out / "distill_schedule.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
