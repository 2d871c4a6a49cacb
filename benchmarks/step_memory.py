"""Peak memory and wall time of each step (export, calibrate, quantize, validate) on one model, against the
scale goal: at most 1.5 x the fp32 model's size + 2 GB per step.

Each step is the kit's own command in a child process; its peak resident set size is the kernel's
``ru_maxrss`` for that child (``os.wait4``), its time the wall clock. The model is one of:

* ``qwen2-1.5b-random``: a Qwen2 of Qwen2.5-1.5B's shape (28 layers, hidden 1536, MLP 8960, 12 heads, 2 KV
  heads, 151,936-token tied vocabulary) with random weights, built in code once into ``--out`` (the
  tokenizer is the second model's, which has the same vocabulary). Random weights measure memory, not
  accuracy.
* any name or path ``accullm-export export`` takes (``qwen2.5-coder-0.5b``, ``smollm2-135m``, a .gguf file, a
  Hugging Face folder).

Memory depends on the sizes of one window and one layer, not on how many windows or steps run, so
``--calib-samples``, ``--gptq-samples``, ``--distill-steps`` and ``--distill-samples`` may be cut to make a
large model's run short; the table says what ran. quantize runs the w4a16 preset in its ONNX Runtime form (the
cpu target's default) with those counts.

Run from the repository root::

    .venv/bin/python benchmarks/step_memory.py --model qwen2-1.5b-random --calib-samples 4 --gptq-samples 4 \\
        --distill-steps 2 --distill-samples 4
    .venv/bin/python benchmarks/step_memory.py --model qwen2.5-coder-0.5b

Outputs under --out: step_memory.md and step_memory.json (each run replaces them), and the model folders.
It measures; it never asserts on a size or a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path

GB = 1e9
RANDOM_MODELS = {
    "qwen2-1.5b-random": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                              max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
}
TOKENIZER_SOURCE = "qwen2.5-coder-0.5b"  # the tokenizer the random Qwen2 borrows (same vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass
class StepResult:
    step: str
    command: list[str]
    seconds: float
    peak_rss_bytes: int
    exit_code: int


def random_checkpoint(name: str, folder: Path) -> Path:
    """The random-weight Hugging Face folder of ``name`` (built once)."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    import transformers

    from accullm_export.models.checkpoint import resolve_checkpoint_folder

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**RANDOM_MODELS[name], torch_dtype="float32")
    model = transformers.Qwen2ForCausalLM(config)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    del model
    source = resolve_checkpoint_folder(TOKENIZER_SOURCE)
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, staging / file)
    staging.rename(folder)
    return folder


def run_step(step: str, command: list[str], log: Path) -> StepResult:
    """The command in a child process: its wall time and peak RSS (``ru_maxrss``, KiB on Linux)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code
    return StepResult(step, command, seconds, usage.ru_maxrss * 1024, code)


def quantize_config(out: Path, args: argparse.Namespace) -> Path:
    """The w4a16 preset's ONNX Runtime form with this run's counts, as a recipe file."""
    from accullm_export.recipes.toml_io import dump_toml

    dumped = subprocess.run([*CLI, "quantize", "--preset", "w4a16", "--dump-config"], check=True,
                            capture_output=True, text=True).stdout
    recipe = tomllib.loads(dumped)
    recipe["gptq"]["samples"] = args.gptq_samples
    recipe["distill"]["steps"] = args.distill_steps
    if not args.distill_steps:  # no training: nothing trains along with the scales either
        recipe["distill"]["norms"] = recipe["distill"]["outlier_rows"] = False
    recipe["distill"]["samples"] = args.distill_samples
    recipe["vocab"]["samples"] = min(recipe["vocab"]["samples"], args.calib_samples)
    path = out / "w4a16-counts.toml"
    path.write_text(dump_toml(recipe))
    return path


CLI = [sys.executable, "-m", "accullm_export.cli.main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2-1.5b-random",
                        help=f"{', '.join(RANDOM_MODELS)} or anything `export` takes")
    parser.add_argument("--out", type=Path, default=Path("bench_out/step_memory"))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--gptq-samples", type=int, default=64)
    parser.add_argument("--distill-steps", type=int, default=120)
    parser.add_argument("--distill-samples", type=int, default=64)
    parser.add_argument("--validation-windows", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="keep an export and profile already in --out")
    args = parser.parse_args(argv)
    slug = args.model.replace("/", "_").replace(".", "_")
    out = (args.out / slug).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = str(random_checkpoint(args.model, out / "hf")) if args.model in RANDOM_MODELS else args.model
    export, profile, quantized = out / "fp32", out / "profile", out / "w4a16"
    steps = [
        ("export", [*CLI, "export", source, "-o", str(export), "--overwrite"], export),
        ("calibrate", [*CLI, "calibrate", str(export), "-o", str(profile), "--samples", str(args.calib_samples),
                       "--seq-len", "512", "--overwrite"], profile),
        ("quantize", [*CLI, "quantize", str(export), "--profile", str(profile), "--config",
                      str(quantize_config(out, args)), "-o", str(quantized), "--overwrite"], quantized),
        ("validate", [*CLI, "validate", str(export), str(quantized), "--windows", str(args.validation_windows),
                      "--report", str(out / "validation")], None),
    ]
    results: list[StepResult] = []
    for step, command, made in steps:
        if args.reuse and made is not None and step in ("export", "calibrate") and made.is_dir():
            continue
        print(f"{step}: {' '.join(command)}", file=sys.stderr, flush=True)
        result = run_step(step, command, out / f"{step}.log")
        results.append(result)
        print(f"  {result.seconds:.0f} s, peak RSS {result.peak_rss_bytes / GB:.2f} GB, exit {result.exit_code}",
              file=sys.stderr, flush=True)
        if result.exit_code != 0:
            break
    from accullm_export.build.quantize import weight_bytes

    size = weight_bytes(export) if export.is_dir() else 0
    limit = 1.5 * size + 2 * GB
    document = {"model": args.model, "fp32_bytes": size, "limit_bytes": limit,
                "date": datetime.date.today().isoformat(),
                "counts": {key: getattr(args, key) for key in ("calib_samples", "gptq_samples", "distill_steps",
                                                              "distill_samples", "validation_windows")},
                "platform": platform.platform(), "cpus": os.cpu_count(),
                "steps": [dataclasses.asdict(result) for result in results]}
    lines = [f"# Peak memory per step: {args.model}", "",
             f"fp32 weights {size / GB:.2f} GB; goal per step: 1.5 x that + 2 GB = {limit / GB:.2f} GB. Counts: "
             + ", ".join(f"{key} {value}" for key, value in document["counts"].items()) + ".", "",
             "| step | wall | peak RSS | vs goal | exit |", "|---|--:|--:|--:|--:|"]
    for result in results:
        lines.append(f"| {result.step} | {result.seconds / 60:.1f} min | {result.peak_rss_bytes / GB:.2f} GB | "
                     f"{result.peak_rss_bytes / limit:.2f}x | {result.exit_code} |")
    (args.out / "step_memory.md").write_text("\n".join(lines) + "\n")
    (args.out / "step_memory.json").write_text(json.dumps(document, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if all(result.exit_code == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
