"""A bundle's plugin graph against its standard graph, both in ONNX Runtime on the CPU (``accullm-export rehearse``).

``model_plugins/model.onnx`` runs with every ``accullm`` node executed by its NumPy reference
(:mod:`accullm_export.runtime.plugin_rehearsal`); ``model/model.onnx`` runs as it is. Both see the same inputs:

* teacher-forced text windows from an empty cache: max and mean |logit difference| and KL(standard || plugins);
* batched greedy decoding with the KV cache (prompts of different lengths, left-padded): the identical prefix of
  every prompt's new tokens.

The plugin ops compute what the standard subgraphs they replace compute, so the differences are rounding only
(the references work in float64, ONNX Runtime's kernels in the model's type): a mis-wired input, attribute,
packing or cache shows as differences far outside the tolerances, or as an error naming the node.

Sparse-skip MLPs are the exception: a neuron is kept when its score exceeds a level, and a score within rounding
of the level lands on either side. The standard graph is not even consistent with itself there (its Compress-ed
MatMuls round differently for different sequence lengths), and on a real model one flipped neuron can move the
logits well past the tolerances and change greedy tokens. A failure on a model with SparseSkipMLP nodes therefore
needs a node-by-node look (each reference on the standard graph's own inputs) before it is called a wiring error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from accullm_export.errors import AccuracyError, UserError
from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate
from accullm_export.runtime.plugin_rehearsal import RehearsalCausalLM
from accullm_export.runtime.tokenizer import FolderTokenizer
from accullm_export.validate.metrics import TokenStatistics, shared_prefix
from accullm_export.progress import progress

log = logging.getLogger(__name__)

# Tolerances by the activations' type: the largest |logit difference| relative to the largest |logit| of the
# standard graph, and the mean KL(standard || plugins) per token. In float32 the two graphs differ by a few ulps per
# layer (summation order, float64 references); float16 graphs round every op's output to 11 bits. A wiring error
# moves logits by a sizeable fraction of their range.
TOLERANCES = {"float32": {"max_abs_relative": 1e-3, "kl_mean": 1e-6},
              "float16": {"max_abs_relative": 2e-2, "kl_mean": 1e-4}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RehearsalConfig:
    """What to compare. Greedy decoding must give identical tokens; the logits must stay within TOLERANCES."""

    text: str = "wiki:evaluation"
    windows: int = 4
    seq_len: int = 128
    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    seed: int = 0
    optimization: str = "basic"
    backend: str = "reference"
    version: int = 1


def bundle_models(bundle: str | Path) -> tuple[Path, Path]:
    """(standard, plugin) model files of a bundle folder.

    Raises:
        UserError: not a bundle folder, or a bundle without ``model_plugins/`` (no plugin op was swapped in).
    """
    bundle = Path(bundle)
    standard, plugins = bundle / "model" / "model.onnx", bundle / "model_plugins" / "model.onnx"
    if not bundle.is_dir() or not standard.is_file():
        raise UserError(f"{bundle} is not a deployment bundle (no model/model.onnx); give the bundle/ folder "
                        "that `accullm-export build --target orin` writes")
    if not plugins.is_file():
        raise UserError(f"{bundle} has no model_plugins/model.onnx: no plugin op was swapped in, so there is no "
                        "plugin graph to rehearse")
    return standard, plugins


def rehearse_bundle(bundle: str | Path, config: RehearsalConfig = RehearsalConfig()) -> dict:
    """Compare the bundle's two graphs; returns the report (``passed`` False names what failed in ``failures``)."""
    standard_path, plugins_path = bundle_models(bundle)
    standard = OrtCausalLM.from_path(standard_path, device="cpu", optimization=config.optimization)
    plugins = RehearsalCausalLM(plugins_path, optimization=config.optimization, backend=config.backend)
    _check_comparable(standard, plugins)
    tokenizer = FolderTokenizer(standard_path.parent)
    windows, prompts = _inputs(tokenizer, config)
    kind = "float16" if standard.layout.kv_dtype == np.float16 else "float32"
    report = {"bundle": str(bundle), "plugin_ops": plugins.plugin_ops, "backend": config.backend,
              "activations": kind, "tolerances": TOLERANCES[kind], "config": dataclasses.asdict(config),
              "logits": logit_differences(standard, plugins, windows),
              "greedy": greedy_tokens(standard, plugins, prompts, config.new_tokens),
              "notes": _notes(standard_path.parent)}
    report["failures"] = _failures(report)
    report["passed"] = not report["failures"]
    return report


def check_rehearsal(report: dict) -> None:
    """Raise AccuracyError naming what failed, when the report did not pass."""
    if not report["passed"]:
        raise AccuracyError(f"the plugin graph does not match the standard graph: {'; '.join(report['failures'])}")


def logit_differences(standard, plugins, windows: np.ndarray) -> dict:
    """Max/mean |difference| and KL of teacher-forced logits, one window at a time (bounded memory)."""
    stats = TokenStatistics()
    max_abs = mean_sum = scale = 0.0
    count = 0
    for window in progress(windows, "text windows"):
        tokens = window[None, :]
        expected, actual = standard.full_logits(tokens), plugins.full_logits(tokens)
        difference = np.abs(expected.astype(np.float64) - actual)
        max_abs, scale = max(max_abs, float(difference.max())), max(scale, float(np.abs(expected).max()))
        mean_sum, count = mean_sum + float(difference.sum()), count + difference.size
        stats.add(expected, actual, tokens)
    summary = stats.summary()
    return {"windows": int(len(windows)), "seq_len": int(windows.shape[1]), "max_abs": max_abs,
            "mean_abs": mean_sum / count, "max_abs_relative": max_abs / scale if scale else max_abs,
            "kl_mean": summary["kl_mean"], "kl_max": float(np.max(np.concatenate(stats.kl))),
            "top1_agreement": summary["top1_agreement"]}


def greedy_tokens(standard, plugins, prompts: list[list[int]], new_tokens: int) -> dict:
    """Batched greedy decoding with the KV cache on both graphs (no EOS stop: every prompt gets ``new_tokens``)."""
    config = GenerationConfig(max_new_tokens=new_tokens)
    expected = generate(standard, prompts, config).tokens
    actual = generate(plugins, prompts, config).tokens
    rows = [{"prompt_tokens": len(prompt), "identical_prefix": shared_prefix(np.asarray(a), np.asarray(b)),
             "standard": a, "plugins": b} for prompt, a, b in zip(prompts, expected, actual)]
    return {"new_tokens": new_tokens, "prompts": rows,
            "identical": sum(row["identical_prefix"] == new_tokens for row in rows)}


def format_report(report: dict) -> str:
    """The report as a few lines of text."""
    logits, greedy, tolerance = report["logits"], report["greedy"], report["tolerances"]
    ops = ", ".join(f"{count} {op}" for op, count in sorted(report["plugin_ops"].items()))
    prefixes = " ".join(str(row["identical_prefix"]) for row in greedy["prompts"])
    lines = [f"plugin graph: {ops}, run by their NumPy references ({report['activations']} activations)",
             f"logits over {logits['windows']} windows of {logits['seq_len']} tokens: "
             f"max |diff| {logits['max_abs']:.3g}"
             f" ({logits['max_abs_relative']:.3g} of the largest logit; tolerance {tolerance['max_abs_relative']:g}),"
             f" mean |diff| {logits['mean_abs']:.3g}, KL mean {logits['kl_mean']:.3g} (tolerance "
             f"{tolerance['kl_mean']:g}), max {logits['kl_max']:.3g}, top-1 agreement {logits['top1_agreement']:.4f}",
             f"greedy: {greedy['identical']}/{len(greedy['prompts'])} prompts identical for {greedy['new_tokens']} "
             f"new tokens; identical prefix per prompt: {prefixes}"]
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append("rehearsal: passed" if report["passed"] else f"rehearsal: FAILED ({'; '.join(report['failures'])})")
    return "\n".join(lines)


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def _check_comparable(standard, plugins) -> None:
    standard_inputs, plugin_inputs = standard.input_names(), plugins.input_names()
    if standard_inputs != plugin_inputs:
        raise UserError(f"model/ and model_plugins/ take different inputs: "
                        f"{', '.join(sorted(standard_inputs ^ plugin_inputs)[:6])}")
    fields = ("num_layers", "num_kv_heads", "head_dim", "kv_dtype", "vocab_size")
    different = [name for name in fields if getattr(standard.layout, name) != getattr(plugins.layout, name)]
    if different:
        raise UserError(f"model/ and model_plugins/ differ in {', '.join(different)}")


def _inputs(tokenizer: FolderTokenizer, config: RehearsalConfig) -> tuple[np.ndarray, list[list[int]]]:
    """Text windows, and prompts of different lengths (batched decoding pads them on the left)."""
    from accullm_export.data.text import load_text_source, token_windows

    documents = load_text_source(config.text).documents
    windows = token_windows(documents, tokenizer.encode, num_windows=config.windows + config.prompts,
                            seq_len=max(config.seq_len, config.prompt_tokens), seed=config.seed,
                            separator_ids=tokenizer.eos_token_ids[:1])
    prompts = [window[: max(1, config.prompt_tokens - (index % 4) * config.prompt_tokens // 8)].tolist()
               for index, window in enumerate(windows[config.windows:])]
    return windows[: config.windows, : config.seq_len], prompts


def _notes(model_dir: Path) -> list[str]:
    """What the bundle's recipe says that explains an expected difference."""
    manifest = model_dir / "manifest.json"
    try:
        sparsity = json.loads(manifest.read_text()).get("recipe", {}).get("sparsity", {})
    except (OSError, ValueError, AttributeError):
        return []
    if sparsity.get("fraction") and sparsity.get("dense_first_token"):
        return ["the recipe keeps position 0 dense (sparsity.dense_first_token) in model/, which the SparseSkipMLP "
                "op does not: every sequence's first token differs by design, and everything after it through "
                "the cache"]
    return []


def _failures(report: dict) -> list[str]:
    logits, greedy, tolerance = report["logits"], report["greedy"], report["tolerances"]
    failures = []
    if not logits["max_abs_relative"] <= tolerance["max_abs_relative"]:  # NaN fails too
        failures.append(f"max |logit diff| {logits['max_abs_relative']:.3g} of the largest logit exceeds "
                        f"{tolerance['max_abs_relative']:g}")
    if not logits["kl_mean"] <= tolerance["kl_mean"]:
        failures.append(f"mean KL {logits['kl_mean']:.3g} exceeds {tolerance['kl_mean']:g}")
    differing = [index for index, row in enumerate(greedy["prompts"])
                 if row["identical_prefix"] != greedy["new_tokens"]]
    if differing:
        first = greedy["prompts"][differing[0]]
        failures.append(f"greedy tokens differ on {len(differing)}/{len(greedy['prompts'])} prompts (prompt "
                        f"{differing[0]} first at new token {first['identical_prefix']})")
    return failures
