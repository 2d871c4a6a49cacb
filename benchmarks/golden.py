"""Golden mode's speed and exactness: the verifier alone, golden mode with each verifier, the w8 verifier alone.

    .venv/bin/python benchmarks/golden.py [BUILD] [--out bench_out/golden_bench] [--rounds 3] [--quick]

BUILD is the output folder of ``accullm-export build MODEL --target cpu --golden`` (the reference verifier); by
default ``bench_out/golden``, built from the sample (``smollm2-135m``) when it is missing and reused when present.
The w8 verifier of the same draft is written beside it once (``BUILD/golden-w8``: a copy of the draft and
``build.golden.write_w8_verifier`` against the reference), so both pairs share one draft.

Four rows, every model loaded once, timed in interleaved rounds (each round runs every prompt through every row,
the rows' order rotating from round to round), batch 1, greedy, a fixed number of new tokens (no EOS stop), the
prompts slices of held-out Wikipedia articles (``wiki:evaluation``; every article's opening first):

* ``reference``: the verifier alone (``generate``), the baseline of every ratio;
* ``golden reference``: ``speculative_generate(draft, reference)``, the draft tokens per pass adapting;
* ``golden w8``: ``speculative_generate(draft, w8 verifier)``;
* ``w8``: the w8 verifier alone.

Per row: decode tokens/s (tokens after the first over decode time, all prompts of a round together; the median
over rounds), its ratio to the reference alone (the median of the per-round ratios), and for the golden rows the
acceptance rate and tokens per verifier pass. Exactness, from the first round: each golden output against its
verifier's own greedy output, the mismatches counted, and for each the verifier's and the draft's top-2 margin
where they part (``first_divergence``). Writes ``golden.md`` and ``golden.json`` (every sample) under ``--out``.
A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_meter import CpuMeter  # noqa: E402

ROWS = ("reference", "golden reference", "golden w8", "w8")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", nargs="?", type=Path, default=Path("bench_out/golden"),
                        help="output folder of `build --golden` (default: bench_out/golden, built from the sample "
                             "when missing)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/golden_bench"), help="where the table goes")
    parser.add_argument("--prompts", type=int, default=24, help="held-out Wikipedia prompts (default 24)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="3 prompts, 16 new tokens, 1 round: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 3, 16, 1
    return args


def ensure_build(build: Path) -> None:
    """The default build of the sample with its golden folder, made once (it calibrates and distills)."""
    if (build / "golden" / "golden.json").is_file():
        return
    command = [sys.executable, "-m", "accullm_export.cli.main", "build", "smollm2-135m", "--target", "cpu",
               "--golden", "-o", str(build)]
    print("building:", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)


def ensure_w8(build: Path) -> Path:
    """BUILD/golden-w8: the w8 verifier of BUILD's draft, against BUILD's reference verifier."""
    from accullm_export.build.golden import write_w8_verifier

    reference, folder = build / "golden", build / "golden-w8"
    if (folder / "model.onnx").is_file():
        return folder
    manifest = json.loads((reference / "golden.json").read_text())
    if manifest["verifier"]["kind"] != "reference" or manifest["verifier"]["dtype"] != "fp32":
        raise SystemExit(f"golden.py: {reference} has a {manifest['verifier']['kind']} verifier; give a build made "
                         "with --verifier reference for a cpu target")
    partial = build / "golden-w8.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    shutil.copytree(reference / Path(manifest["draft"]["model"]).parent, partial / "draft")
    write_w8_verifier(reference, partial / "draft" / "model.onnx", partial)
    partial.rename(folder)
    return folder


def held_out_prompts(folder: Path, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens from the held-out articles: every article's opening first, then
    their next ``length`` tokens, and so on."""
    from accullm_export.data.text import load_text_source
    from accullm_export.runtime.tokenizer import FolderTokenizer

    tokenizer = FolderTokenizer(folder)
    articles = [tokenizer.encode(document) for document in load_text_source("wiki:evaluation").documents]
    prompts = []
    for start in range(0, max((len(ids) for ids in articles), default=0), length):
        for ids in articles:
            if len(ids) >= start + length:
                prompts.append(ids[start:start + length])
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"golden.py: the held-out articles hold only {len(prompts)} prompts of {length} tokens")


def run_row(row: str, models: dict, prompt: list[int], config) -> dict:
    """One prompt through one row: its tokens, decode time and, for a golden row, the draft's counters."""
    from accullm_export.runtime import generate
    from accullm_export.runtime.speculative import speculative_generate

    if row.startswith("golden"):
        result = speculative_generate(models["draft"], models[row.split()[1]], prompt, config)
        return {"tokens": result.tokens, "decode_seconds": result.decode_seconds, "proposed": result.proposed,
                "accepted": result.accepted, "passes": result.verifier_passes}
    result = generate(models[row], [prompt], config)
    return {"tokens": result.tokens[0], "decode_seconds": result.decode_seconds}


def measure(models: dict, prompts: list[list[int]], config, rounds: int) -> tuple[dict, list[dict]]:
    """row -> per-round samples; and the first round's outputs (prompt by prompt, row -> run)."""
    samples = {row: [] for row in ROWS}
    first_round = []
    for index in range(rounds):
        order = ROWS[index % len(ROWS):] + ROWS[:index % len(ROWS)]
        totals = {row: {"tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0, "passes": 0} for row in ROWS}
        for prompt in prompts:
            runs = {row: run_row(row, models, prompt, config) for row in order}
            if index == 0:
                first_round.append(runs)
            for row, run in runs.items():
                total = totals[row]
                total["tokens"] += len(run["tokens"]) - 1
                total["seconds"] += run["decode_seconds"]
                for key in ("proposed", "accepted", "passes"):
                    total[key] += run.get(key, 0)
        for row, total in totals.items():
            samples[row].append(total | {"tokens_per_second": total["tokens"] / total["seconds"]})
        print(f"round {index + 1}/{rounds}: " + ", ".join(f"{row} {samples[row][-1]['tokens_per_second']:.1f}"
                                                            for row in ROWS), file=sys.stderr)
    return samples, first_round


def exactness(models: dict, prompts: list[list[int]], first_round: list[dict]) -> dict:
    """Per golden row: mismatches against its verifier alone, each with both models' top-2 margins."""
    from accullm_export.runtime.speculative import first_divergence

    found = {}
    for row in ("golden reference", "golden w8"):
        verifier = row.split()[1]
        cases = []
        for prompt, runs in zip(prompts, first_round):
            divergence = first_divergence(models["draft"], models[verifier], prompt, runs[row]["tokens"],
                                          runs[verifier]["tokens"])
            if divergence is not None:
                cases.append({"position": divergence.position, "verifier_margin": divergence.verifier_margin,
                              "draft_margin": divergence.draft_margin})
        found[row] = {"mismatches": len(cases), "prompts": len(prompts), "cases": cases}
    return found


def table(samples: dict, exact: dict, settings: dict) -> str:
    lines = ["| row | decode tok/s | vs reference alone: median (lowest-highest) | acceptance | tokens per "
             "verifier pass | golden = verifier's own greedy |", "|---|--:|--:|--:|--:|---|"]
    base = [sample["tokens_per_second"] for sample in samples["reference"]]
    for row in ROWS:
        speeds = [sample["tokens_per_second"] for sample in samples[row]]
        ratios = [speed / reference for speed, reference in zip(speeds, base)]
        acceptance = passes = match = "—"
        if row.startswith("golden"):
            proposed = sum(sample["proposed"] for sample in samples[row])
            acceptance = f"{sum(sample['accepted'] for sample in samples[row]) / max(proposed, 1):.0%}"
            passes = f"{sum(s['tokens'] for s in samples[row]) / max(sum(s['passes'] for s in samples[row]), 1):.2f}"
            cases = exact[row]
            margins = ", ".join(f"{case['verifier_margin']:.3g}" for case in cases["cases"])
            match = f"{cases['prompts'] - cases['mismatches']}/{cases['prompts']}" + \
                (f" (verifier top-2 margins where they part: {margins})" if margins else "")
        lines.append(f"| {row} | {statistics.median(speeds):.1f} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {acceptance} | {passes} | {match} |")
    lines.append(f"\n{settings['prompts']} held-out Wikipedia prompts of {settings['prompt_tokens']} tokens, "
                 f"{settings['new_tokens']} greedy tokens each, batch 1, ONNX Runtime optimization all; medians of "
                 f"{settings['rounds']} interleaved rounds; {settings['cpus']} CPUs, other processes took "
                 f"{settings['others']} of the CPU time meanwhile")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from accullm_export.runtime import GenerationConfig, OrtCausalLM

    ensure_build(args.build)
    w8 = ensure_w8(args.build)
    reference = args.build / "golden"
    models = {"reference": OrtCausalLM.from_path(reference, device="cpu", exact=True),
              "w8": OrtCausalLM.from_path(w8, device="cpu", exact=True),
              "draft": OrtCausalLM.from_path(reference / "draft", device="cpu")}
    prompts = held_out_prompts(reference, args.prompts, args.prompt_tokens)
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    samples, first_round = measure(models, prompts, config, args.rounds)
    others = meter.others_share()
    exact = exactness(models, prompts, first_round)
    settings = {"build": str(args.build), "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, "rounds": args.rounds, "cpus": os.cpu_count(),
                "others": "unknown" if others is None else f"{others:.0%}",
                "seconds": round(time.perf_counter() - started, 1)}
    report = table(samples, exact, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "golden.md").write_text(report + "\n")
    (args.out / "golden.json").write_text(json.dumps({"settings": settings, "samples": samples,
                                                      "exactness": exact}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
