"""Validation of a causal LM against its reference: text metrics, greedy agreement and golden probes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from accullm_export.errors import UserError
from accullm_export.runtime import CausalLMRunner, GenerationConfig, generate
from accullm_export.runtime.tokenizer import FolderTokenizer
from accullm_export.validate.metrics import TokenStatistics, shared_prefix
from accullm_export.validate.probes import answer_of, golden_probes
from accullm_export.progress import progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMValidationConfig:
    """What to measure. Defaults are sized for a small model on a laptop CPU."""

    text: str = "wiki:evaluation"
    windows: int = 8
    seq_len: int = 256
    prompts_file: str | None = None
    num_prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    probes_per_task: int = 5
    probe_tokens: int = 16
    seed: int = 0
    optimization: str = "basic"
    tokenizer: str | None = None
    version: int = 1


def load_pair(reference: str | Path, candidate: str | Path, optimization: str) -> tuple[CausalLMRunner, CausalLMRunner]:
    """Load both sides and check they are comparable (same inputs, same vocabulary). Both run in one process,
    so each keeps its ONNX Runtime memory lean (``OrtCausalLM``'s ``lean``)."""
    from accullm_export.runtime.trt_runner import load_runner

    ref = load_runner(reference, device="cpu", optimization=optimization, lean=True)
    cand = load_runner(candidate, device="cpu", optimization=optimization, lean=True)  # an .engine: TensorRT
    # position_ids is optional: onnxruntime-genai's own builds derive positions from the attention mask
    ref_inputs = ref.input_names() - {"position_ids"}
    cand_inputs = cand.input_names() - {"position_ids"}
    if ref_inputs != cand_inputs:
        diff = sorted(ref_inputs ^ cand_inputs)
        raise UserError(f"reference and candidate have different input names: {', '.join(diff[:6])}")
    if ref.layout.vocab_size != cand.layout.vocab_size:
        raise UserError(f"vocabulary sizes differ: reference {ref.layout.vocab_size}, "
                        f"candidate {cand.layout.vocab_size}")
    return ref, cand


def validate_llm(reference: str | Path, candidate: str | Path, config: LLMValidationConfig) -> dict:
    """Measure everything for the report's llm sections (metrics, kl_histogram, greedy, probes, text)."""
    ref, cand = load_pair(reference, candidate, config.optimization)
    tokenizer = FolderTokenizer(config.tokenizer or ref.folder)
    report: dict = {"mode": "llm"}
    report.update(text_metrics(ref, cand, tokenizer, config))
    report["greedy"] = greedy_agreement(ref, cand, _prompt_ids(tokenizer, config), tokenizer, config.new_tokens)
    if config.probes_per_task:
        report["probes"] = probe_agreement(ref, cand, tokenizer, config)
    return report


def text_metrics(ref: CausalLMRunner, cand: CausalLMRunner, tokenizer: FolderTokenizer,
                 config: LLMValidationConfig) -> dict:
    """Perplexity, KL and top-1 over held-out text windows, one window at a time (bounded memory)."""
    from accullm_export.data.text import load_text_source, token_windows

    source = load_text_source(config.text)
    windows = token_windows(source.documents, tokenizer.encode, num_windows=config.windows, seq_len=config.seq_len,
                            seed=config.seed, separator_ids=tokenizer.eos_token_ids[:1])
    stats = TokenStatistics()
    for window in progress(windows, "text windows"):
        tokens = window[None, :]
        stats.add(ref.full_logits(tokens), cand.full_logits(tokens), tokens)
    return {"text": {"source": source.name, "windows": int(len(windows)), "seq_len": config.seq_len,
                     "tokens": int(windows.size), "description": source.description},
            "metrics": stats.summary(), "kl_histogram": stats.kl_histogram()}


def greedy_agreement(ref: CausalLMRunner, cand: CausalLMRunner, prompts: list[list[int]], tokenizer: FolderTokenizer,
                     new_tokens: int) -> dict:
    """Teacher-forced greedy agreement: where would greedy decoding of the candidate leave the reference's?

    The reference's greedy trajectory is fed to both models in one pass; the first position whose argmaxes
    differ is where greedy decoding diverges. A trajectory that ends early at EOS counts as a full match when
    all of its tokens match.
    """
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=tuple(tokenizer.eos_token_ids))
    rows = []
    for prompt in progress(prompts, "greedy prompts"):
        trajectory = generate(ref, [prompt], config).tokens[0]
        sequence = np.asarray([prompt + trajectory[:-1]], dtype=np.int64) if trajectory else None
        if sequence is None:
            continue
        start = len(prompt) - 1
        ref_argmax = ref.full_logits(sequence)[0, start:].argmax(-1)
        cand_argmax = cand.full_logits(sequence)[0, start:].argmax(-1)
        prefix = shared_prefix(ref_argmax, cand_argmax)
        rows.append({"prompt": tokenizer.decode(prompt), "prefix": prefix, "length": len(trajectory),
                     "full_match": prefix == len(trajectory)})
    if not rows:
        raise UserError("no greedy prompts to evaluate")
    prefixes = [row["prefix"] for row in rows]
    return {"new_tokens": new_tokens, "mean_prefix": float(np.mean(prefixes)), "min_prefix": int(min(prefixes)),
            "full_matches": sum(row["full_match"] for row in rows), "count": len(rows), "prompts": rows}


def probe_agreement(ref: CausalLMRunner, cand: CausalLMRunner, tokenizer: FolderTokenizer,
                    config: LLMValidationConfig) -> dict:
    """Greedy answers of both sides to the golden probes; agreement means the same answer text."""
    generation = GenerationConfig(max_new_tokens=config.probe_tokens, eos_token_ids=tuple(tokenizer.eos_token_ids))
    items, tasks = [], {}
    for probe in progress(golden_probes(config.probes_per_task, config.seed), "golden probes"):
        ids = tokenizer.encode(probe.prompt)
        answers = [answer_of(generate(side, [ids], generation).tokens[0], tokenizer.decode) for side in (ref, cand)]
        agree = answers[0] == answers[1]
        items.append({"task": probe.task, "prompt": probe.prompt, "reference_answer": answers[0],
                      "candidate_answer": answers[1], "agree": agree})
        task = tasks.setdefault(probe.task, {"agree": 0, "total": 0})
        task["agree"] += int(agree)
        task["total"] += 1
    return {"agreement": float(np.mean([item["agree"] for item in items])), "tasks": tasks, "items": items}


def _prompt_ids(tokenizer: FolderTokenizer, config: LLMValidationConfig) -> list[list[int]]:
    """Prompts from --prompts FILE (one per line), else the openings of held-out text documents."""
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise UserError(f"{path}: no such prompts file")
        from accullm_export.data.text import read_text_file

        lines = [line.strip() for line in read_text_file(path, "prompts file").splitlines() if line.strip()]
        if not lines:
            raise UserError(f"{path} holds no prompts")
        return [tokenizer.encode(line.replace("\\n", "\n")) for line in lines]
    from accullm_export.data.text import load_text_source

    documents = load_text_source(config.text).documents
    prompts = [tokenizer.encode(doc)[: config.prompt_tokens] for doc in documents[: config.num_prompts]]
    return [p for p in prompts if p]
