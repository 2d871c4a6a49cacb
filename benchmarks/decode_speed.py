"""Prefill latency, decode speed, model size and export memory: our export vs onnxruntime-genai's builder.

For the sample model (SmolLM2-135M-Instruct, fp32) this script

1. exports ours with ``accullm-export export smollm2-135m`` in a child process and records that child's
   peak resident memory (RSS) next to the size of the model it wrote (model.onnx + model.onnx.data);
2. builds onnxruntime-genai's own fp32 model from the same Hugging Face folder with
   ``python -m onnxruntime_genai.models.builder`` (offline, from the local folder);
3. measures, at batch 1 on CPU with the same intra-op thread count (--threads), three model/runtime pairs:
   ours run by accullm's runtime (OrtCausalLM), ours run by onnxruntime-genai (our folder, unchanged) and
   theirs run by onnxruntime-genai. Prefill is the latency of one 512-token prompt; decode is greedy tokens
   per second after a 32-token prompt. All three stay loaded and are timed in interleaved rounds (medians
   after a warm-up), and the share of CPU time other processes took meanwhile is reported, because a shared
   machine easily swings these numbers. Each pair's greedy tokens are compared with theirs.

Prompts are token ids of real English text (a passage repeated until long enough), from the checkpoint's
tokenizer.json. It prints a markdown table and writes decode_speed.md, decode_speed.json and decode_speed.png
under --out. It measures; it never asserts on a time.

Run from the repository root::

    .venv/bin/python benchmarks/decode_speed.py
    .venv/bin/python benchmarks/decode_speed.py --reuse --repeats 3 --decode-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from cpu_meter import CpuMeter  # benchmarks/ is on sys.path when a script here runs

from accullm_export.atomic import atomic_write_bytes, atomic_write_text
from accullm_export.models.checkpoint import resolve_checkpoint_folder
from accullm_export.runtime.base import KVCache

log = logging.getLogger("decode_speed")

SAMPLE_MODEL = "smollm2-135m"
HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the builder picks its graph recipe from this name
PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 32
REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
# ru_maxrss is in KiB on Linux and in bytes on macOS.
RU_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024
GOAL_RSS_RATIO = 3.0
NOISY_SHARE = 0.05  # above this share of CPU time taken by others, the report flags the numbers

# Public-domain prose (Melville, Moby-Dick, chapter 1), repeated until the prompt is long enough.
PASSAGE = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever "
    "I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever "
    "I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral "
    "I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral "
    "principle to prevent me from deliberately stepping into the street, and methodically knocking people's "
    "hats off, then, I account it high time to get to sea as soon as I can. This is my substitute for pistol "
    "and ball. With a philosophical flourish Cato throws himself upon his sword; I quietly take to the ship. "
    "There is nothing surprising in this. If they but knew it, almost all men in their degree, some time or "
    "other, cherish very nearly the same feelings towards the ocean with me. "
)


class Runtime(Protocol):
    """One loaded model behind one runtime, timed the same way for every pair."""

    def prefill_seconds(self, prompt: Sequence[int]) -> float:
        """Seconds for one forward pass over ``prompt`` from an empty cache."""

    def greedy_decode(self, prompt: Sequence[int], steps: int) -> tuple[float, list[int]]:
        """Prefill ``prompt`` (untimed), then time ``steps`` decode steps; returns seconds and steps + 1 tokens."""


class AccullmRuntime:
    """Our exported folder run by accullm's OrtCausalLM (NumPy KV cache, presents fed back as the next past)."""

    def __init__(self, folder: Path, threads: int):
        from accullm_export.runtime import OrtCausalLM

        self.model = OrtCausalLM.from_path(folder, device="cpu", threads=threads or None)

    def _forward(self, token_ids: Sequence[int], past_length: int, past: KVCache) -> tuple[np.ndarray, KVCache]:
        input_ids = np.asarray([token_ids], dtype=np.int64)
        attention_mask = np.ones((1, past_length + len(token_ids)), dtype=np.int64)
        position_ids = np.arange(past_length, past_length + len(token_ids), dtype=np.int64)[None, :]
        return self.model.forward(input_ids, attention_mask, position_ids, past)

    def prefill_seconds(self, prompt: Sequence[int]) -> float:
        started = time.perf_counter()
        self._forward(prompt, 0, self.model.empty_cache(1))
        return time.perf_counter() - started

    def greedy_decode(self, prompt: Sequence[int], steps: int) -> tuple[float, list[int]]:
        logits, past = self._forward(prompt, 0, self.model.empty_cache(1))
        tokens = [int(np.argmax(logits[0, -1]))]
        started = time.perf_counter()
        for step in range(steps):
            logits, past = self._forward(tokens[-1:], len(prompt) + step, past)
            tokens.append(int(np.argmax(logits[0, -1])))
        return time.perf_counter() - started, tokens


class GenaiRuntime:
    """Any folder with a genai_config.json run by onnxruntime-genai's Generator (greedy search)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        # top_k=1 as well: their genai_config.json defaults to top_k=50, ours to 1; greedy either way.
        params.set_search_options(max_length=max_length, do_sample=False, top_k=1)
        return self.og.Generator(self.model, params)

    def prefill_seconds(self, prompt: Sequence[int]) -> float:
        generator = self._generator(len(prompt) + 1)
        prompt_ids = np.asarray(prompt, dtype=np.int32)
        started = time.perf_counter()
        generator.append_tokens(prompt_ids)  # runs the prefill and leaves its logits ready
        return time.perf_counter() - started

    def greedy_decode(self, prompt: Sequence[int], steps: int) -> tuple[float, list[int]]:
        generator = self._generator(len(prompt) + steps + 1)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        generator.generate_next_token()  # picks from the prefill's logits; no forward pass
        tokens = [int(generator.get_next_tokens()[0])]
        started = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()  # one forward pass on the last token, then the pick
            tokens.append(int(generator.get_next_tokens()[0]))
        return time.perf_counter() - started, tokens


@dataclasses.dataclass(frozen=True)
class Pair:
    """A model/runtime pair to measure."""

    label: str
    folder: Path
    open_runtime: Callable[[Path, int], Runtime]


@dataclasses.dataclass
class Measurement:
    """Raw samples of one pair; the table shows medians."""

    label: str
    folder: str
    model_megabytes: float
    prefill_ms: list[float]
    decode_tokens_per_second: list[float]
    tokens: list[int]

    @property
    def prefill_ms_median(self) -> float:
        return statistics.median(self.prefill_ms)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tokens_per_second)


def model_bytes(folder: Path) -> int:
    """Size of model.onnx plus its external data file."""
    return sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
               if (folder / name).is_file())


def run_with_peak_rss(command: list[str], log_path: Path) -> int:
    """Run ``command`` with output to ``log_path``; returns the child's peak RSS in bytes.

    os.wait4 reports this one child's rusage (including its own reaped children), so the figure does not
    depend on what else this process has run.
    """
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"{' '.join(command[:4])} ... failed with exit code {process.returncode}; "
                         f"see {log_path}:\n" + "\n".join(tail))
    return usage.ru_maxrss * RU_MAXRSS_BYTES


def export_ours(folder: Path, work: Path, reuse: bool) -> int | None:
    """Export the sample with our CLI; returns the export's peak RSS in bytes (None when reused)."""
    if reuse and (folder / "model.onnx").is_file():
        log.info("reusing our export in %s", folder)
        return None
    command = [sys.executable, "-m", "accullm_export.cli.main", "export", SAMPLE_MODEL, "-o", str(folder)]
    if folder.exists():
        command.append("--overwrite")
    log.info("exporting ours: %s", " ".join(command[1:]))
    return run_with_peak_rss(command, work / "export.log")


def build_theirs(hf_folder: Path, folder: Path, work: Path, reuse: bool) -> int | None:
    """Build onnxruntime-genai's fp32 CPU model; returns the builder's peak RSS in bytes (None when reused)."""
    if reuse and (folder / "model.onnx").is_file():
        log.info("reusing onnxruntime-genai's build in %s", folder)
        return None
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", HF_MODEL_ID, "-i", str(hf_folder),
               "-o", str(folder), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai_cache")]
    log.info("building theirs: %s", " ".join(command[1:]))
    return run_with_peak_rss(command, work / "genai_build.log")


def prompt_token_ids(tokenizer_path: Path, length: int) -> list[int]:
    """Exactly ``length`` token ids of real text: the passage, repeated until long enough."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    text = PASSAGE
    while len(ids := tokenizer.encode(text).ids) < length:
        text += PASSAGE
    return ids[:length]


def warm_up(runtime: Runtime, prefill_prompt: list[int], decode_prompt: list[int]) -> None:
    """One prefill and a short decode, so first-run allocations and page faults stay out of the samples."""
    runtime.prefill_seconds(prefill_prompt)
    runtime.greedy_decode(decode_prompt, 16)


def measure(pairs: list[Pair], prefill_prompt: list[int], decode_prompt: list[int], *, decode_tokens: int,
            repeats: int, threads: int, meter: CpuMeter) -> list[Measurement]:
    """Time ``repeats`` prefills and greedy decode runs of every pair, interleaved.

    All pairs stay loaded and each round visits them in a rotated order, so a burst of load from another
    process, or a slow drift of the machine, falls on every pair alike instead of on whichever ran last.
    """
    runtimes = []
    for pair in pairs:
        log.info("loading and warming up %s", pair.label)
        runtimes.append(pair.open_runtime(pair.folder, threads))
        warm_up(runtimes[-1], prefill_prompt, decode_prompt)
    prefill_ms: list[list[float]] = [[] for _ in pairs]
    decode_rates: list[list[float]] = [[] for _ in pairs]
    tokens: list[list[int]] = [[] for _ in pairs]
    meter.start()
    for round_index in range(repeats):
        log.info("round %d of %d", round_index + 1, repeats)
        for index in np.roll(np.arange(len(pairs)), -round_index):
            prefill_ms[index].append(runtimes[index].prefill_seconds(prefill_prompt) * 1e3)
            seconds, tokens[index] = runtimes[index].greedy_decode(decode_prompt, decode_tokens)
            decode_rates[index].append(decode_tokens / seconds)
    return [Measurement(label=pair.label, folder=str(pair.folder), model_megabytes=model_bytes(pair.folder) / MB,
                        prefill_ms=prefill_ms[index], decode_tokens_per_second=decode_rates[index],
                        tokens=tokens[index]) for index, pair in enumerate(pairs)]


def token_agreement(candidate: list[int], reference: list[int]) -> str:
    """'match (N tokens)' or where the greedy sequences first differ."""
    for index, (ours, theirs) in enumerate(zip(candidate, reference)):
        if ours != theirs:
            return f"MISMATCH at token {index} of {len(reference)} ({ours} vs {theirs})"
    return f"match ({len(reference)} tokens)"


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def threads_note(threads: int) -> str:
    """How the thread count was set, for the report."""
    if threads:
        return (f"{threads} intra-op threads for all three pairs, set explicitly (left to its default, "
                "onnxruntime-genai 0.18 ran a single thread on a 2-core machine, where ONNX Runtime's own "
                "default is one per physical core)")
    return "each runtime's default intra-op threads (these can differ between the runtimes)"


def environment(args: argparse.Namespace) -> dict:
    """What the numbers depend on, for the report."""
    import onnxruntime
    import onnxruntime_genai

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(usable_cpus()),
        "threads": args.threads,
        "threads_note": threads_note(args.threads),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": onnxruntime_genai.__version__,
        "batch": 1,
        "prefill_tokens": PREFILL_TOKENS,
        "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
    }


def report_header(env: dict) -> list[str]:
    """Title, conditions and, when other processes competed for the CPUs, a warning."""
    lines = [
        f"# Decode speed: SmolLM2-135M fp32, CPU, batch 1 ({env['date']})",
        "",
        f"ONNX Runtime {env['onnxruntime']}, onnxruntime-genai {env['onnxruntime_genai']}; "
        f"{env['usable_cpus']} usable CPUs; {env['threads_note']}. Medians of {env['repeats']} interleaved rounds "
        f"after a warm-up; prefill = one {PREFILL_TOKENS}-token prompt; decode = {env['decode_tokens']} greedy "
        f"steps after a {DECODE_PROMPT_TOKENS}-token prompt. MB = 10^6 bytes.",
    ]
    others = env.get("other_processes_cpu_share")
    if others is not None:
        lines.append(f"Other processes used {others:.0%} of the CPUs during the timed runs"
                     + (" (a shared machine: treat these numbers as noisy)." if others > NOISY_SHARE else "."))
    return lines


def build_report(rows: list[Measurement], memory: dict, env: dict) -> tuple[str, dict]:
    """The markdown report and the JSON document."""
    theirs = rows[-1]
    lines = report_header(env) + [
        "",
        f"| model / runtime | prefill ms ({PREFILL_TOKENS} tok) | decode tok/s | model size MB |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {row.label} | {row.prefill_ms_median:.1f} | {row.decode_median:.2f} | "
              f"{row.model_megabytes:.1f} |" for row in rows]
    lines += ["", "Speed ratios against theirs via onnxruntime-genai (> 1 means ours is faster): "
              "prefill = theirs_ms / ours_ms, decode = ours_tok_s / theirs_tok_s.", ""]
    ratios = {}
    for row in rows[:-1]:
        ratios[row.label] = {"prefill": theirs.prefill_ms_median / row.prefill_ms_median,
                             "decode": row.decode_median / theirs.decode_median,
                             "greedy_tokens": token_agreement(row.tokens, theirs.tokens)}
        lines.append(f"- {row.label}: prefill x{ratios[row.label]['prefill']:.2f}, "
                     f"decode x{ratios[row.label]['decode']:.2f}; greedy tokens vs theirs: "
                     f"{ratios[row.label]['greedy_tokens']}")
    lines += ["", memory_line(memory, rows[0].model_megabytes)]
    if memory.get("genai_builder_peak_rss_mb"):
        lines.append("onnxruntime-genai builder peak RSS (for reference): "
                     f"{memory['genai_builder_peak_rss_mb']:.0f} MB")
    document = {"environment": env, "rows": [dataclasses.asdict(row) | {
        "prefill_ms_median": row.prefill_ms_median, "decode_tokens_per_second_median": row.decode_median}
        for row in rows], "ratios_vs_theirs": ratios, "memory": memory}
    return "\n".join(lines) + "\n", document


def memory_line(memory: dict, model_megabytes: float) -> str:
    """The export peak-RSS sentence, with the ratio to the fp32 model size and the <= 3x goal."""
    peak = memory.get("export_peak_rss_mb")
    if peak is None:
        return "Export peak RSS: not measured (--reuse kept the existing export; run without --reuse)."
    ratio = peak / model_megabytes
    verdict = "met" if ratio <= GOAL_RSS_RATIO else "NOT met"
    return (f"Export peak RSS: {peak:.0f} MB = {ratio:.2f}x the fp32 model ({model_megabytes:.0f} MB); "
            f"goal <= {GOAL_RSS_RATIO:.0f}x: {verdict}.")


def plot(rows: list[Measurement], path: Path) -> None:
    """Two bar charts, prefill latency and decode speed, one bar per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row.label.replace(" via ", "\nvia ") for row in rows]
    figure, (prefill_axes, decode_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((prefill_axes, [row.prefill_ms_median for row in rows],
               f"prefill ms ({PREFILL_TOKENS} tok), lower is better"),
              (decode_axes, [row.decode_median for row in rows], "decode tok/s, higher is better"))
    for axes, values, title in panels:
        bars = axes.bar(labels, values, color=["tab:blue", "tab:cyan", "tab:orange"][:len(rows)])
        axes.bar_label(bars, fmt="%.1f")
        axes.margins(y=0.12)  # room for the labels above the tallest bar
        axes.set_title(title)
        axes.tick_params(axis="x", labelsize=8)
    figure.suptitle("SmolLM2-135M fp32, CPU, batch 1")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out",
                        help="report folder (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None,
                        help="model folders and logs (default: OUT/decode_speed_work)")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="timed greedy decode steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(usable_cpus()),
                        help="intra-op threads for all three pairs; 0 leaves each runtime its own default, which "
                             "differ (default: the usable CPUs, %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="keep model folders that already exist in --work")
    args = parser.parse_args(argv)
    if args.decode_tokens < 1 or args.repeats < 1 or args.threads < 0:
        parser.error("--decode-tokens and --repeats must be at least 1, --threads at least 0")
    args.work = args.work or args.out / "decode_speed_work"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    hf_folder = resolve_checkpoint_folder(SAMPLE_MODEL)
    ours, theirs = args.work / "ours", args.work / "genai_fp32"
    export_peak = export_ours(ours, args.work, args.reuse)  # first, before the builder's child runs
    builder_peak = build_theirs(hf_folder, theirs, args.work, args.reuse)
    prefill_prompt = prompt_token_ids(hf_folder / "tokenizer.json", PREFILL_TOKENS)
    decode_prompt = prefill_prompt[:DECODE_PROMPT_TOKENS]
    pairs = [Pair("ours via accullm runtime", ours, AccullmRuntime),
             Pair("ours via onnxruntime-genai", ours, GenaiRuntime),
             Pair("theirs via onnxruntime-genai", theirs, GenaiRuntime)]
    meter = CpuMeter()
    rows = measure(pairs, prefill_prompt, decode_prompt, decode_tokens=args.decode_tokens, repeats=args.repeats,
                   threads=args.threads, meter=meter)
    env = environment(args) | {"other_processes_cpu_share": meter.others_share()}
    memory = {"export_peak_rss_mb": export_peak / MB if export_peak else None,
              "genai_builder_peak_rss_mb": builder_peak / MB if builder_peak else None,
              "ours_model_mb": model_bytes(ours) / MB, "theirs_model_mb": model_bytes(theirs) / MB}
    if memory["export_peak_rss_mb"]:
        memory["export_peak_rss_over_model_size"] = memory["export_peak_rss_mb"] / memory["ours_model_mb"]
    markdown, document = build_report(rows, memory, env)
    atomic_write_text(args.out / "decode_speed.md", markdown)
    atomic_write_text(args.out / "decode_speed.json", json.dumps(document, indent=2) + "\n")
    plot(rows, args.out / "decode_speed.png")
    print(markdown)
    print(f"wrote {args.out / 'decode_speed.md'}, decode_speed.json and decode_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
